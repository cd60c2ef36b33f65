"""train_exits on real (tiny) data: the loss falls, accuracies are recorded, heads mode freezes."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import edgecut
from edgecut import data, zoo
from edgecut.errors import ExitError
from edgecut.exits import evaluate, train_exits
from edgecut.frontend import meta as M
from edgecut.passes import insert_exits


def chain_with_exits(points=("pool1",)):
    return insert_exits(edgecut.trace(zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16)), list(points))


def test_joint_loss_falls_on_a_small_batch():
    gm = chain_with_exits()
    x, y = data.digits((3, 16, 16)).train.tensors
    batch = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=32)
    losses = []
    train_exits(gm, batch, batch, epochs=8, lr=1e-2, progress=False, on_epoch=lambda e, loss: losses.append(loss))
    assert len(losses) == 8
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_digits_records_held_out_accuracy():
    splits = data.digits((3, 16, 16))
    gm = chain_with_exits()
    acc = train_exits(gm, splits.train, splits.val, epochs=3, lr=3e-3, progress=False)
    assert len(acc) == 2 and [e["accuracy"] for e in gm.meta[M.EXITS]] == acc
    assert min(acc) > 0.5, acc           # ten classes: chance is 0.1
    assert evaluate(gm, splits.val) == acc
    assert not gm.training


def test_heads_mode_freezes_the_backbone():
    gm = chain_with_exits()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    ds = data.synthetic((3, 16, 16), n=64)
    train_exits(gm, ds, ds, epochs=2, mode="heads", progress=False)
    after = gm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("edgecut_exit0.") for k in changed), changed
    assert all(p.requires_grad for p in gm.parameters())        # restored after training


def test_bad_data_and_arguments():
    gm = chain_with_exits()
    wrong = data.synthetic((3, 32, 32), n=8)
    with pytest.raises(ExitError, match=r"shape \(3, 32, 32\) but the model takes \(3, 16, 16\)"):
        train_exits(gm, wrong, wrong, epochs=1, progress=False)
    labels = TensorDataset(torch.randn(8, 3, 16, 16), torch.full((8,), 12))
    with pytest.raises(ExitError, match=r"labels must be integer classes in \[0, 10\)"):
        train_exits(gm, labels, labels, epochs=1, progress=False)
    ok = data.synthetic((3, 16, 16), n=8)
    with pytest.raises(ExitError, match="mode must be"):
        train_exits(gm, ok, ok, mode="all", progress=False)
    with pytest.raises(ExitError, match="2 non-negative numbers"):
        train_exits(gm, ok, ok, weights=[1.0], progress=False)
    plain = edgecut.trace(zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16))
    with pytest.raises(ExitError, match="insert_exits"):
        train_exits(plain, ok, ok, progress=False)


def test_heads_mode_needs_heads():
    gm = chain_with_exits(points=())
    ok = data.synthetic((3, 16, 16), n=8)
    with pytest.raises(ExitError, match="nothing to train in mode 'heads'"):
        train_exits(gm, ok, ok, mode="heads", progress=False)
    assert all(p.requires_grad for p in gm.parameters())
