"""Metadata against hand-computed values."""
import pytest
import torch
import torch.fx as fx
from torch import nn

import edgecut
from edgecut.errors import PassError, VerifyError
from edgecut.frontend import meta
from edgecut.passes import Pipeline, annotate_layers, annotate_shapes, verify
from edgecut.passes.infra import NodeError


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_conv_metadata():
    m = nn.Sequential(nn.Conv2d(3, 16, kernel_size=5, stride=2, padding=2)).eval()
    gm = edgecut.trace(m, torch.randn(1, 3, 32, 32))
    n = node(gm, "_0")
    assert n.meta[meta.KIND] == meta.CONV
    assert n.meta[meta.SHAPE] == (1, 16, 16, 16)
    assert n.meta[meta.DTYPE] == "float32"
    assert n.meta[meta.OUT_BYTES] == 16 * 16 * 16 * 4
    assert n.meta[meta.MACS] == 16 * 16 * 16 * 3 * 25
    assert n.meta[meta.PARAMS] == 16 * 3 * 25 + 16
    assert n.meta[meta.PARAM_BYTES] == (16 * 3 * 25 + 16) * 4
    # Edgent: x1 = input feature-map elements, x2 = (kernel/stride)^2 * filters
    assert n.meta[meta.FEATURES] == (3 * 32 * 32, (5 / 2) ** 2 * 16)


def test_depthwise_conv_metadata():
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)).eval()
    gm = edgecut.trace(m, torch.randn(1, 8, 10, 10))
    n = node(gm, "_0")
    assert n.meta[meta.KIND] == meta.DWCONV
    assert n.meta[meta.MACS] == 8 * 10 * 10 * 9
    assert n.meta[meta.PARAMS] == 8 * 9
    assert n.meta[meta.FEATURES] == (800.0, 9 * 8.0)


def test_linear_metadata():
    m = nn.Sequential(nn.Linear(100, 7)).eval()
    gm = edgecut.trace(m, torch.randn(2, 100))
    n = node(gm, "_0")
    assert n.meta[meta.KIND] == meta.LINEAR
    assert n.meta[meta.MACS] == 2 * 7 * 100
    assert n.meta[meta.PARAMS] == 707
    assert n.meta[meta.FEATURES] == (200.0, 14.0)


def test_pool_metadata():
    m = nn.Sequential(nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(2)).eval()
    gm = edgecut.trace(m, torch.randn(1, 4, 9, 9))
    mp, ap = node(gm, "_0"), node(gm, "_1")
    assert mp.meta[meta.KIND] == meta.MAXPOOL and mp.meta[meta.SHAPE] == (1, 4, 4, 4)
    assert mp.meta[meta.FEATURES] == (4 * 81.0, 64.0)
    assert mp.meta[meta.MACS] == 0 and mp.meta[meta.PARAMS] == 0
    assert ap.meta[meta.KIND] == meta.ADAPTIVE_POOL and ap.meta[meta.FEATURES] == (64.0, 16.0)


def test_relu_lrn_dropout_features_are_input_size():
    m = nn.Sequential(nn.ReLU(), nn.LocalResponseNorm(3), nn.Dropout(0.5)).eval()
    gm = edgecut.trace(m, torch.randn(1, 4, 5, 5))
    kinds = [(n.meta[meta.KIND], n.meta[meta.FEATURES]) for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds == [(meta.RELU, (100.0,)), (meta.LRN, (100.0,)), (meta.DROPOUT, (100.0,))]


def test_functional_ops_are_classified():
    class F(nn.Module):
        def forward(self, x, y):
            return torch.cat([x + y, x * y], 1).flatten(1)

    gm = edgecut.trace(F(), torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    kinds = [n.meta[meta.KIND] for n in gm.graph.nodes]
    assert kinds == ["input", "input", "add", "mul", "concat", "reshape", "output"]


def test_pipeline_error_names_pass_and_node():
    def bad_pass(gm):
        for n in gm.graph.nodes:
            if n.op == "call_module":
                raise NodeError(n, "cannot handle this")
        return gm

    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    with pytest.raises(PassError, match=r"pass 'bad_pass' failed at node '_0': cannot handle this"):
        Pipeline([bad_pass])(gm)


def test_pipeline_verify_catches_a_pass_that_breaks_the_graph():
    def leaves_dead_node(gm):
        x = next(iter(gm.graph.nodes))
        with gm.graph.inserting_after(x):
            gm.graph.call_function(torch.neg, (x,))
        gm.recompile()
        return gm

    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    with pytest.raises(PassError, match="leaves_dead_node.*dead"):
        Pipeline([leaves_dead_node], verify=True)(gm)


def test_analysis_pipeline_is_a_no_op_on_numerics():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 6)
    gm = fx.symbolic_trace(m)
    before = [n.format_node() for n in gm.graph.nodes]
    gm = Pipeline([lambda g: annotate_shapes(g, x), annotate_layers], verify=True)(gm)
    assert [n.format_node() for n in gm.graph.nodes] == before
    assert torch.equal(gm(x), m(x))


def test_verify_rejects_bad_metadata():
    gm = edgecut.trace(nn.Sequential(nn.ReLU()), torch.randn(2))
    node(gm, "_0").meta[meta.MACS] = -1
    with pytest.raises(VerifyError, match="_0"):
        verify(gm)
