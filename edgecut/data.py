"""Real data without a download, and synthetic data for any input shape.

`digits(shape)`: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes),
resized to a model's input (bilinear), replicated over channels, normalised with the training
split's mean and standard deviation, split train/val/test (60/20/20, stratified, fixed seed).
`synthetic(shape)`: random inputs whose labels a model can learn (a fixed random projection
decides the class), for shapes digits cannot fill.

Shapes are one sample's shape without the batch dimension, e.g. (3, 32, 32); a model input
shape with a leading batch of 1, e.g. (1, 3, 32, 32), is accepted too.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from edgecut.errors import UsageError

NUM_DIGIT_CLASSES = 10


class Splits(NamedTuple):
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def sample_shape(shape) -> tuple[int, ...]:
    """One sample's shape: (1, C, H, W) -> (C, H, W); anything else is returned as ints."""
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise UsageError(f"bad shape {shape!r}: expected a tuple of ints such as (3, 32, 32)") from None
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"bad shape {shape!r}: every dimension must be positive")
    return shape


def digits(shape=(3, 32, 32), *, val: float = 0.2, test: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's digits as (train, val, test) `TensorDataset`s of (image, label), images of
    `shape` = (C, H, W) in float32, labels int64. Deterministic for a given `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    shape = sample_shape(shape)
    if len(shape) != 3:
        raise UsageError(f"digits are images: give a (C, H, W) shape, not {shape}")
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise UsageError(f"val={val} and test={test} must be fractions that leave training data")
    x, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    rest, test_idx = train_test_split(idx, test_size=test, stratify=y, random_state=seed)
    train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=y[rest], random_state=seed)
    images = torch.from_numpy(x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    c, h, w = shape
    if (h, w) != (8, 8):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    images = images.expand(-1, c, h, w).contiguous()
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    labels = torch.from_numpy(y.astype(np.int64))

    def part(ix):
        ix = torch.from_numpy(ix)
        return TensorDataset(images[ix], labels[ix])

    return Splits(part(train_idx), part(val_idx), part(test_idx))


def synthetic(shape, n: int = 512, num_classes: int = 10, *, seed: int = 0) -> TensorDataset:
    """`n` random samples of `shape` with labels a model can learn: label = argmax of a fixed
    random linear projection of the sample. Deterministic for a given `seed`."""
    shape = sample_shape(shape)
    if n <= 0 or num_classes < 2:
        raise UsageError(f"synthetic needs n > 0 and num_classes >= 2, got n={n}, num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    proj = torch.randn((int(np.prod(shape)), num_classes), generator=g)
    y = (x.reshape(n, -1) @ proj).argmax(dim=1)
    return TensorDataset(x, y)
