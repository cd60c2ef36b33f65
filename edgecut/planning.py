"""The plan table from latencies, without the graph: the planner a device runs. Torch-free.

Compile solves over the graph (`passes.plan_table`); a device has only the artifact's runnable
plans, each a `RouteCost`: its exit and accuracy, the seconds its device part and its edge part
take (predicted at compile time, or measured: `runtime.calibration`, online correction in
`runtime.client`), and the bytes it sends up and gets back. `solve_table` picks, at each
bandwidth of the grid, the most accurate route whose latency

    device_s + Link(bandwidth, rtt, overhead).transfer_seconds(up_bytes, down_bytes) + edge_s

fits the deadline, as compile does; `choose` picks one route for one request. Imports numpy,
the standard library and edgecut's torch-free types only: a device with apache-tvm, numpy and
msgpack runs it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from edgecut.errors import UsageError
from edgecut.types import Cut, Link, Plan, PlanTable

LOW_BANDWIDTH, HIGH_BANDWIDTH, GRID_POINTS = 50e3, 1e9, 64
OBJECTIVES = ("accuracy", "latency")


def bandwidth_grid(low: float = LOW_BANDWIDTH, high: float = HIGH_BANDWIDTH, points: int = GRID_POINTS) -> tuple:
    """`points` bandwidths (bit/s) from `low` to `high`, evenly spaced on a log scale."""
    if not (0 < low < high) or points < 2:
        raise UsageError(f"bandwidth grid needs 0 < low < high and >= 2 points, got {low}, {high}, {points}")
    return tuple(float(b) for b in np.geomspace(low, high, int(points)))


@dataclass(frozen=True)
class RouteCost:
    """One runnable plan as the planner sees it. `cut`: the plan's Cut when known (kept in the
    tables `solve_table` returns), else one is made from the plan id."""

    plan_id: str
    exit: int
    accuracy: float
    device_only: bool
    device_s: float
    edge_s: float
    up_bytes: int
    down_bytes: int
    cut: Cut | None = None
    link_factor: float = 1.0     # observed / modelled link time to plan with (>= 1: the link's jitter)
    codec: str = "fp32"          # how the crossing tensors travel (edgecut.codecs); up_bytes are coded bytes

    def transfer_s(self, link: Link) -> float:
        """Seconds on `link` (0 for a device-only route; a round trip even if nothing is sent up),
        times `link_factor`."""
        if self.device_only:
            return 0.0
        if self.up_bytes > 0:
            return self.link_factor * link.transfer_seconds(self.up_bytes, self.down_bytes)
        return self.link_factor * (link.rtt + link.overhead + 8.0 * self.down_bytes / link.bandwidth)

    def latency_s(self, link: Link) -> float:
        return self.device_s + self.transfer_s(link) + self.edge_s

    def plan(self, link: Link, deadline: float = math.inf, margin: float = 0.0) -> Plan:
        """This route as a `Plan` over `link`, with its feasibility under `deadline`."""
        transfer = self.transfer_s(link)
        need = (self.device_s + transfer + self.edge_s) * (1.0 + margin)
        cut = self.cut or Cut(self.plan_id.partition("/")[2].partition("@")[0] or self.plan_id, frozenset(),
                              () if self.device_only else ("?",), int(self.up_bytes))
        return Plan(self.exit, cut, self.device_s, transfer, self.edge_s, self.accuracy,
                    feasible=need <= deadline, shortfall_s=max(0.0, need - deadline), codec=self.codec)


def runnable_plans(manifest) -> list:
    """The manifest's runnable plans: `candidates` when it has them, else the table's plans and
    the fallback, each id once."""
    cands = getattr(manifest, "candidates", None)
    if isinstance(cands, dict):
        cands = list(cands.values())
    if not cands:
        cands = list(manifest.table.plans)
        fb = getattr(manifest, "fallback", None)
        if fb is not None:
            cands.append(fb)
    seen, out = set(), []
    for p in cands:
        if p.id not in seen:
            seen.add(p.id)
            out.append(p)
    return out


def _nbytes(spec) -> int:
    return int(np.dtype(spec.dtype).itemsize * math.prod(spec.shape))


def route_costs(manifest, device_s: dict | None = None, edge_s: dict | None = None) -> list[RouteCost]:
    """A RouteCost per runnable plan of `manifest`: bytes from its routes and tensor specs (the
    plan's Cut when the manifest has none), seconds predicted, or taken from `device_s` /
    `edge_s` (plan id -> seconds) where they name the plan."""
    device_s, edge_s = device_s or {}, edge_s or {}
    routes, tensors = getattr(manifest, "routes", None) or {}, getattr(manifest, "tensors", None) or {}
    exits = {e.id: e for e in getattr(manifest, "exits", ())}
    out = []
    for p in runnable_plans(manifest):
        route = routes.get(p.id)
        codec = getattr(p, "codec", "fp32")
        up, down = int(p.cut.crossing_bytes), 0
        if codec == "fp32" and route is not None and all(c in tensors for c in route.crossing):
            up = sum(_nbytes(tensors[c]) for c in route.crossing)   # coded plans: the bytes measured at compile
        local = route.device_only if route is not None else p.cut.device_only
        ex = exits.get(p.exit)
        if not local and ex is not None and ex.output in tensors:
            down = _nbytes(tensors[ex.output])
        out.append(RouteCost(p.id, int(p.exit), float(p.accuracy), bool(local),
                             float(device_s.get(p.id, p.device_s)), float(edge_s.get(p.id, p.edge_s)),
                             up, down, p.cut, codec=codec))
    return out


def _rank(r: RouteCost, objective: str) -> tuple:
    """Smaller is preferred before latency: the exit order of compile (`passes.solve.exit_order`):
    known accuracy before unknown, higher accuracy, then the deeper exit. A coded route's
    accuracy is measured with its codec (`passes.codec_plans`), so a codec that costs accuracy
    is taken only when no more accurate route fits; one that costs none competes on latency."""
    if objective == "latency":
        return (0,)
    known = not math.isnan(r.accuracy)
    return (not known, -r.accuracy if known else 0.0, -r.exit)


def _tie(r: RouteCost) -> tuple:
    """Among equally fast routes: device-only, then the later cut (more work on the device), so
    that adjacent ranges keep one choice."""
    return (not r.device_only, -r.device_s, r.plan_id)


def _pick(routes, link: Link, deadline: float, objective: str, margin: float) -> tuple[RouteCost, bool]:
    """(route, feasible): the best feasible route, or the fastest one."""
    if objective == "latency":            # Neurosurgeon: the final exit only
        final = max(r.exit for r in routes)
        routes = [r for r in routes if r.exit == final]
    lat = {r.plan_id: r.latency_s(link) for r in routes}
    fits = [r for r in routes if lat[r.plan_id] * (1.0 + margin) <= deadline]
    if fits:
        return min(fits, key=lambda r: (_rank(r, objective), lat[r.plan_id], _tie(r))), True
    return min(routes, key=lambda r: (lat[r.plan_id], -r.exit, _tie(r))), False


def check_args(deadline: float, objective: str, margin: float) -> None:
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if not (isinstance(deadline, numbers.Real) and deadline > 0):
        raise UsageError(f"deadline must be a positive number of seconds (math.inf for none), got {deadline!r}")
    if not (isinstance(margin, numbers.Real) and 0 <= margin < math.inf):
        raise UsageError(f"margin is a relative prediction error such as 0.1 (10%), got {margin!r}")


def _check(routes, deadline, objective, margin) -> list:
    routes = list(routes)
    if not routes:
        raise UsageError("no routes to plan with: the artifact lists no runnable plan")
    check_args(deadline, objective, margin)
    return routes


def range_key(plan: Plan) -> tuple:
    """What makes two adjacent ranges different plans: the exit, the bytes that cross (none for
    device-only) and feasibility. Two cuts that send the same bytes are the same plan to the
    device (their predicted times differ only by a tie), so a range keeps its first cut rather
    than flapping between them."""
    return plan.exit, plan.cut.device_only, plan.cut.crossing_bytes, plan.feasible, plan.codec


def solve_table(routes, deadline: float = math.inf, *, rtt: float = 0.0, overhead: float = 0.0,
                bandwidths=None, objective: str = "accuracy", margin: float = 0.0) -> PlanTable:
    """The plan per bandwidth range: at each bandwidth of `bandwidths` (default `bandwidth_grid()`)
    the most accurate route that fits `deadline` (ties: the faster, then device-only, then the
    later cut); where none fits, the fastest, marked infeasible with its shortfall. Adjacent
    bandwidths with the same `range_key` (exit, crossing bytes, feasibility) merge into one range; each range's Plan holds the seconds
    used at its lowest bandwidth."""
    routes = _check(routes, deadline, objective, margin)
    bws = sorted(float(b) for b in (bandwidth_grid() if bandwidths is None else bandwidths))
    if not bws or any(not (b > 0 and math.isfinite(b)) for b in bws) or len(set(bws)) != len(bws):
        raise UsageError("bandwidths must be distinct positive finite numbers of bit/s")
    bounds, plans = [], []
    for bw in bws:
        link = Link(bw, rtt, overhead)
        route, _ = _pick(routes, link, deadline, objective, margin)
        plan = route.plan(link, deadline, margin)
        if plans and range_key(plans[-1]) == range_key(plan):
            continue
        bounds.append(bw)
        plans.append(plan)
    return PlanTable(tuple(bounds), tuple(plans), float(deadline))


def choose(routes, bandwidth: float | None, deadline: float = math.inf, *, rtt: float = 0.0,
           overhead: float = 0.0, edge_available: bool = True, objective: str = "accuracy",
           margin: float = 0.0) -> RouteCost:
    """The route for one request at `bandwidth` bit/s (None or <= 0: no usable link, device-only
    routes only; math.inf: transfers cost their round trip only). Infeasible everywhere: the
    fastest route (check with `feasible`)."""
    routes = _check(routes, deadline, objective, margin)
    if not edge_available or bandwidth is None or not bandwidth > 0:
        local = [r for r in routes if r.device_only]
        if local:
            routes = local
        bandwidth = math.inf
    return _pick(routes, Link(bandwidth, rtt, overhead), deadline, objective, margin)[0]


def feasible(route: RouteCost, bandwidth: float, deadline: float, *, rtt: float = 0.0, overhead: float = 0.0) -> bool:
    """Whether `route` fits `deadline` at `bandwidth` bit/s."""
    return route.latency_s(Link(max(bandwidth, 1e-9), rtt, overhead)) <= deadline


def with_times(routes, device_s: dict | None = None, edge_s: dict | None = None) -> list[RouteCost]:
    """`routes` with their device and edge seconds replaced where the dicts name them."""
    device_s, edge_s = device_s or {}, edge_s or {}
    return [replace(r, device_s=float(device_s.get(r.plan_id, r.device_s)),
                    edge_s=float(edge_s.get(r.plan_id, r.edge_s))) for r in routes]
