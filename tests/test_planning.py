"""The torch-free planner: choices, tie-breaks, infeasible deadlines, and agreement with compile."""
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import edgecut
from edgecut import zoo
from edgecut.costmodel.profile import load_profile
from edgecut.errors import UsageError
from edgecut.planning import RouteCost, bandwidth_grid, choose, route_costs, solve_table, with_times
from edgecut.types import Link

MS = 1e-3


def rc(pid, exit=1, acc=0.9, device_s=0.0, edge_s=0.0, up=0, down=40):
    return RouteCost(pid, exit, acc, up == 0 and pid.endswith("/device"), device_s, edge_s, up,
                     0 if pid.endswith("/device") else down)


ROUTES = [rc("e1/device", device_s=40 * MS),
          rc("e1/mid", device_s=10 * MS, edge_s=2 * MS, up=10_000),
          rc("e1/input", edge_s=3 * MS, up=100_000),
          rc("e0/device", exit=0, acc=0.7, device_s=8 * MS)]


def test_most_accurate_fitting_route_per_bandwidth():
    t = solve_table(ROUTES, 30 * MS)
    assert [p.id for p in t.plans] == ["e0/device", "e1/mid", "e1/input"]
    for p in t.plans:
        assert p.feasible and p.latency_s <= 30 * MS
    # each range holds the plan chosen at its lowest bandwidth, with the seconds used
    mid = t.by_id("e1/mid")
    assert mid.transfer_s == pytest.approx(Link(t.bounds[1]).transfer_seconds(10_000, 40))
    assert mid.device_s == 10 * MS and mid.edge_s == 2 * MS
    assert choose(ROUTES, 1e5, 30 * MS).plan_id == "e0/device"
    assert choose(ROUTES, 1e9, 30 * MS).plan_id == "e1/input"
    assert choose(ROUTES, 1e9, 30 * MS, edge_available=False).plan_id == "e0/device"
    assert choose(ROUTES, None, math.inf).plan_id == "e1/device"


def test_rtt_and_overhead_count_for_offloading_only():
    # at 1 Gbit/s edge-only takes 3.8 ms; with a 10 ms round trip 13.8 ms, with 5 ms more overhead 18.8
    assert choose(ROUTES, 1e9, 12 * MS).plan_id == "e1/input"
    assert choose(ROUTES, 1e9, 14 * MS, rtt=10 * MS).plan_id == "e1/input"
    assert choose(ROUTES, 1e9, 13 * MS, rtt=10 * MS).plan_id == "e0/device"
    assert choose(ROUTES, 1e9, 18 * MS, rtt=10 * MS, overhead=5 * MS).plan_id == "e0/device"


def test_ties_prefer_faster_then_device_only_then_later_cut():
    same = [rc("e1/input", edge_s=10 * MS, up=1000), rc("e1/mid", device_s=5 * MS, edge_s=5 * MS, up=1000),
            rc("e1/device", device_s=10 * MS)]
    # at infinite bandwidth all three take 10 ms (+ 80 us of logits): device-only has no transfer
    assert choose(same, math.inf, 1.0).plan_id == "e1/device"
    offl = same[:2]
    assert choose(offl, math.inf, 1.0).plan_id == "e1/mid"       # later cut
    # equal accuracy, different exits: the deeper exit first (compile's exit order)
    two = [rc("e0/device", exit=0, acc=0.8, device_s=1 * MS), rc("e1/device", exit=1, acc=0.8, device_s=5 * MS)]
    assert choose(two, 1e6, 1.0).plan_id == "e1/device"
    # unknown accuracy ranks after known
    nan = [rc("e0/device", exit=0, acc=0.6, device_s=1 * MS), rc("e1/device", exit=1, acc=math.nan, device_s=1 * MS)]
    assert choose(nan, 1e6, 1.0).plan_id == "e0/device"
    # a faster plan of the same exit wins over a slower one
    assert choose([rc("e1/a", up=10, edge_s=1 * MS), rc("e1/b", up=10, edge_s=2 * MS)], 1e9, 1.0).plan_id == "e1/a"


def test_adjacent_equal_choices_merge_and_do_not_flap():
    same = [rc("e1/input", edge_s=10 * MS, up=1000), rc("e1/device", device_s=10 * MS)]
    t = solve_table(same, 1.0)
    assert [p.id for p in t.plans] == ["e1/device"]
    assert t.bounds == (bandwidth_grid()[0],)


def test_infeasible_is_the_fastest_with_shortfall():
    t = solve_table(ROUTES, 1 * MS)
    assert all(not p.feasible for p in t.plans)
    lo = t.lookup(1e5)
    assert lo.id == "e0/device" and lo.shortfall_s == pytest.approx(7 * MS)
    hi = t.lookup(1e9)
    assert hi.id == "e1/input" and hi.shortfall_s == pytest.approx(hi.latency_s - 1 * MS)
    r = choose(ROUTES, 1e9, 1 * MS)
    assert r.plan_id == "e1/input"


def test_objective_latency_and_bad_arguments():
    assert choose(ROUTES, 1e5, 30 * MS, objective="latency").plan_id == "e1/device"
    with pytest.raises(UsageError, match="objective"):
        solve_table(ROUTES, 1.0, objective="fast")
    with pytest.raises(UsageError, match="deadline"):
        choose(ROUTES, 1e6, 0)
    with pytest.raises(UsageError, match="no routes"):
        solve_table([], 1.0)
    with pytest.raises(UsageError, match="bandwidths"):
        solve_table(ROUTES, 1.0, bandwidths=[1e6, -1])


def test_with_times_overrides_by_plan_id():
    r = with_times(ROUTES, device_s={"e1/mid": 0.5}, edge_s={"e1/input": 0.25})
    assert r[1].device_s == 0.5 and r[2].edge_s == 0.25 and r[0] == ROUTES[0]


def test_planner_imports_without_torch():
    code = textwrap.dedent('''
        import sys
        sys.modules["torch"] = None
        sys.modules["networkx"] = None
        import edgecut.planning as p
        r = [p.RouteCost("e0/device", 0, 0.5, True, 0.01, 0.0, 0, 0)]
        assert p.solve_table(r, 1.0).plans[0].id == "e0/device"
        assert not any(m.startswith(("torch", "sklearn", "networkx")) for m in sys.modules if sys.modules[m])
        print("ok")
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@pytest.mark.parametrize("name,deadline", [("tiny_chain", math.inf), ("tiny_chain", 0.05), ("tiny_dag", 0.02)])
def test_reproduces_the_compiled_table(name, deadline, tmp_path):
    """With the predicted times, solving over the table's own plans gives compile's choice at every
    grid bandwidth (compile chose among all cuts; its choices are among the table's plans)."""
    edge = load_profile("local")
    m, x = zoo.get(name), torch.randn(*zoo.default_input_shape(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = edgecut.compile(m, x, target="local", edge="local", deadline=deadline, exits=None,
                              profile=edge.scaled(20), edge_profile=edge, out_dir=tmp_path / name, progress=False)
    man, info = art.manifest, art.manifest.info
    routes = route_costs(man)
    assert {r.plan_id for r in routes} >= {p.id for p in man.table.plans}
    for r in routes:
        if r.plan_id in man.routes and not r.device_only:
            assert r.up_bytes == man.table.by_id(r.plan_id).cut.crossing_bytes if r.plan_id in \
                {p.id for p in man.table.plans} else r.up_bytes > 0
    ours = solve_table(routes, man.table.deadline, rtt=info["rtt"], overhead=info["overhead"],
                       margin=info.get("margin", 0.0))
    for bw in bandwidth_grid():
        want, got = man.table.lookup(bw), ours.lookup(bw)
        assert got.id == want.id, bw
        assert got.feasible == want.feasible
    assert len(ours.plans) <= len(man.table.plans) + 1    # the fallback is a candidate too
