"""torch.export's graph (the fallback when torch.fx cannot trace) goes through everything:
classification and MACs, cuts, exits, and segments that codegen re-exports."""
import collections
import warnings

import pytest
import torch
from mixed_model import Mixed
from torch.utils.flop_counter import FlopCounterMode

import edgecut
from edgecut import zoo
from edgecut.codegen.segment import segment_module, split
from edgecut.costmodel.profile import load_profile
from edgecut.errors import ExitError
from edgecut.frontend import meta as M
from edgecut.frontend.tracing import _export_trace
from edgecut.passes import analyze, annotate_cost, insert_exits, verify
from edgecut.passes.annotate_layers import aten_name
from edgecut.passes.find_cuts import find_cuts
from edgecut.types import Plan, PlanTable


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    m, x = Mixed().eval(), torch.randn(1, 3, 16, 16)
    return m, x, edgecut.trace(m, x)


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def test_the_export_graph_is_functional_and_every_op_classified(mixed):
    m, x, gm = mixed
    assert gm.meta[M.TRACER] == "export"
    verify(gm)
    assert [n.name for n in _calls(gm) if n.meta[M.KIND] == M.OTHER] == []
    in_place = [n.name for n in _calls(gm) if aten_name(n.target) and n.target._schema.is_mutable]
    assert in_place == []            # ReLU(inplace=True) and += became relu and add
    kinds = collections.Counter(n.meta[M.KIND] for n in _calls(gm))
    assert (kinds[M.DWCONV], kinds[M.BN], kinds[M.NORM], kinds[M.ATTENTION]) == (1, 1, 1, 2)
    assert all(n.meta[M.PARAMS] == 0 for n in gm.graph.nodes if n.op == "get_attr")  # owned by layers
    assert sum(n.meta[M.PARAMS] for n in gm.graph.nodes) == sum(p.numel() for p in m.parameters())


def test_macs_match_torch_flop_counter(mixed):
    m, x, gm = mixed
    with FlopCounterMode(display=False) as fc:  # with grad: nn.MultiheadAttention's unfused path
        m(x)
    dense = sum(n.meta[M.MACS] for n in gm.graph.nodes if n.meta[M.KIND] in (M.CONV, M.DWCONV, M.LINEAR))
    assert dense == fc.get_total_flops() // 2       # its CPU count covers conv and addmm, not attention
    # two attentions over 64 tokens, 2 heads of 8: B*H*L*S*(E+Ev) each
    assert [n.meta[M.MACS] for n in gm.graph.nodes if n.meta[M.KIND] == M.ATTENTION] == [2 * 64 * 64 * 16] * 2


def test_fx_and_export_graphs_count_the_same_work():
    m, x = zoo.get("mobilenet_v2"), torch.randn(1, 3, 64, 64)
    fx_gm = edgecut.trace(m, x)
    ex_gm = analyze(_export_trace(m, (x,)), x)
    for key in (M.MACS, M.PARAMS):
        assert sum(n.meta[key] for n in fx_gm.graph.nodes) == sum(n.meta[key] for n in ex_gm.graph.nodes), key
    conv = collections.Counter(n.meta[M.KIND] for n in fx_gm.graph.nodes if n.meta[M.KIND] in (M.CONV, M.DWCONV))
    assert conv == collections.Counter(n.meta[M.KIND] for n in ex_gm.graph.nodes
                                       if n.meta[M.KIND] in (M.CONV, M.DWCONV))


def _run_route(gm, segments, route, x):
    """Chain a route's segments, each re-exported by torch.export as codegen does."""
    env = {next(n.name for n in gm.graph.nodes if n.op == "placeholder"): x}
    for name in (*route.device, *route.edge):
        seg = next(s for s in segments if s.name == name)
        args = tuple(env[i] for i in seg.inputs)
        ep = torch.export.export(segment_module(gm, seg), args, strict=False)
        env.update(zip(seg.outputs, ep.module()(*args)))
    return env


def test_every_cut_of_an_export_graph_splits_into_segments_that_equal_the_whole(mixed):
    m, x, gm = mixed
    local = load_profile("local")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        annotate_cost(gm, local, local)
    plans = tuple(Plan(0, cut, 0.0, 0.0, 0.0) for cut in find_cuts(gm))
    assert len(plans) >= 6
    table = PlanTable(tuple(float(i) for i in range(len(plans))), plans)
    segments, routes, exits = split(gm, table)
    want = gm(x)
    with torch.no_grad():
        for plan in table.plans:
            got = _run_route(gm, segments, routes[plan.id], x)[exits[0].output]
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), plan.cut.name


def test_exits_on_an_export_graph_are_placed_or_refused_cleanly(mixed):
    m, x, gm = mixed
    points = [n.name for n in gm.graph.nodes if n.meta[M.KIND] == M.ADD]
    try:
        multi = insert_exits(gm, [points[0]])
    except ExitError as e:
        assert points[0] in str(e)
        return
    verify(multi)
    assert len(multi.meta[M.EXITS]) == 2
