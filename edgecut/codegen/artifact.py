"""build_artifact: an annotated (multi-exit) GraphModule + a PlanTable -> the deployable directory.

```
OUT/manifest.msgpack, manifest.json   the Manifest (edgecut/codegen/manifest.py)
OUT/device/<segment>.so, .params      TVM libraries for the device target, and their weights (as
                                      references into weights.msgpack)
OUT/device/weights.msgpack            every distinct weight array of the side's libraries, once
OUT/edge/...                          the same for the edge target
OUT/onnx/<segment>.onnx               portable copies (backend="onnxruntime")
OUT/reference.msgpack                 a reference input and what each side must answer (`edgecut check`)
```
Reads `gm.meta[meta.EXITS]` (exits and thresholds) and `node.meta[meta.DEVICE_S]` when present
(to pick a fallback plan when the table has no device-only one). Every library that can run on
this machine is loaded back from its file and compared with PyTorch; every ONNX copy is compared
with the TVM output (or PyTorch's) with onnxruntime.
"""
from __future__ import annotations

import logging
import math
import platform
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from edgecut import targets as _targets
from edgecut.codegen.codec_ops import add_coded_values, output_error, reference_outputs
from edgecut.codegen.importer import ImportFailed, import_segment
from edgecut.codegen.parallel import BuildFailed, Builds, build_one, jobs_for
from edgecut.codegen.manifest import (FORMAT_VERSION, REFERENCE, Library, Manifest, TensorSpec, array_key,
                                      load_arrays, save_arrays, sha256)
from edgecut.codegen.segment import _ancestors, chain_split, exit_specs, segment_module, split
from edgecut.errors import CodegenError, CodegenWarning
from edgecut.frontend import meta
from edgecut.types import Cut, Plan, PlanTable

BACKENDS = ("tvm", "onnxruntime")
WEIGHTS = "weights.msgpack"     # per side: every library's weights, each distinct array once

log = logging.getLogger("edgecut.codegen")


def _values(gm: fx.GraphModule, example_inputs) -> dict:
    """Every node's output on the example inputs (numpy), by node name."""
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):     # a copy: a later in-place op (ReLU(inplace=True), +=)
                values[n.name] = out.detach().cpu().numpy().copy()   # would change a view under us
            return out

    with torch.no_grad():
        Record(gm).run(*[torch.as_tensor(x).clone() for x in example_inputs])
    return values


def fallback_plan(gm: fx.GraphModule, table: PlanTable, exits) -> Plan:
    """The device-only plan for when the edge is unreachable: the table's device-only plan that
    meets the deadline with the best accuracy (else its fastest); without one, the whole model up
    to the most accurate exit whose predicted device time fits (else the earliest exit)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    need = {e.id: _ancestors(nodes[e.output]) - {n.name for n in gm.graph.nodes if n.op == "placeholder"}
            for e in exits}
    own = [p for p in table.plans if p.exit in need and need[p.exit] <= set(p.cut.device)]
    if own:
        fits = [p for p in own if p.device_s <= table.deadline]
        if fits:
            return max(fits, key=lambda p: (-math.inf if math.isnan(p.accuracy) else p.accuracy, -p.device_s))
        return min(own, key=lambda p: p.device_s)
    options = []
    for e in exits:
        device = _ancestors(nodes[e.output])
        secs = sum(float(nodes[n].meta.get(meta.DEVICE_S, math.nan)) for n in device)
        options.append(Plan(e.id, Cut("device", frozenset(device)), secs, 0.0, 0.0, e.accuracy,
                            feasible=bool(secs <= table.deadline),
                            shortfall_s=max(0.0, secs - table.deadline) if not math.isnan(secs) else 0.0))
    fits = [p for p in options if p.feasible]
    return max(fits, key=lambda p: (-math.inf if math.isnan(p.accuracy) else p.accuracy)) if fits else options[0]


def export_library(built, path, target) -> None:
    """Write `built` as a shared library for `target` (cross-compiled with its `cc`). The triple of
    the packed imports comes from the target's compiler: `cross_compiler(cc)` alone asks the host's
    g++, which makes an x86 object in an aarch64 library when a program has no kernels."""
    if target.cc:
        from tvm.support import cc as _cc

        fcompile = _cc.cross_compiler(target.cc, get_target_triple=_cc.get_target_by_dump_machine(target.cc))
        built.executable.export_library(str(path), fcompile=fcompile)
    else:
        built.executable.export_library(str(path))


def _run_library(lib: Path, params: Path, kind: str, inputs, weights: dict) -> list:
    from edgecut.codegen.load import _TvmSegment

    class Store:            # the side's weights before its store is written
        def tensor(self, key, dev):
            import tvm

            return tvm.runtime.tensor(weights[key], dev)
    return _TvmSegment(lib, params, kind, Store()).run(inputs)


def _save_refs(path: Path, params, store: dict) -> None:
    """Write a library's weights as references into its side's `store` (key -> array)."""
    refs = []
    for p in params:
        key = array_key(p)
        store.setdefault(key, np.ascontiguousarray(p))
        refs.append({"ref": key})
    save_arrays(path, refs)


class _Fallback(Exception):
    """TVM could not import, build or match PyTorch on a segment: it runs on ONNX Runtime."""

    def __init__(self, op: str, node: str, reason: str, done: int = 0):
        super().__init__(reason)
        self.op, self.node, self.reason, self.done = op, node, reason, done


def _import(s, seg_gm, ins, imports: dict):
    """Segment `s` as (Relax module, weights), imported once (kept in `imports`); raises _Fallback."""
    if s.name not in imports:
        try:
            imports[s.name] = import_segment(seg_gm, [(x.shape, x.dtype) for x in ins], name=s.name,
                                             example_inputs=ins)
        except ImportFailed as e:
            imports[s.name] = e
    got = imports[s.name]
    if isinstance(got, ImportFailed):
        raise _Fallback(got.op or "import", got.node or s.nodes[0], str(got)) from got
    return got


def _tvm_segment(s, seg_gm, ins, want, mine, sides, out, libs, check, bar, tolerance, stores, builds, imports):
    """`_tvm_segment_at` with Winograd tiles up to 4; a segment whose numbers are off is built
    again with tiles up to 2, which round less (codegen/winograd.py), before it falls back."""
    try:
        return _tvm_segment_at(s, seg_gm, ins, want, mine, sides, out, libs, check, bar, tolerance, stores,
                               builds, imports, 4)
    except _Fallback as e:
        if e.op != "numeric check":
            raise
        log.info("%s; building it again with Winograd tiles of at most 2x2", e.reason)
        builds.discard(s.name)
        del libs[:]
        bar.update(-e.done)
        for side in mine:
            (out / side / f"{s.name}.so").unlink(missing_ok=True)
            (out / side / f"{s.name}.params").unlink(missing_ok=True)
        check["tvm_vs_torch_winograd4"] = check.pop("tvm_vs_torch")
        done = set()
        for side in mine:                     # both sides at once when there are workers
            target = sides[side]
            if target.name not in done:
                done.add(target.name)
                builds.submit(_import(s, seg_gm, ins, imports), len(ins), s.name, target,
                              out / side / f"{s.name}{_tile_suffix(2)}.so", winograd_tile=2)
        return _tvm_segment_at(s, seg_gm, ins, want, mine, sides, out, libs, check, bar, tolerance, stores,
                               builds, imports, 2)


def _tile_suffix(tile: int) -> str:
    """The library name's suffix for a Winograd tile bound: a rebuilt library gets a name of its own
    (the process has the first one loaded, and loading the same path again returns that one)."""
    return "" if tile == 4 else f"-w{tile}"


def _tvm_segment_at(s, seg_gm, ins, want, mine, sides, out, libs, check, bar, tolerance, stores, builds, imports,
                    tile):
    """Compile `s` for each side in `mine` (once per distinct target; by a worker of `builds` when
    it has the build, else here) with Winograd tiles up to `tile`, export the libraries (appended
    to `libs`), and check the first one that runs here against PyTorch. Returns its outputs
    (None when no library runs here); raises _Fallback."""
    built_for, tvm_out = {}, None
    for k, side in enumerate(mine):
        target = sides[side]
        bar.set_postfix_str(f"{s.name} for {target.name}")
        lib, par = f"{side}/{s.name}{_tile_suffix(tile)}.so", f"{side}/{s.name}{_tile_suffix(tile)}.params"
        if target.name in built_for:          # same target on both sides: compile once
            shutil.copyfile(out / built_for[target.name][0], out / lib)
            _save_refs(out / par, built_for[target.name][1], stores[side])
        else:
            try:
                params = builds.result(s.name, target.name, lambda: build_one(
                    _import(s, seg_gm, ins, imports), len(ins), target, out / lib, tile))
            except BuildFailed as e:
                raise _Fallback("build", s.nodes[0], f"compiling segment {s.name} ({', '.join(s.nodes[:3])}...) "
                                f"for target {target.name} failed: {e}", k) from e
            _save_refs(out / par, params, stores[side])
            built_for[target.name] = (lib, params)
        libs.append(Library(side, s.name, "tvm", lib, par, target.name, str(target.tvm_target()), target.arch,
                            f"{side}/{WEIGHTS}"))
        if target.runs_here and tvm_out is None:
            tvm_out = _run_library(out / lib, out / par, target.tvm.get("kind", "llvm"), ins, stores[side])
            err, ok = output_error(s.outputs, tvm_out, want, tolerance)
            check["tvm_vs_torch"] = err
            if not ok:
                raise _Fallback("numeric check", s.nodes[0], f"segment {s.name} compiled for {target.name} "
                                f"differs from PyTorch by {err:.2e} x the output's scale (tolerance {tolerance:g})",
                                k + 1)
        bar.update(1)
    return tvm_out


def build_artifact(gm: fx.GraphModule, table: PlanTable, device_target="local", edge_target="local",
                   out_dir="build/model", example_inputs=(), *, backend: str = "tvm", onnx: bool = True,
                   model_name: str | None = None, tolerance: float = 1e-4, progress: bool = True,
                   info: dict | None = None, candidates=(), chain: bool = False,
                   edge_batches=()) -> Manifest:
    """Split `gm` at the cuts of `table`, compile each segment for its side(s), export ONNX copies,
    check them, and write the artifact directory `out_dir` (replaced if it exists).

    backend="tvm" compiles TVM libraries (device and edge); "onnxruntime" writes only the ONNX
    copies (for models with ops TVM cannot import). `info` (msgpack-able) is stored as `manifest.info`.
    `candidates`: more plans to build routes for (`passes.candidates`); `manifest.candidates`
    lists every plan built (the table's, the fallback, these). `chain`: every cut a boundary of
    every route (`segment.chain_split`: each node built once; for checking cuts). `edge_batches`:
    more batch sizes to compile the edge segments for (codegen/batches.py; the edge tier batches
    requests). Raises CodegenError when a segment cannot be
    compiled or disagrees with PyTorch by more than `tolerance` x the output's scale."""
    if backend not in BACKENDS:
        raise CodegenError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "onnxruntime" and not onnx:
        raise CodegenError("backend='onnxruntime' needs onnx=True (the ONNX copies are what it runs)")
    if not example_inputs:
        raise CodegenError("build_artifact needs example_inputs (the shapes of the compiled code come from them)")
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    sides = {"device": _targets.get(device_target), "edge": _targets.get(edge_target)}
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    for sub in ("device", "edge", "onnx"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    # 1. exits, fallback, segments and routes
    exits = exit_specs(gm, table.plans)
    fallback = fallback_plan(gm, table, exits)
    plans = tuple({p.id: p for p in (*table.plans, fallback, *candidates)}.values())
    segments, routes, exits = (chain_split if chain else split)(gm, plans, exits)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    values = _values(gm, example_inputs)
    add_coded_values(values, segments, gm)                # coded crossing tensors (numpy reference)
    tensors = {}
    for s in segments:
        for name in (*s.inputs, *s.outputs):
            if name not in values:
                raise CodegenError(f"segment {s.name}: node {name!r} does not produce a tensor, but crosses "
                                   "segments; cut elsewhere (only tensors can be sent or passed on)")
            tensors[name] = TensorSpec(name, str(values[name].dtype), tuple(values[name].shape))
    inputs = tuple(tensors.get(p) or TensorSpec(p, str(values[p].dtype), tuple(values[p].shape))
                   for p in placeholders)
    uses = {side: set() for side in sides}
    for r in routes.values():
        uses["device"].update(r.device, *(h for _, _, h in r.checks))
        uses["edge"].update(r.edge)

    # 2. compile, export and check every segment
    libraries, onnx_files, checks, files = [], {}, {}, []
    stores = {side: {} for side in sides}         # side -> weight key -> array (each stored once)
    work = [(s, side) for s in segments for side in sides if s.name in uses[side]]
    bar = tqdm(total=len(work) + (len(segments) if onnx else 0), desc="codegen", unit="seg",
               disable=not progress, leave=False)
    fallbacks = {}
    seg_gms = {s.name: segment_module(gm, s) for s in segments}
    todo = []                                 # (segment, the first side of each distinct target)
    for s in segments if backend == "tvm" else ():
        first = {}
        for side in sides:
            if s.name in uses[side]:
                first.setdefault(sides[side].name, side)
        todo += [(s, side) for side in first.values()]
    macs = sum(float(n.meta.get(meta.MACS, 0) or 0) for n in gm.graph.nodes)
    builds, imports = Builds(jobs_for(macs, len(todo), len(gm.graph.nodes))), {}
    for s, side in todo if builds.procs else ():    # workers build while this process checks
        try:
            got = _import(s, seg_gms[s.name], [values[i] for i in s.inputs], imports)
        except _Fallback:
            continue
        builds.submit(got, len(s.inputs), s.name, sides[side], out / side / f"{s.name}.so")
    try:
        for s in segments:
            seg_gm = seg_gms[s.name]
            ins = [values[i] for i in s.inputs]
            want = reference_outputs(seg_gm, s, ins, values)
            check = checks.setdefault(s.name, {})
            mine = [side for side in sides if s.name in uses[side]]
            tvm_out, tvm_libs = None, []
            if backend == "tvm" and mine:
                try:
                    tvm_out = _tvm_segment(s, seg_gm, ins, want, mine, sides, out, tvm_libs, check, bar, tolerance,
                                           stores, builds, imports)
                except _Fallback as e:
                    if not onnx:
                        raise CodegenError(f"{e.reason}; build with onnx=True to run this segment on ONNX Runtime, "
                                           "or backend=\"onnxruntime\"") from e.__cause__
                    fallbacks[s.name] = e
                    builds.discard(s.name)
                    for side in mine:
                        for suffix in (_tile_suffix(4), _tile_suffix(2)):
                            (out / side / f"{s.name}{suffix}.so").unlink(missing_ok=True)
                            (out / side / f"{s.name}{suffix}.params").unlink(missing_ok=True)
                    tvm_libs, tvm_out = [], None
                    bar.update(len(mine) - e.done)
            libraries += tvm_libs
            files += [f for lib in tvm_libs for f in (lib.file, lib.params)]
            if onnx:
                bar.set_postfix_str(f"{s.name} to ONNX")
                from edgecut.codegen.onnx_export import OnnxSegment, export_segment

                path = f"onnx/{s.name}.onnx"
                try:
                    export_segment(seg_gm, ins, out / path, s.inputs, s.outputs)
                except CodegenError as e:
                    if s.name not in fallbacks:
                        raise
                    raise CodegenError(f"{fallbacks[s.name].reason}; the ONNX Runtime fallback failed too: {e}") from e
                got = OnnxSegment(out / path, s.inputs).run(ins)
                against = tvm_out if tvm_out is not None else want
                err, ok = output_error(s.outputs, got, against, tolerance)
                check["onnx_vs_tvm" if tvm_out is not None else "onnx_vs_torch"] = err
                if not ok:
                    raise CodegenError(f"ONNX copy of segment {s.name} differs from "
                                       f"{'TVM' if tvm_out is not None else 'PyTorch'} by {err:.2e} x the output's scale")
                onnx_files[s.name] = path
                files.append(path)
                if backend == "onnxruntime" or s.name in fallbacks:
                    note = fallbacks[s.name].reason if s.name in fallbacks else "backend='onnxruntime'"
                    libraries += [Library(side, s.name, "onnxruntime", path, "", sides[side].name, "",
                                          sides[side].arch, note=note) for side in mine]
                bar.update(1)
    finally:
        builds.close()
    bar.close()
    if fallbacks:
        warnings.warn("TVM could not build " + "; ".join(
            f"segment {name} ({e.op} at node {e.node!r}: {e.reason})" for name, e in fallbacks.items())
            + ": those segments run on ONNX Runtime (see the artifact's report())", CodegenWarning, stacklevel=2)
    if edge_batches and backend == "tvm":
        from edgecut.codegen.batches import build_edge_batches

        edge_libs = {lib.segment: lib for lib in libraries if lib.side == "edge" and lib.backend == "tvm"}
        more = build_edge_batches(gm, segments, edge_libs, example_inputs, edge_batches, sides["edge"], out,
                                  stores["edge"], tolerance)
        libraries += more
        files += [f for lib in more for f in (lib.file, lib.params)]
    for side, store in stores.items():
        if any(lib.side == side and lib.weights for lib in libraries):   # even empty: libraries name it
            used = {r["ref"] for lib in libraries if lib.side == side and lib.params
                    for r in load_arrays(out / lib.params)}   # not the weights of a library built again
            save_arrays(out / side / WEIGHTS, {k: v for k, v in store.items() if k in used})
            files.append(f"{side}/{WEIGHTS}")

    # 3. the reference for `edgecut check`: model inputs, each exit's logits, the tensors an edge gets
    edge_plans = [p for p in plans if routes[p.id].edge and routes[p.id].codec == "fp32"]
    ref = {"inputs": {p: values[p] for p in placeholders},
           "logits": {str(e.id): values[e.output] for e in exits}}
    if edge_plans:
        p = min(edge_plans, key=lambda p: sum(values[c].nbytes for c in routes[p.id].crossing))
        ref["edge"] = {"plan": p.id, "tensors": {c: values[c] for c in routes[p.id].crossing}}
    save_arrays(out / REFERENCE, ref)
    files.append(REFERENCE)

    versions = {"edgecut": _edgecut_version(), "tvm": _tvm_version(), "torch": torch.__version__,
                "python": platform.python_version()}
    manifest = Manifest(model_name or type(gm).__name__, inputs, tuple(segments), tensors, table, fallback,
                        routes, tuple(exits), tuple(libraries), onnx_files,
                        {f: sha256(out / f) for f in sorted(set(files))},
                        {side: t.to_dict() for side, t in sides.items()}, versions, checks, REFERENCE,
                        FORMAT_VERSION, dict(info or {}), plans)
    manifest.write(out)
    return manifest


def _tvm_version() -> str:
    """TVM's version, without importing TVM when nothing did (backend="onnxruntime")."""
    if "tvm" in sys.modules:
        return sys.modules["tvm"].__version__
    from importlib import metadata

    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return ""


def _edgecut_version() -> str:
    import edgecut

    return edgecut.__version__
