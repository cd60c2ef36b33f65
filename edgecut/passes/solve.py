"""Edgent's search: choose the exit and the cut that meet a latency deadline.

`solve(gm, link, deadline)` returns a frozen `Plan`. Objectives:

- "accuracy" (Edgent, the default): exits from the most accurate down; for each, the cut with
  the lowest predicted latency (`mincut.best_cut`); the first exit whose latency meets the
  deadline wins.
- "latency" (Neurosurgeon): the final exit's lowest-latency cut.

`margin` is the relative error of the latency predictions to plan against (ALERT's idea), e.g.
the profile's 95th-percentile error: a plan is feasible when latency * (1 + margin) <= deadline.
When no plan is feasible the fastest plan is returned with `feasible=False` and `shortfall_s`
(latency * (1 + margin) - deadline), and a `DeadlineWarning` says so.

Exits with unknown accuracy (nan) rank after those with a known one; ties and unknowns go to the
larger exit id (deeper exits are the more accurate ones in BranchyNet).

Reads what `find_cuts` reads (run `annotate_cost` first). Writes nothing.
"""
from __future__ import annotations

import math
import warnings

import torch.fx as fx

from edgecut.errors import DeadlineWarning
from edgecut.passes.find_cuts import CutCost, CutProblem, exit_specs
from edgecut.passes.mincut import best_cut
from edgecut.planning import OBJECTIVES, check_args  # noqa: F401 (re-exported; torch-free)
from edgecut.types import Link, Plan
from edgecut.units import format_bandwidth, format_time

def exit_order(exits: list[dict], objective: str) -> list[dict]:
    """The exits to try, in order: most accurate first ("accuracy"), only the final one ("latency")."""
    if objective == "latency":
        return [exits[-1]]
    known = [e for e in exits if not math.isnan(e["accuracy"])]
    unknown = [e for e in exits if math.isnan(e["accuracy"])]
    return (sorted(known, key=lambda e: (e["accuracy"], e["id"]), reverse=True)
            + sorted(unknown, key=lambda e: e["id"], reverse=True))


def make_plan(problem: CutProblem, cc: CutCost, link: Link, deadline: float, margin: float) -> Plan:
    """The `Plan` of cut `cc` of `problem`'s exit over `link`, with its feasibility."""
    transfer = cc.transfer_s(link)
    need = (cc.device_s + transfer + cc.edge_s) * (1.0 + margin)
    return Plan(exit=int(problem.exit["id"]), cut=problem.to_cut(cc), device_s=cc.device_s,
                transfer_s=transfer, edge_s=cc.edge_s, accuracy=problem.accuracy,
                feasible=need <= deadline, shortfall_s=max(0.0, need - deadline))


def infeasible(plan: Plan, deadline: float, margin: float, where: str) -> Plan:
    """Mark the fastest plan infeasible and say so."""
    need = plan.latency_s * (1.0 + margin)
    warnings.warn(DeadlineWarning(
        f"no plan meets the deadline {format_time(deadline)} {where}: the fastest, exit {plan.exit} "
        f"cut {plan.cut.name!r}, takes {format_time(need)}"
        + (f" (with the {margin:.0%} margin)" if margin else "")
        + f", {format_time(need - deadline)} too slow; relax the deadline, add an earlier exit, "
        "or use a faster device or edge target"), stacklevel=3)
    return plan


def solve(gm: fx.GraphModule, link: Link, deadline: float = math.inf, objective: str = "accuracy",
          margin: float = 0.0) -> Plan:
    """The plan (exit, cut, predicted seconds) for `link` under `deadline` seconds.

    `objective` is "accuracy" (the most accurate exit that meets the deadline, Edgent) or
    "latency" (the final exit's fastest cut, Neurosurgeon); `margin` the relative prediction
    error the deadline must survive. With no feasible plan, warns (`DeadlineWarning`) and
    returns the fastest plan with `feasible=False`.
    """
    check_args(deadline, objective, margin)
    tried = []
    for ex in exit_order(exit_specs(gm), objective):
        problem = CutProblem(gm, ex)
        plan = make_plan(problem, best_cut(problem, link), link, deadline, margin)
        if plan.feasible:
            return plan
        tried.append(plan)
    fastest = min(tried, key=lambda p: (p.latency_s, -p.exit))
    return infeasible(fastest, deadline, margin, f"at {format_bandwidth(link.bandwidth)}")
