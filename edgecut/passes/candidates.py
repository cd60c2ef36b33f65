"""candidates: the cuts an artifact compiles, so that a device calibrated later can still choose well.

The compile-time plan table is a guess (it rests on the device's profile, for a Pi an
uncalibrated one). A device that measures itself 4x slower or faster than its profile wants
other cuts, and it can only choose among cuts the artifact has libraries for. So, for every
exit, the artifact gets the cuts on the Pareto front of (device seconds, crossing bytes): a cut
is kept unless another does no more device work and sends no more bytes (and is better in
one). The front is found among the min cuts of `mincut.MinCut.envelope` (every bandwidth of the
grid) recomputed with the device's per-node seconds scaled by each of `factors` (1/16 .. 16: a
device that much faster or slower than its profile), plus the input cut (edge-only) and
device-only. Per exit at most `per_exit` cuts are kept: input, device-only, every cut in `keep`
(the compile-time table's), and the rest of the front evenly spread by device seconds.

`predict_routes` then gives each built candidate the seconds its route takes as compiled: the
nodes' seconds plus one `Profile.segment_seconds` per library call on each side.

Reads what `find_cuts` reads (`meta.DEVICE_S`, `meta.EDGE_S`, `meta.OUT_BYTES`, `gm.meta[EXITS]`;
run `annotate_cost` first). Writes nothing; returns `Plan`s whose `device_s`/`edge_s` are
predicted seconds and whose `transfer_s` is 0 (it depends on the link).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch.fx as fx

from edgecut.errors import UsageError
from edgecut.frontend import meta
from edgecut.passes.find_cuts import CutCost, CutProblem, exit_specs
from edgecut.passes.mincut import MinCut
from edgecut.planning import bandwidth_grid
from edgecut.types import Plan

FACTORS = (1 / 16, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 16.0)
PER_EXIT = 6
NEAR = 0.02     # device seconds this close (relative) at equal bytes: one candidate


def pareto(cuts, near: float = NEAR) -> list[CutCost]:
    """The cuts no other cut dominates in (device seconds, crossing bytes), by device seconds;
    of equal points the first is kept. Cuts that send the same bytes within `near` (relative) of
    each other's device seconds are one point, the cut with the most nodes on the device: the
    others differ by an element-wise tail (an add | its ReLU) that would cut a fused kernel in
    two and buy a library for nothing (the solver's tie rule, `find_cuts.prefer`, likewise)."""
    best: dict[tuple, CutCost] = {}
    for c in cuts:
        best.setdefault((c.device_s, c.up_bytes if c.offloaded else 0), c)
    by_bytes: dict[int, list] = {}
    for (d, b), c in sorted(best.items(), key=lambda kv: kv[0]):
        by_bytes.setdefault(b, []).append(c)
    points = []
    for b, same in by_bytes.items():
        i = 0
        while i < len(same):
            group = [c for c in same[i:] if c.device_s <= same[i].device_s * (1 + near) + 1e-15]
            points.append((b, max(group, key=lambda c: len(c.device))))
            i += len(group)
    front, min_bytes = [], None
    for b, c in sorted(points, key=lambda bc: (bc[1].device_s, bc[0])):
        if min_bytes is None or b < min_bytes:
            front.append(c)
            min_bytes = b
    return front


def _spread(front: list[CutCost], must: list[CutCost], cap: int) -> list[CutCost]:
    """`must` plus members of `front` evenly spaced by position, `cap` in all (at least `must`)."""
    chosen = {c.device: c for c in must}
    rest = [c for c in front if c.device not in chosen]
    room = cap - len(chosen)
    if room >= len(rest):
        picks = rest
    elif room <= 0:
        picks = []
    elif room == 1:
        picks = [rest[len(rest) // 2]]
    else:
        picks = [rest[round(i * (len(rest) - 1) / (room - 1))] for i in range(room)]
    for c in picks:
        chosen.setdefault(c.device, c)
    return sorted(chosen.values(), key=lambda c: (c.device_s, -c.up_bytes))


def exit_candidates(problem: CutProblem, factors=FACTORS, per_exit: int = PER_EXIT, keep=(),
                    bandwidths=None) -> list[CutCost]:
    """The candidate cuts of one exit's problem (see the module docstring); `keep` holds device
    sets (node index frozensets) that must stay."""
    lams = [8.0 / b for b in (bandwidths or bandwidth_grid())]
    found = {}
    for f in factors:
        scaled = copy.copy(problem)
        scaled.device_s = [f * s for s in problem.device_s]
        for cc in MinCut(scaled, max(lams)).envelope(lams):
            found.setdefault(cc.device, None)
    edge_only = problem.cost(i for i in range(problem.n) if problem.forced[i])
    local = problem.device_only()
    cuts = [problem.cost(d) for d in found] + [edge_only, local]
    must = [edge_only, local] + [problem.cost(d) for d in keep]
    must = list({c.device: c for c in must}.values())
    return _spread(pareto(cuts), must, max(per_exit, len(must)))


def candidates(gm: fx.GraphModule, factors=FACTORS, per_exit: int = PER_EXIT, keep=()) -> tuple[Plan, ...]:
    """Candidate plans of every exit of `gm`: per exit, the input cut, device-only and up to
    `per_exit` cuts of the (device seconds, crossing bytes) Pareto front. `keep`: plans whose
    cuts must be among them (e.g. the compile-time table's). Ordered by exit, then device seconds."""
    if per_exit < 2:
        raise UsageError(f"per_exit must be >= 2 (the input cut and device-only), got {per_exit}")
    if not factors or any(not f > 0 for f in factors):
        raise UsageError(f"factors must be positive scale factors of the device's seconds, got {factors!r}")
    out = []
    for ex in exit_specs(gm):
        problem = CutProblem(gm, ex)
        index = {name: i for i, name in enumerate(problem.names)}
        kept = [frozenset(index[n] for n in p.cut.device if n in index) for p in keep if p.exit == ex["id"]]
        for cc in exit_candidates(problem, factors, per_exit, kept):
            out.append(Plan(exit=int(ex["id"]), cut=problem.to_cut(cc), device_s=cc.device_s, transfer_s=0.0,
                            edge_s=cc.edge_s, accuracy=problem.accuracy))
    return tuple(out)


def predict_routes(gm: fx.GraphModule, manifest, device_profile, edge_profile,
                   early_exit: bool = True) -> tuple[Plan, ...]:
    """`manifest.candidates` with the seconds their routes take as built: on each side, the
    nodes' predicted seconds (`meta.DEVICE_S` / `meta.EDGE_S`) of every segment the route calls,
    plus one `Profile.segment_seconds(in, out elements)` per call (the VM call, the numpy <-> TVM
    copies, the layout transforms at its boundary). With `early_exit` the device part counts its
    early-exit heads: the time when no exit fires, the one a deadline must survive."""
    import math

    nodes = {n.name: n for n in gm.graph.nodes}
    segments = {s.name: s for s in manifest.segments}

    def elems(names) -> int:
        return sum(math.prod(manifest.tensors[n].shape) for n in names if n in manifest.tensors)

    def seconds(names, key, prof) -> float:
        total = 0.0
        for name in names:
            s = segments[name]
            total += sum(float(nodes[n].meta.get(key) or 0.0) for n in s.nodes if n in nodes)
            total += prof.segment_seconds(elems(s.inputs), elems(s.outputs))
        return total

    out = []
    for p in manifest.candidates:
        r = manifest.route(p.id)
        device = (*r.device, *(h for _, _, heads in r.checks for h in heads if early_exit))
        out.append(replace(p, device_s=seconds(device, meta.DEVICE_S, device_profile), transfer_s=0.0,
                           edge_s=seconds(r.edge, meta.EDGE_S, edge_profile), feasible=True, shortfall_s=0.0))
    return tuple(out)
