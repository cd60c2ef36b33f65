"""Batch-N libraries of the edge segments, for an edge that batches requests from several devices
(the edge tier): `build_artifact(..., edge_batches=(4, 8))`.

Each edge segment that TVM built at batch 1 is compiled again from a batch-N example (the model
run on N different inputs, the first the example input itself) and written as
`edge/<segment>.b<N>.so` / `.params` (weights shared through the side's store), with a `Library`
whose `batch` is N. Batch 1 stays the latency path; `codegen.load.Part.run_batch` pads a partial
batch to the next size built. A segment is left at batch 1 (with a CodegenWarning) when its
tensors do not carry the batch in dimension 0 (a hard-coded `view(1, -1)`, a sequence-first
layout), or when TVM cannot build it or disagrees with PyTorch at batch N.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from edgecut.codegen.build import build
from edgecut.codegen.importer import import_segment
from edgecut.codegen.manifest import Library, max_error
from edgecut.codegen.segment import segment_module
from edgecut.errors import CodegenError, CodegenWarning


def batched_inputs(example_inputs, n: int) -> tuple:
    """The example inputs with n rows: the example, then n - 1 draws of its mean and spread."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in example_inputs:
        x = torch.as_tensor(x)
        if x.shape[:1] != (1,):
            raise CodegenError(f"edge_batches needs example inputs of batch 1 (dimension 0), got {tuple(x.shape)}")
        if x.is_floating_point():
            more = torch.randn((n - 1, *x.shape[1:]), generator=gen, dtype=x.dtype) * x.std() + x.mean()
        else:
            more = x.expand(n - 1, *x.shape[1:])
        out.append(torch.cat([x, more]))
    return tuple(out)


def _batch_in_dim0(names, one: dict, many: dict, n: int) -> bool:
    return all(one[k].shape[:1] == (1,) and many[k].shape == (n, *one[k].shape[1:]) for k in names)


def build_edge_batches(gm, segments, edge_libs: dict, example_inputs, batches, target, out: Path, store: dict,
                       tolerance: float) -> list:
    """Libraries of batch N (for N > 1 in `batches`) for the segments in `edge_libs` (segment ->
    its batch-1 TVM Library on the edge), their weights added to the edge's `store`. Returns the
    new Libraries; warns for each segment and size left out."""
    from edgecut.codegen.artifact import _run_library as run_library
    from edgecut.codegen.artifact import _save_refs as save_refs
    from edgecut.codegen.artifact import _tile_suffix
    from edgecut.codegen.artifact import _values as values_of
    from edgecut.codegen.artifact import export_library

    libs, skipped = [], []
    one = values_of(gm, example_inputs)
    for n in sorted({int(b) for b in batches if int(b) > 1}):
        try:
            many = values_of(gm, batched_inputs(example_inputs, n))
        except Exception as e:  # noqa: BLE001 - a graph fixed at batch 1: no batch-N code at all
            skipped.append(f"every segment at batch {n} (the model does not run at batch {n}: "
                           f"{type(e).__name__}: {str(e)[:200]})")
            continue
        for s in segments:
            base = edge_libs.get(s.name)
            if base is None:
                continue
            if not _batch_in_dim0((*s.inputs, *s.outputs), one, many, n):
                skipped.append(f"segment {s.name} at batch {n} (its tensors do not carry the batch in dimension 0)")
                continue
            ins, want = [many[i] for i in s.inputs], [many[o] for o in s.outputs]
            lib, par = f"edge/{s.name}.b{n}.so", f"edge/{s.name}.b{n}.params"
            try:
                mod, params = import_segment(segment_module(gm, s), [(x.shape, x.dtype) for x in ins],
                                             name=s.name, example_inputs=ins)
                tile = 2 if base.file.endswith(f"{_tile_suffix(2)}.so") else 4   # as the batch-1 library
                built = build(mod, params, target, num_inputs=len(ins), winograd_tile=tile)
                export_library(built, out / lib, target)
                weights = {}
                save_refs(out / par, built.params, weights)
                if target.runs_here:
                    got = run_library(out / lib, out / par, target.tvm.get("kind", "llvm"), ins, weights)
                    err = max(max_error(g, w) for g, w in zip(got, want))
                    if err > tolerance:
                        raise CodegenError(f"differs from PyTorch by {err:.2e} x the output's scale")
            except Exception as e:  # noqa: BLE001 - this size of this segment stays at batch 1
                (out / lib).unlink(missing_ok=True)
                (out / par).unlink(missing_ok=True)
                skipped.append(f"segment {s.name} at batch {n} ({type(e).__name__}: {str(e)[:200]})")
                continue
            for k, v in weights.items():
                store.setdefault(k, v)
            libs.append(Library(base.side, s.name, "tvm", lib, par, base.target, base.tvm_target, base.arch,
                                base.weights, batch=n))
    if skipped:
        warnings.warn("edge segments left at batch 1: " + "; ".join(skipped), CodegenWarning, stacklevel=3)
    return libs
