"""Cut candidates and the min s-t cut against hand-made answers and against brute force."""
import math

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import edgecut
from edgecut import zoo
from edgecut.errors import PlanError
from edgecut.frontend import meta
from edgecut.passes import brute_force_cut, find_cuts, min_cut
from edgecut.passes.find_cuts import cut_problem
from edgecut.passes.mincut import DadsNetwork, MinCut, best_cut, lam_of
from edgecut.types import Link

MS = 1e-3


def set_costs(gm, costs: dict, default=(1 * MS, 0.1 * MS)):
    """costs: node name -> (device_s, edge_s[, out_bytes]); other compute nodes get `default`."""
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        c = costs.get(n.name, default)
        n.meta[meta.DEVICE_S], n.meta[meta.EDGE_S] = c[0], c[1]
        if len(c) > 2:
            n.meta[meta.OUT_BYTES] = c[2]
    return gm


def chain3():
    """x -> l1 -> l2 -> l3: device 4 ms a layer, edge 1 ms; x 1000 B, l1 100 B, l2 10 B, l3 10 B."""
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)).eval()
    gm = edgecut.trace(m, torch.randn(1, 8))
    next(n for n in gm.graph.nodes if n.op == "placeholder").meta[meta.OUT_BYTES] = 1000
    return set_costs(gm, {"_0": (4 * MS, 1 * MS, 100), "_1": (4 * MS, 1 * MS, 10), "_2": (4 * MS, 1 * MS, 10)})


def tiny_dag():
    return edgecut.trace(zoo.get("tiny_dag"), torch.randn(1, 3, 16, 16))


def test_chain_candidates_are_every_node():
    gm = edgecut.trace(zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16))
    set_costs(gm, {})
    cuts = find_cuts(gm)
    compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [c.name for c in cuts] == ["input"] + [f"after:{n}" for n in compute[:-1]] + ["device"]
    by_name = {n.name: n for n in gm.graph.nodes}
    for c in cuts[1:-1]:
        (node,) = c.crossing
        assert c.crossing_bytes == by_name[node].meta[meta.OUT_BYTES]
        assert node in c.device and "x" in c.device
    assert cuts[0].crossing == ("x",) and cuts[0].device == frozenset({"x"})
    assert cuts[-1].device_only and cuts[-1].crossing_bytes == 0


def test_dag_candidates_skip_the_inside_of_blocks():
    gm = set_costs(tiny_dag(), {})
    names = [c.name for c in find_cuts(gm)]
    # relu feeds a, the residual add and b: it is live across the block, so nothing inside is a cut
    assert names == ["input", "after:stem", "after:relu", "after:cat", "after:c", "after:relu_2",
                     "after:pool", "after:flatten", "device"]


@pytest.mark.parametrize("bandwidth,rtt,expected,latency_ms", [
    (8e3, 0.0, "device", 12.0),         # 1 ms/B: sending anything costs more than computing
    (8e4, 0.0, "after:_1", 11.0),       # 0.1 ms/B: 8 + (10 + 10) * 0.1 + 1
    (8e4, 2 * MS, "device", 12.0),      # the same cut pays the 2 ms round trip: 13 > 12
    (8e6, 0.0, "input", 4.01),          # 1 us/B: 1000 + 10 B, 3 ms on the edge
])
def test_chain_known_answers(bandwidth, rtt, expected, latency_ms):
    gm = chain3()
    link = Link(bandwidth, rtt=rtt)
    cut = min_cut(gm, link)
    assert cut.name == expected
    p = cut_problem(gm)
    cc = best_cut(p, link)
    assert cc.latency(link) == pytest.approx(latency_ms * MS)
    # the candidates of a chain are all its cuts: their best is the min cut
    assert min(c.latency(link) for c in p.chain_cuts()) == pytest.approx(cc.latency(link))


def test_limits_device_only_and_edge_only():
    gm = set_costs(tiny_dag(), {}, default=(2 * MS, 0.05 * MS))
    assert min_cut(gm, Link(1e-3)).device_only                       # bandwidth -> 0
    fast = min_cut(gm, Link(1e15))                                     # bandwidth -> infinity
    assert fast.name == "input" and fast.device == frozenset({"x"}) and fast.crossing == ("x",)
    # an edge slower than the device never gets work, whatever the bandwidth
    slow_edge = set_costs(tiny_dag(), {}, default=(1 * MS, 2 * MS))
    assert min_cut(slow_edge, Link(1e15)).device_only


def test_dag_crossing_sent_once_and_several_crossings():
    gm = tiny_dag()
    nodes = {n.name: n for n in gm.graph.nodes}
    # the edge is slow for `a`: the best cut keeps a, relu_1 on the device and sends relu and relu_1
    costs = {"stem": (1 * MS, 0.1 * MS), "relu": (0.1 * MS, 0.01 * MS), "a": (0.5 * MS, 5 * MS),
             "relu_1": (0.001 * MS, 0.01 * MS)}
    set_costs(gm, costs, default=(3 * MS, 0.1 * MS))
    link = Link(1e8)
    cut = min_cut(gm, link)
    assert cut.crossing == ("relu", "relu_1") and cut.name == "after:relu+relu_1"
    assert cut.crossing_bytes == nodes["relu"].meta[meta.OUT_BYTES] + nodes["relu_1"].meta[meta.OUT_BYTES]
    assert cut == brute_force_cut(gm, link)
    # relu alone feeds three edge nodes (a, add, b) and is paid once
    p = cut_problem(gm)
    after_relu = next(c for c in p.chain_cuts() if p.to_cut(c).name == "after:relu")
    assert after_relu.up_bytes == nodes["relu"].meta[meta.OUT_BYTES]


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return (y * self.scale).mean((2, 3))


def test_parameters_never_cross():
    gm = edgecut.trace(Scaled().eval(), torch.randn(1, 3, 8, 8))
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    set_costs(gm, {})
    for bw in (1e3, 1e6, 1e9, 1e15):
        for c in [min_cut(gm, Link(bw)), *find_cuts(gm)]:
            assert "scale" not in c.crossing
    dev = find_cuts(gm)[-1]
    assert "scale" in dev.device  # a device node uses it: it is on the device too (and on the edge)


def test_missing_costs_say_what_to_run():
    gm = tiny_dag()
    with pytest.raises(PlanError, match="stem.*annotate_cost"):
        min_cut(gm, Link(1e6))


def test_exit_subgraph_is_the_exit_ancestors():
    gm = set_costs(tiny_dag(), {})
    gm.meta[meta.EXITS] = [
        {"id": 0, "point": "cat", "output": "relu_2", "macs": 0, "accuracy": 0.5, "threshold": None},
        {"id": 1, "point": "fc", "output": "fc", "macs": 0, "accuracy": 0.9, "threshold": None}]
    dev0 = find_cuts(gm, exit_id=0)[-1]
    assert "relu_2" in dev0.device and "pool" not in dev0.device and "fc" not in dev0.device
    assert "fc" in find_cuts(gm)[-1].device  # None means the final exit


def test_real_dag_decomposed_min_cut_equals_one_network():
    gm = edgecut.trace(zoo.get("mobilenet_v2"), torch.randn(1, 3, 32, 32))
    for n in gm.graph.nodes:  # a Pi-like device and a 30x faster edge, by MACs
        macs = n.meta.get(meta.MACS, 0)
        n.meta[meta.DEVICE_S], n.meta[meta.EDGE_S] = 1e-5 + macs / 2e9, 1e-6 + macs / 6e10
    p = cut_problem(gm)
    lams = [lam_of(Link(b)) for b in (1e5, 1e6, 1e7, 1e8, 1e9)]
    mc, whole = MinCut(p, max(lams)), DadsNetwork(p, max(lams))
    flows = MinCut(p, max(lams), enumerate_up_to=0)  # every block on its own network
    assert len(mc.blocks) > 10 and all(b.cuts is None or len(b.cuts) == 1 for b in flows.blocks)
    for lam, env, env_flows in zip(lams, mc.envelope(lams), flows.envelope(lams)):
        best = p.cost(whole.solve(lam))
        for c in (mc.cut(lam), env, flows.cut(lam), env_flows):
            a, b = c.line()
            assert a + lam * b == pytest.approx(best.line()[0] + lam * best.line()[1], rel=1e-9)


# ---- property: the min cut equals brute force on random DAGs --------------------------------

def _mix(*xs):
    return xs[0] if xs else None


@st.composite
def random_dags(draw, max_nodes=12):
    n = max_nodes - draw(st.integers(0, max_nodes - 2))  # hypothesis favours the large end
    n_inputs = draw(st.integers(1, min(2, n - 1)))
    preds = [[] for _ in range(n)]
    for i in range(n_inputs, n):
        if draw(st.integers(0, 9)):  # now and then a node without inputs (a constant)
            preds[i] = sorted(set(draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=3))))
    for i in range(n - 1):  # every node feeds a later one, so all reach the last node
        if not any(i in ps for ps in preds):
            j = draw(st.integers(max(i + 1, n_inputs), n - 1))
            preds[j] = sorted(set(preds[j]) | {i})
    g = fx.Graph()
    nodes = [g.placeholder(f"x{i}") for i in range(n_inputs)]
    for i in range(n_inputs, n):
        nodes.append(g.call_function(_mix, tuple(nodes[p] for p in preds[i])))
    extra = draw(st.lists(st.sampled_from(nodes[n_inputs:-1]), max_size=2, unique=True)) if n - n_inputs > 1 else []
    g.output(tuple(extra + [nodes[-1]]) if extra else nodes[-1])  # one output, or several
    gm = fx.GraphModule(torch.nn.Module(), g)
    for nd in gm.graph.nodes:
        if nd.op == "output":
            nd.meta.update({meta.KIND: meta.OUTPUT, meta.OUT_BYTES: 0})
            continue
        nd.meta[meta.KIND] = meta.INPUT if nd.op == "placeholder" else meta.OTHER
        nd.meta[meta.OUT_BYTES] = draw(st.sampled_from([0, 40, 1000, 10_000, 100_000]))
        nd.meta[meta.DEVICE_S] = draw(st.sampled_from([0.0, 1e-4, 1e-3, 4e-3, 2e-2])) * draw(st.integers(1, 9))
        nd.meta[meta.EDGE_S] = nd.meta[meta.DEVICE_S] / draw(st.sampled_from([0.5, 3, 10, 40]))
    return gm


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gm=random_dags(), bandwidth=st.sampled_from([1e5, 2e6, 2e7, 1e8, 1e9]),
       rtt=st.sampled_from([0.0, 1e-3, 2e-2]))
def test_min_cut_equals_brute_force(gm, bandwidth, rtt):
    link = Link(bandwidth, rtt=rtt)
    p = cut_problem(gm)
    brute = min(c.latency(link) for c in p.valid_cuts())
    got = best_cut(p, link)
    assert got.latency(link) == pytest.approx(brute, rel=1e-9, abs=1e-12)
    p.cost(got.device)  # a valid cut: closed under predecessors, inputs on the device
    # the bare DADS network (one block) finds the best cut without the fixed cost
    lam = lam_of(link)
    net = p.cost(DadsNetwork(p, lam).solve(lam))
    brute_line = min(c.line()[0] + lam * c.line()[1] for c in p.valid_cuts())
    assert net.line()[0] + lam * net.line()[1] == pytest.approx(brute_line, rel=1e-9, abs=1e-12)
    # split at articulation nodes, every block on its own network
    flows = p.cost(MinCut(p, lam, enumerate_up_to=0).cut(lam).device)
    assert flows.line()[0] + lam * flows.line()[1] == pytest.approx(brute_line, rel=1e-9, abs=1e-12)
    # the public function names the same latency
    cut = min_cut(gm, link)
    assert p.cost(i for i, name in enumerate(p.names) if name in cut.device).latency(link) == \
        pytest.approx(brute, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(gm=random_dags(max_nodes=10))
def test_envelope_equals_brute_force_at_every_rate(gm):
    p = cut_problem(gm)
    lams = [8.0 / b for b in (5e4, 3e5, 2e6, 1e7, 8e7, 1e9)]
    cuts = list(p.valid_cuts())
    envelopes = [MinCut(p, max(lams), enumerate_up_to=k).envelope(lams) for k in (0, 16)]
    for k, lam in enumerate(lams):
        best = min(x.line()[0] + lam * x.line()[1] for x in cuts)
        assert math.isfinite(best)
        for env in envelopes:
            assert env[k].line()[0] + lam * env[k].line()[1] == pytest.approx(best, rel=1e-9, abs=1e-12)
