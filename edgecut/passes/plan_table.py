"""The plan per bandwidth range: what the device switches between online as bandwidth moves.

`plan_table(gm, deadline)` solves on a log grid of bandwidths (50 kbit/s .. 1 Gbit/s, 64 points
by default) and merges adjacent grid points whose plans differ in neither exit, crossing bytes
nor feasibility (`range_key`) into one range; `PlanTable.bounds[i]` is the lowest bandwidth of range i and its
plan is the one predicted at that bandwidth (the slowest link of the range).

Work is shared across bandwidths. Only the transfer capacities depend on the bandwidth: a cut
costs A + lam * B with lam = 8 / bandwidth, so the min-cut value is the lower envelope of these
lines, concave in lam. `mincut.envelope` finds its pieces by Eisner-Severance bisection on one
residual network per block: 2 * pieces - 1 min cuts, not one per grid point. The link's fixed
cost (rtt + overhead) is paid by every offloading cut, so it is compared with device-only
afterwards, per bandwidth.

Reads what `find_cuts` reads (run `annotate_cost` first). Writes nothing.
"""
from __future__ import annotations

import math

import torch.fx as fx

from edgecut.errors import UsageError
from edgecut.passes.find_cuts import CutCost, CutProblem, exit_specs
from edgecut.passes.mincut import MinCut, local_or
from edgecut.passes.solve import check_args, exit_order, infeasible, make_plan
from edgecut.planning import (GRID_POINTS, HIGH_BANDWIDTH, LOW_BANDWIDTH,  # noqa: F401 (re-exported)
                              bandwidth_grid, range_key)
from edgecut.types import Link, PlanTable
from edgecut.units import format_bandwidth

def plan_table(gm: fx.GraphModule, deadline: float = math.inf, rtt: float = 0.0, overhead: float = 0.0,
               bandwidths=None, objective: str = "accuracy", margin: float = 0.0) -> PlanTable:
    """The plan per bandwidth range for links with round trip `rtt` and per-message `overhead`
    (seconds). `bandwidths` (bit/s) default to `bandwidth_grid()`. Objectives and `margin` are
    those of `solve`; bandwidths where no plan is feasible hold the fastest plan, marked
    infeasible, and a `DeadlineWarning` says at which bandwidths."""
    check_args(deadline, objective, margin)
    bws = sorted(float(b) for b in (bandwidth_grid() if bandwidths is None else bandwidths))
    if not bws or any(not (b > 0 and math.isfinite(b)) for b in bws) or len(set(bws)) != len(bws):
        raise UsageError("bandwidths must be distinct positive finite numbers of bit/s")
    Link(bws[0], rtt, overhead)  # validates rtt and overhead
    lams = [8.0 / b for b in bws]
    order = exit_order(exit_specs(gm), objective)
    cache: dict[int, tuple[CutProblem, list[CutCost]]] = {}

    def cuts_of(ex: dict) -> tuple[CutProblem, list[CutCost]]:
        if ex["id"] not in cache:  # solve an exit only when some bandwidth needs it
            problem = CutProblem(gm, ex)
            cache[ex["id"]] = problem, MinCut(problem, max(lams)).envelope(lams)
        return cache[ex["id"]]

    plans, short = [], []
    for k, bw in enumerate(bws):
        link, tried = Link(bw, rtt, overhead), []
        for ex in order:
            problem, cuts = cuts_of(ex)
            plan = make_plan(problem, local_or(problem, cuts[k], link), link, deadline, margin)
            if plan.feasible:
                break
            tried.append(plan)
        else:
            plan = min(tried, key=lambda p: (p.latency_s, -p.exit))
            short.append(bw)
        plans.append(plan)
    if short:
        infeasible(min((p for p in plans if not p.feasible), key=lambda p: p.latency_s), deadline, margin,
                   f"at {len(short)} of {len(bws)} bandwidths (up to {format_bandwidth(max(short))})")
    bounds, merged = [], []
    for bw, plan in zip(bws, plans):
        if merged and range_key(merged[-1]) == range_key(plan):
            continue
        bounds.append(bw)
        merged.append(plan)
    return PlanTable(tuple(bounds), tuple(merged), float(deadline))

