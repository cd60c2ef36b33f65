import pytest
import torch
from torch import nn

import edgecut
from edgecut.errors import TraceError
from edgecut.frontend import meta
from edgecut.passes import verify


class ShapeBranch(nn.Module):
    """fx cannot trace a branch on x.shape via Python's int(); torch.export can (static shapes)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if int(y.shape[-1]) > 4:
            y = torch.relu(y)
        return y


class Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither fx nor export can trace it
            return x * 2
        return x


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = Inner()

    def forward(self, x):
        return self.inner(self.conv(x))


def test_fx_trace_equals_eager_and_is_annotated():
    m = edgecut.zoo.get("tiny_dag") if hasattr(edgecut, "zoo") else None
    from edgecut import zoo

    m = zoo.get("tiny_dag")
    x = torch.randn(1, 3, 16, 16)
    gm = edgecut.trace(m, x)
    assert gm.meta["_edgecut_tracer"] == "fx"
    assert torch.equal(gm(x), m(x))
    verify(gm)
    for n in gm.graph.nodes:
        for k in meta.REQUIRED_AFTER_ANALYSIS:
            assert k in n.meta, (n.name, k)


def test_export_fallback_for_shape_dependent_python():
    m = ShapeBranch().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = edgecut.trace(m, x)
    assert gm.meta["_edgecut_tracer"] == "export"
    assert torch.equal(gm(x), m(x))
    verify(gm)
    kinds = [n.meta[meta.KIND] for n in gm.graph.nodes]
    assert "conv" in kinds and "relu" in kinds
    conv = next(n for n in gm.graph.nodes if n.meta[meta.KIND] == "conv")
    assert conv.meta[meta.PARAMS] == 4 * 3 * 9 + 4
    assert conv.meta[meta.MACS] == 4 * 6 * 6 * 3 * 9


def test_untraceable_model_names_module_op_and_line():
    with pytest.raises(TraceError) as e:
        edgecut.trace(DataBranch().eval(), torch.randn(1, 3, 4, 4))
    msg = str(e.value)
    assert "'inner' (Inner)" in msg
    assert "if x.sum() > 0" in msg and "test_trace.py" in msg
    assert "gt" in msg  # the operation whose value Python needed
    assert "leaf_modules" in msg


def test_leaf_module_makes_it_traceable():
    m = DataBranch().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = edgecut.trace(m, x, leaf_modules=[Inner])
    assert any(n.op == "call_module" and n.target == "inner" for n in gm.graph.nodes)
    assert torch.equal(gm(x), m(x))


def test_trace_rejects_non_module():
    with pytest.raises(TraceError, match="nn.Module"):
        edgecut.trace(lambda x: x, torch.randn(1))


class _FxStops(nn.Module):
    def forward(self, x):
        if int(x.shape[-1]) > 2:       # torch.fx stops here, torch.export does not
            x = x * 2
        return x


class _ExportStops(nn.Module):
    def forward(self, x):
        return x + float(x.mean().item() > 0)   # a value of the data: torch.export stops here


class _TwoPlaces(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.conv, self.second = _FxStops(), nn.Conv2d(3, 3, 1), _ExportStops()

    def forward(self, x):
        return self.second(self.conv(self.first(x)))


def test_the_error_says_where_torch_export_stopped_when_fx_stopped_elsewhere():
    with pytest.raises(TraceError) as e:
        edgecut.trace(_TwoPlaces().eval(), torch.randn(1, 3, 4, 4))
    head, fx_line = str(e.value).splitlines()[:2]
    assert head.startswith("cannot trace _TwoPlaces: module 'second' (_ExportStops); operation: TypeError: float()")
    assert "x.mean().item() > 0" in head and "test_trace.py" in head
    assert "module 'first' (_FxStops)" in fx_line and "int(x.shape[-1]) > 2" in fx_line
