"""Digits and synthetic datasets: shapes, splits, determinism, errors."""
import pytest
import torch

from edgecut import data
from edgecut.errors import UsageError


def test_digits_splits():
    s = data.digits((1, 3, 32, 32))
    assert [len(p) for p in s] == [1077, 360, 360] and sum(len(p) for p in s) == 1797
    x, y = s.train.tensors
    assert x.shape == (1077, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 2])                  # grey replicated over channels
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    for part in s:
        assert torch.bincount(part.tensors[1], minlength=10).min() >= 30   # stratified: every class everywhere
    again = data.digits((3, 32, 32))
    assert all(torch.equal(a.tensors[0], b.tensors[0]) for a, b in zip(s, again))
    from sklearn.datasets import load_digits
    counts = sum(torch.bincount(p.tensors[1], minlength=10) for p in s)
    assert counts.tolist() == torch.bincount(torch.from_numpy(load_digits().target)).tolist()
    assert data.digits((1, 8, 8)).val.tensors[0].shape[1:] == (1, 8, 8)


def test_synthetic_and_errors():
    d = data.synthetic((5, 7), n=40, num_classes=3, seed=2)
    assert d.tensors[0].shape == (40, 5, 7) and set(d.tensors[1].tolist()) <= {0, 1, 2}
    assert torch.equal(d.tensors[0], data.synthetic((5, 7), n=40, num_classes=3, seed=2).tensors[0])
    with pytest.raises(UsageError, match="give a \\(C, H, W\\) shape"):
        data.digits((64,))
    with pytest.raises(UsageError, match="positive"):
        data.synthetic((3, 0, 4))
