"""Entropy early exit: the rule, the calibration's budget and monotone thresholds."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import edgecut
from edgecut import data
from edgecut.errors import ExitError
from edgecut.exits import calibrate_thresholds, early_exit_report, entropy, exit_index, train_exits
from edgecut.frontend import meta as M
from edgecut.passes import insert_exits


@pytest.fixture(scope="module")
def trained():
    """A small conv net on 16x16 digits whose final exit beats its early exits (tiny_chain's does not)."""
    torch.manual_seed(0)
    splits = data.digits((1, 16, 16))
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    gm = insert_exits(edgecut.trace(net, torch.randn(1, 1, 16, 16)), ["_0", "_2", "_4"])
    acc = train_exits(gm, splits.train, splits.val, epochs=3, lr=1e-2, progress=False)
    assert acc[-1] > max(acc[:-1]), acc
    return gm, splits


def test_entropy_and_rule():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    h = entropy(z)
    assert h[0] == pytest.approx(math.log(4)) and h[1] == pytest.approx(0.0, abs=1e-30)
    want = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
    assert np.allclose(h, want.double().numpy())
    hs = np.array([[0.1, 0.1, 0.1], [0.9, 0.2, 0.1], [0.9, 0.9, 0.9]])
    assert exit_index(hs, [0.5, 0.5, math.inf]).tolist() == [0, 1, 2]
    assert exit_index(hs, [-math.inf, -math.inf, math.inf]).tolist() == [2, 2, 2]


def test_thresholds_monotone_in_budget(trained):
    gm, splits = trained
    budgets = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 1.0]
    reports = [calibrate_thresholds(gm, splits.val, b, store=False) for b in budgets]
    for b, r in zip(budgets, reports):
        assert r.accuracy >= r.final_accuracy - b - 1e-9          # the budget holds on the calibration data
        assert sum(r.fractions) == pytest.approx(1.0) and r.thresholds[-1] == math.inf
    for lo, hi in zip(reports, reports[1:]):
        assert all(a <= b for a, b in zip(lo.thresholds, hi.thresholds)), (lo.thresholds, hi.thresholds)
        assert lo.macs >= hi.macs - 1e-6
    assert reports[-1].fractions[0] == 1.0                      # any loss allowed: everyone leaves at exit 0
    assert len({r.level for r in reports}) >= 3                  # the budget really moves the thresholds
    assert reports[0].fractions[-1] > 0.1 and reports[0].accuracy >= reports[0].final_accuracy
    assert any(M.EXIT_ID in n.meta for n in gm.graph.nodes)


def test_thresholds_travel_with_the_model(trained):
    gm, splits = trained
    for e in gm.meta[M.EXITS]:
        e["threshold"] = None
    with pytest.raises(ExitError, match="no calibrated thresholds"):
        early_exit_report(gm, splits.test)
    r = calibrate_thresholds(gm, splits.val, 0.02)
    assert [e["threshold"] for e in gm.meta[M.EXITS]] == list(r.thresholds)
    test = early_exit_report(gm, splits.test)
    assert test.thresholds == r.thresholds and 0 < test.accuracy <= 1
    assert "early exit accuracy" in test.table()
    with pytest.raises(ExitError, match="max_loss"):
        calibrate_thresholds(gm, splits.val, 5)


def test_rule_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgecut.exits import entropy, exit_index\n"
            "print(exit_index(entropy([[0.0, 9.0], [1.0, 1.0]])[:, None].repeat(2, 1), [0.5, float('inf')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[0", "1]"]
