"""Real measurements on tiny layers: TVM through edgecut's build, loopback TCP, loading."""
import numpy as np
import pytest
from torch import nn

from edgecut import targets
from edgecut.costmodel import microbench as mb
from edgecut.costmodel.network import link, measure_message_overhead
from edgecut.frontend import meta


def test_layer_timing_through_build():
    t = targets.get("local")
    small = mb.measure(mb.Case("c", nn.Conv2d(4, 8, 3, padding=1), ((1, 4, 8, 8),)), t)
    assert len(small) == 1 and small[0].kind == meta.CONV and small[0].seconds > 0
    relu = mb.measure(mb.Case("r", nn.ReLU(), ((1, 8, 16, 16),)), t)[0]
    assert relu.kind == meta.RELU and relu.work["in_elems"] == 8 * 16 * 16


def test_grids_are_deterministic_and_cover_kinds():
    a, b = mb.grid(quick=True), mb.grid(quick=True)
    assert [c.label for c in a] == [c.label for c in b]
    labels = " ".join(c.label for c in mb.grid())
    for kind in ("conv", "dwconv", "linear", "maxpool", "avgpool", "adaptivepool", "relu", "bn", "add", "lrn"):
        assert kind in labels


def test_message_overhead_over_loopback():
    r = measure_message_overhead(sizes=(16, 65536), repeats=5)
    assert 0 < r["overhead_s"] < 0.05
    assert r["points"][1][1] >= 0
    lnk = link("8mbit", "20ms", overhead=r["overhead_s"])
    assert lnk.transfer_seconds(1_000_000) == pytest.approx(0.02 + r["overhead_s"] + 1.0)
    assert np.isfinite(lnk.transfer_seconds(1))
