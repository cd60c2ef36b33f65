"""check_cuts: one build with a segment boundary at every given cut, then every route run and
compared with eager PyTorch ("split equals whole at every cut", issue 16).

The cuts (e.g. `edgecut.passes.find_cuts.find_cuts(gm)`, the single-tensor candidates the cut
problem proposes) become the plans of a synthetic plan table for the graph's final exit (or
`exit_id`); `build_artifact(chain=True)` splits the graph at all of them at once
(`segment.chain_split`), so each cut is a boundary between whole segments and each node is
compiled once (TVM, or ONNX Runtime where TVM cannot build one), each segment checked against
PyTorch as always. (Routes as deployed, one library per side, would build a model's prefix and
suffix per cut: quadratic in the cuts.) Each route (device segments, then edge
segments, loaded with `edgecut.load` as a deployment would) is then run on the example inputs and
its logits compared with the eager output of the whole graph. Both targets must run on this
machine (the default "local"); cross-compiled libraries are checked under qemu elsewhere
(`edgecut.codegen.qemu`).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field

import torch.fx as fx

from edgecut import targets as _targets
from edgecut.errors import UsageError
from edgecut.types import Cut, Plan, PlanTable


@dataclass(frozen=True)
class CutCheck:
    """`errors`: cut name -> max |chained - eager| / max |eager| of the exit's logits (inf when
    the route could not run; `failures` then says why). `fallbacks`: segment -> why it runs on
    ONNX Runtime. `segments`: how many segments the build made; `seconds`: build + runs."""

    errors: dict
    tolerance: float
    segments: int
    seconds: float
    fallbacks: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())

    @property
    def worst(self) -> tuple:
        """(cut name, error) of the largest error."""
        return max(self.errors.items(), key=lambda kv: kv[1]) if self.errors else ("", 0.0)


def _as_cut(gm: fx.GraphModule, c) -> Cut:
    if isinstance(c, Cut):
        return c
    if isinstance(c, str):                        # a node name: everything up to it on the device
        from edgecut.codegen.segment import _ancestors

        nodes = {n.name: n for n in gm.graph.nodes}
        if c not in nodes:
            raise UsageError(f"check_cuts: no node {c!r} in the graph")
        return Cut(f"after:{c}", frozenset(_ancestors(nodes[c])), (c,))
    raise UsageError(f"check_cuts: a cut is an edgecut.types.Cut or a node name, got {type(c).__name__}")


def check_cuts(gm: fx.GraphModule, example_inputs, cuts, *, exit_id: int | None = None,
               device_target="local", edge_target="local", out_dir=None, tolerance: float = 1e-4,
               onnx: bool = True, progress: bool = False) -> CutCheck:
    """Build `gm` once with a boundary at every cut of `cuts` (Cut objects or node names) and
    report each cut's chained error against eager. `out_dir`: keep the artifact there (a
    temporary folder otherwise). Raises CodegenError when a segment cannot be built at all."""
    import numpy as np

    from edgecut.codegen.artifact import _values, build_artifact
    from edgecut.codegen.load import load
    from edgecut.codegen.manifest import max_error
    from edgecut.codegen.segment import exit_specs

    for t in (device_target, edge_target):
        if not _targets.get(t).runs_here:
            raise UsageError(f"check_cuts runs every route on this machine; target {_targets.get(t).name} "
                             "does not run here (use 'local')")
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    exits = exit_specs(gm)
    ex = exits[-1] if exit_id is None else next((e for e in exits if e.id == exit_id), None)
    if ex is None:
        raise UsageError(f"check_cuts: no exit {exit_id}; the graph has {[e.id for e in exits]}")
    unique = {}
    for c in cuts:
        c = _as_cut(gm, c)
        unique.setdefault(c.name, c)
    if not unique:
        raise UsageError("check_cuts needs at least one cut")
    plans = tuple(Plan(ex.id, c, 0.0, 0.0, 0.0) for c in unique.values())
    table = PlanTable(tuple(float(i) for i in range(len(plans))), plans, math.inf)
    want = _values(gm, example_inputs)[ex.output]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgecut-cuts-") as tmp:
        out = out_dir or tmp
        m = build_artifact(gm, table, device_target, edge_target, out, example_inputs, onnx=onnx, tolerance=tolerance,
                           progress=progress, model_name=f"{type(gm).__name__} (check_cuts)", chain=True)
        dev, edge = load(out, "device"), load(out, "edge")
        feed = dict(zip(dev.input_names, (np.asarray(x) for x in example_inputs)))
        errors, failures = {}, {}
        for p in plans:
            try:
                res = dev.run(p.id, feed, early_exit=False)
                if not res.done:
                    res = edge.run(p.id, res.outputs)
                errors[p.cut.name] = max_error(res.outputs["logits"], want)
            except Exception as e:  # noqa: BLE001 - one route's failure is reported, not fatal
                errors[p.cut.name] = math.inf
                failures[p.cut.name] = f"{type(e).__name__}: {str(e)[:300]}"
    fallbacks = {lib.segment: lib.note for lib in m.libraries if lib.backend == "onnxruntime"}
    return CutCheck(errors, tolerance, len(m.segments), time.perf_counter() - t0, fallbacks, failures)
