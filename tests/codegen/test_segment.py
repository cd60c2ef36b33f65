"""Splitting fx graphs into segments at the plan table's cuts (pure torch.fx; no TVM)."""
import math

import pytest
import torch
from conftest import make_cut, make_table, three_cuts
from torch import nn

import edgecut
from edgecut.codegen.importer import import_segment
from edgecut.codegen.segment import charged_macs, segment_module, split
from edgecut.errors import CodegenError
from edgecut.frontend import meta
from edgecut.passes.insert_exits import insert_exits
from edgecut.types import Cut, Plan, PlanTable


def run_route(gm, segs, route, x, early_exit=False, exits=()):
    """Chain the segment GraphModules of one route in torch; (exit id, logits)."""
    by_name = {s.name: s for s in segs}
    env = {n.name: x for n in gm.graph.nodes if n.op == "placeholder"}

    def run(name):
        s = by_name[name]
        outs = segment_module(gm, s)(*[env[i] for i in s.inputs])
        env.update(zip(s.outputs, outs))

    for k in range(len(route.device) + 1):
        for kk, eid, heads in (route.checks if early_exit else ()):
            if kk == k:
                for h in heads:
                    run(h)
                return eid, env[exits[eid].output]
        if k < len(route.device):
            run(route.device[k])
    assert set(route.crossing) <= set(env)
    if route.edge:                     # the edge starts from the crossing tensors only
        kept = {c: env[c] for c in route.crossing}
        env.clear()
        env.update(kept)
    for name in route.edge:
        run(name)
    return route.exit, env[next(e for e in exits if e.id == route.exit).output]


def test_chain_three_cuts(tiny):
    model, x, gm = tiny("tiny_chain")
    table = make_table(gm, three_cuts(gm, ["pool1"]))
    segs, routes, exits = split(gm, table)
    assert len(segs) == 3        # the whole model (input and device share it), and each side of the middle cut
    assert routes["e0/input"].edge == routes["e0/device"].device
    assert routes["e0/input"].device == () and routes["e0/input"].crossing == ("x",)
    assert routes["e0/mid"].crossing == ("pool1",)
    assert routes["e0/device"].edge == () and routes["e0/device"].crossing == ()
    want = model(x)
    for route in routes.values():
        _, got = run_route(gm, segs, route, x, exits=exits)
        assert torch.equal(got, want), route.plan_id


def test_dag_cut_crosses_several_tensors(tiny):
    model, x, gm = tiny("tiny_dag")
    table = make_table(gm, three_cuts(gm, ["add"]))
    segs, routes, exits = split(gm, table)
    assert routes["e0/mid"].crossing == ("relu", "add")   # the residual arm and the sum both cross
    for route in routes.values():
        _, got = run_route(gm, segs, route, x, exits=exits)
        assert torch.equal(got, model(x))


def test_a_route_pays_one_call_per_side_whatever_other_cuts_exist(tiny):
    model, x, gm = tiny("tiny_chain")
    cuts = [make_cut(gm, [n], n) for n in ("conv1", "pool1", "relu2", "fc")]
    segs, routes, exits = split(gm, make_table(gm, cuts))
    by_name = {s.name: s for s in segs}
    r = routes["e0/relu2"]
    assert len(r.device) == 1 and len(r.edge) == 1
    assert by_name[r.device[0]].nodes == ("conv1", "relu1", "pool1", "conv2", "relu2")
    assert by_name[r.edge[0]].nodes == ("pool2", "flatten", "fc") and by_name[r.edge[0]].inputs == ("relu2",)
    assert by_name[r.device[0]].macs == round(sum(charged_macs(n) for n in gm.graph.nodes
                                                  if n.name in by_name[r.device[0]].nodes)) > 0
    for route in routes.values():
        _, got = run_route(gm, segs, route, x, exits=exits)
        assert torch.equal(got, model(x)), route.plan_id


def test_multi_exit_routes_and_early_exit(tiny):
    model, x, gm = tiny("tiny_chain")
    tv = insert_exits(gm, ["pool1"])
    tv.meta[meta.EXITS][0]["threshold"] = 1.0
    mid = make_cut(tv, ["conv2"], "mid", exit_id=1)
    table = make_table(tv, [(0, make_cut(tv, [tv.meta[meta.EXITS][0]["output"]], "device", 0)),
                            (1, mid), (1, make_cut(tv, [], "input", 1))])
    segs, routes, exits = split(tv, table)
    want = tv(x)
    r = routes["e1/mid"]
    assert r.checks and r.checks[0][1] == 0               # exit 0's head may stop it on the device
    head_nodes = {n for h in r.checks[0][2] for s in segs if s.name == h for n in s.nodes}
    assert exits[0].output in head_nodes and "conv2" not in head_nodes
    assert r.checks[0][0] == 1 and len(r.device) == 2      # one span to the branch point, one after it
    assert "conv2" in next(s.nodes for s in segs if s.name == r.device[1])
    eid, got = run_route(tv, segs, r, x, early_exit=True, exits=exits)
    assert eid == 0 and torch.equal(got, want[0])
    eid, got = run_route(tv, segs, r, x, early_exit=False, exits=exits)
    assert eid == 1 and torch.equal(got, want[1])
    assert routes["e1/input"].checks == ()                # nothing of exit 0 runs on the device
    eid, got = run_route(tv, segs, routes["e0/device"], x, exits=exits)
    assert eid == 0 and torch.equal(got, want[0])


def test_lowered_view_uses_its_own_exit(tiny):
    from edgecut.passes.lower_exit import lower_exit

    model, x, gm = tiny("tiny_chain")
    low = lower_exit(insert_exits(gm, ["pool1"]), 0)
    cuts = [make_cut(low, [], "input"), make_cut(low, ["pool1"], "mid")]
    segs, routes, exits = split(low, make_table(low, cuts))
    assert [e.id for e in exits] == [0]
    _, got = run_route(low, segs, routes["e0/mid"], x, exits=exits)
    assert torch.equal(got, low(x))


def test_cut_not_closed_under_predecessors(tiny):
    _, _, gm = tiny("tiny_chain")
    bad = Cut("bad", frozenset({"x", "conv1", "pool1"}), ("pool1",))
    with pytest.raises(CodegenError, match="closed under predecessors"):
        split(gm, PlanTable((0.0,), (Plan(0, bad, 0, 0, 0),)))


def test_unknown_node_and_exit(tiny):
    _, _, gm = tiny("tiny_chain")
    with pytest.raises(CodegenError, match="another graph"):
        split(gm, PlanTable((0.0,), (Plan(0, Cut("c", frozenset({"x", "nope"})), 0, 0, 0),)))
    with pytest.raises(CodegenError, match="names exit 0, but the graph has exits \\[3\\]"):
        split(gm, PlanTable((0.0, 1.0), (Plan(0, make_cut(gm, [], "a"), 0, 0, 0),
                                          Plan(3, make_cut(gm, [], "b"), 0, 0, 0))))


def test_unsupported_op_names_op_and_node():
    from edgecut.codegen.importer import ImportFailed

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.linalg.det(self.conv(x))

    x = torch.randn(1, 3, 8, 8)
    gm = edgecut.trace(M().eval(), x)
    with pytest.raises(ImportFailed) as e:
        import_segment(gm, [(x.shape, "float32")], name="seg0")
    assert e.value.op == "_linalg_det.default" and e.value.node == "linalg_det"
    assert "segment seg0" in str(e.value) and "torch.export" in str(e.value) and "fx" in str(e.value)


def test_lrn_imports_and_matches_torch():
    import numpy as np
    import tvm
    from tvm import relax

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0)

        def forward(self, x):
            return self.lrn(x)

    x = torch.randn(1, 12, 5, 5)
    gm = torch.fx.symbolic_trace(M())
    mod, params = import_segment(gm, [(x.shape, "float32")])
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    assert np.abs(got - M()(x).numpy()).max() < 1e-5
    assert not math.isnan(got.sum())
