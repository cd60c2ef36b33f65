"""Edgent's exit-and-cut search, the objectives, the safety margin and the plan table."""
import math
import warnings

import pytest
import torch
from torch import nn

import edgecut
from edgecut.errors import DeadlineWarning, PlanError, UsageError
from edgecut.frontend import meta
from edgecut.passes import bandwidth_grid, find_cuts, plan_table, solve
from edgecut.passes.find_cuts import cut_problem
from edgecut.passes.plan_table import range_key
from edgecut.types import Link, PlanTable

MS = 1e-3
FAST = Link(8e6)  # one microsecond a byte


class ThreeExits(nn.Module):
    """x -> l1 -> l2 -> l3 (exit 2), with heads h0 after l1 (exit 0) and h1 after l2 (exit 1)."""

    def __init__(self):
        super().__init__()
        self.l1, self.h0 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.l2, self.h1 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.l3 = nn.Linear(8, 4)

    def forward(self, x):
        a = self.l1(x)
        b = self.l2(a)
        return self.h0(a), self.h1(b), self.l3(b)


def three_exits(accuracy=(0.6, 0.8, 0.9)):
    """Device 10 ms a layer and 1 ms a head, the edge 10x faster; x 20000 B, l1 and l2 1000 B, logits 40 B.
    At FAST: exit 2 best 13.04 ms (after:l1), exit 1 12.14 ms (after:l1), exit 0 11 ms (device)."""
    gm = edgecut.trace(ThreeExits().eval(), torch.randn(1, 8))
    cost = {"x": (0, 0, 20000), "l1": (10, 1, 1000), "l2": (10, 1, 1000), "l3": (10, 1, 40),
            "h0": (1, 0.1, 40), "h1": (1, 0.1, 40)}
    for n in gm.graph.nodes:
        if n.name in cost:
            d, e, b = cost[n.name]
            n.meta[meta.DEVICE_S], n.meta[meta.EDGE_S], n.meta[meta.OUT_BYTES] = d * MS, e * MS, b
    gm.graph.find_nodes(op="call_module", target="h0")[0].meta[meta.EXIT_ID] = 0
    gm.graph.find_nodes(op="call_module", target="h1")[0].meta[meta.EXIT_ID] = 1
    gm.meta[meta.EXITS] = [
        {"id": 0, "point": "l1", "output": "h0", "macs": 0, "accuracy": accuracy[0], "threshold": None},
        {"id": 1, "point": "l2", "output": "h1", "macs": 0, "accuracy": accuracy[1], "threshold": None},
        {"id": 2, "point": "l3", "output": "l3", "macs": 0, "accuracy": accuracy[2], "threshold": None}]
    return gm


@pytest.mark.parametrize("deadline_ms,exit_id,cut,latency_ms", [
    (100, 2, "after:l1", 13.04),   # the most accurate exit meets it
    (14, 2, "after:l1", 13.04),
    (12.5, 1, "after:l1", 12.14),  # exit 2 cannot: the next most accurate
    (11.5, 0, "device", 11.0),
])
def test_edgent_search_picks_the_most_accurate_feasible_exit(deadline_ms, exit_id, cut, latency_ms):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadlineWarning)
        plan = solve(three_exits(), FAST, deadline_ms * MS)
    assert (plan.exit, plan.cut.name, plan.feasible, plan.shortfall_s) == (exit_id, cut, True, 0.0)
    assert plan.latency_s == pytest.approx(latency_ms * MS)
    assert plan.device_s + plan.transfer_s + plan.edge_s == plan.latency_s
    assert plan.accuracy == (0.6, 0.8, 0.9)[exit_id]
    assert plan.id == f"e{exit_id}/{cut}"


def test_plan_latency_split():
    plan = solve(three_exits(), FAST, 100 * MS)
    assert plan.device_s == pytest.approx(10 * MS)                  # l1
    assert plan.transfer_s == pytest.approx((1000 + 40) * 1e-6)     # l1's output up, logits back
    assert plan.edge_s == pytest.approx(2 * MS)                     # l2, l3
    assert plan.cut.crossing == ("l1",) and plan.cut.crossing_bytes == 1000


def test_infeasible_deadline_returns_the_fastest_plan_and_warns():
    with pytest.warns(DeadlineWarning, match="no plan meets the deadline 10.0ms.*exit 0.*1.0ms too slow"):
        plan = solve(three_exits(), FAST, 10 * MS)
    assert (plan.exit, plan.cut.name, plan.feasible) == (0, "device", False)
    assert plan.shortfall_s == pytest.approx(1 * MS)


def test_latency_objective_is_neurosurgeon_on_the_final_exit():
    gm = three_exits()
    plan = solve(gm, FAST, objective="latency")
    assert (plan.exit, plan.cut.name) == (2, "after:l1") and plan.feasible
    p = cut_problem(gm)
    assert plan.latency_s == pytest.approx(min(c.latency(FAST) for c in p.chain_cuts()))
    with pytest.warns(DeadlineWarning):
        late = solve(gm, FAST, 12 * MS, objective="latency")
    assert late.exit == 2 and not late.feasible and late.shortfall_s == pytest.approx(1.04 * MS)


def test_safety_margin_plans_for_the_prediction_error():
    gm = three_exits()
    assert solve(gm, FAST, 14 * MS).exit == 2                       # 13.04 ms fits at the mean
    plan = solve(gm, FAST, 14 * MS, margin=0.1)                     # 13.04 * 1.1 = 14.34 does not
    assert plan.exit == 1 and plan.latency_s * 1.1 <= 14 * MS
    with pytest.warns(DeadlineWarning, match="with the 50% margin"):
        short = solve(gm, FAST, 14 * MS, margin=0.5)                # 11 * 1.5 = 16.5
    assert short.shortfall_s == pytest.approx(16.5 * MS - 14 * MS)


def test_exits_are_tried_by_accuracy_then_depth():
    assert solve(three_exits(accuracy=(0.6, 0.95, 0.9)), FAST, 100 * MS).exit == 1
    assert solve(three_exits(accuracy=(None, None, None)), FAST, 100 * MS).exit == 2
    # an exit whose accuracy was never measured ranks after the measured ones
    assert solve(three_exits(accuracy=(0.6, 0.8, None)), FAST, 100 * MS).exit == 1


def test_graph_without_exits_has_one():
    gm = edgecut.trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(1, 8))
    for n in gm.graph.nodes:
        n.meta[meta.DEVICE_S], n.meta[meta.EDGE_S] = 1 * MS, 0.1 * MS
    plan = solve(gm, Link(1e9), 1.0)
    assert plan.exit == 0 and math.isnan(plan.accuracy) and plan.cut.name == "input"


def test_bad_arguments_say_what_to_pass():
    gm = three_exits()
    with pytest.raises(UsageError, match="objective"):
        solve(gm, FAST, 1.0, objective="energy")
    with pytest.raises(UsageError, match="margin"):
        solve(gm, FAST, 1.0, margin=-0.1)
    with pytest.raises(UsageError, match="deadline"):
        solve(gm, FAST, 0.0)
    with pytest.raises(UsageError, match="bandwidths"):
        plan_table(gm, 1.0, bandwidths=[1e6, -1])
    with pytest.raises(UsageError, match="exit 7"):
        find_cuts(gm, exit_id=7)
    del next(n for n in gm.graph.nodes if n.name == "l2").meta[meta.EDGE_S]
    with pytest.raises(PlanError, match="'l2'.*annotate_cost"):
        solve(gm, FAST, 1.0)


# ---- plan table -------------------------------------------------------------------------------

def test_bandwidth_grid():
    grid = bandwidth_grid()
    assert len(grid) == 64 and grid[0] == pytest.approx(50e3) and grid[-1] == pytest.approx(1e9)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert max(ratios) == pytest.approx(min(ratios))


@pytest.mark.parametrize("rtt", [0.0, 3 * MS])
def test_plan_table_agrees_with_solve_at_every_bandwidth(rtt):
    gm = three_exits()
    table = plan_table(gm, 14 * MS, rtt=rtt)
    assert table.bounds[0] == pytest.approx(50e3) and list(table.bounds) == sorted(table.bounds)
    assert table.deadline == 14 * MS
    for a, b in zip(table.plans, table.plans[1:]):  # adjacent equal plans are merged
        assert range_key(a) != range_key(b)
    for bw in bandwidth_grid():
        want = solve(gm, Link(bw, rtt=rtt), 14 * MS)
        got = table.lookup(bw)
        assert range_key(got) == range_key(want), bw
    assert (table.plans[0].exit, table.plans[0].cut.name) == (0, "device")   # slow link: stay local
    assert table.plans[-1].exit == 2 and not table.plans[-1].cut.device_only  # fast link: offload
    # each range's plan is predicted at its lowest bandwidth: the slowest link it will see
    for bound, plan in zip(table.bounds, table.plans):
        assert plan.latency_s == pytest.approx(solve(gm, Link(bound, rtt=rtt), 14 * MS).latency_s)


def test_plan_table_round_trips_and_marks_infeasible_ranges():
    gm = three_exits()
    with pytest.warns(DeadlineWarning, match="of 64 bandwidths"):
        table = plan_table(gm, 5 * MS)
    assert not table.plans[0].feasible and table.plans[0].shortfall_s == pytest.approx(6 * MS)
    assert table.plans[-1].feasible
    assert PlanTable.from_dict(table.to_dict()) == table


def test_plan_table_latency_objective_and_custom_bandwidths():
    gm = three_exits()
    table = plan_table(gm, bandwidths=[1e9, 1e3, 8e6], objective="latency")
    assert table.bounds == (1e3, 8e6, 1e9)
    assert {p.exit for p in table.plans} == {2}
    assert table.lookup(8e6).cut.name == "after:l1" and table.lookup(1e3).cut.name == "device"


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.w


def test_an_exit_that_computes_nothing_is_refused():
    gm = edgecut.trace(Constant().eval(), torch.randn(1, 2))
    with pytest.raises(PlanError, match="computes nothing"):
        solve(gm, FAST, 1.0)
