"""Training and evaluating exits on CPU: BranchyNet's weighted joint loss, or heads only.

Works on the training view from `edgecut.passes.insert_exits` (forward returns every exit's
logits, ordered by exit id). Records each exit's held-out accuracy in `gm.meta[EXITS][i]["accuracy"]`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from edgecut.errors import ExitError
from edgecut.frontend import meta as M

Data = Dataset | DataLoader


def exits_of(gm: fx.GraphModule) -> list[dict]:
    """The graph's exit table, or an ExitError that says how to get one."""
    exits = gm.meta.get(M.EXITS) if isinstance(gm, fx.GraphModule) else None
    if not exits:
        raise ExitError("this model has no exits: run edgecut.passes.insert_exits(edgecut.trace(model, x)) "
                        "and train the graph it returns")
    return exits


def joint_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """BranchyNet's loss: the weighted sum of every exit's cross-entropy."""
    return sum(w * F.cross_entropy(z, target) for w, z in zip(weights, logits) if w)


def input_shape(gm: fx.GraphModule) -> tuple[int, ...]:
    """The shape of one sample the graph takes (its traced input shape without the batch)."""
    shapes = [n.meta.get(M.SHAPE) for n in gm.graph.nodes if n.op == "placeholder"]
    if len(shapes) != 1 or not isinstance(shapes[0], tuple):
        raise ExitError(f"exit training needs a model with one analysed tensor input; this one has {len(shapes)}")
    return tuple(shapes[0][1:])


def loader(data: Data, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """`data` itself when it is a DataLoader, else a DataLoader over it."""
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise ExitError(f"expected a torch Dataset or DataLoader, got {type(data).__name__}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)


def check_data(gm: fx.GraphModule, batches: DataLoader, what: str) -> None:
    """Raise an ExitError naming both shapes when `batches` does not fit the model's input."""
    want = input_shape(gm)
    first = next(iter(batches), None)
    if first is None:
        raise ExitError(f"the {what} data is empty")
    if not (isinstance(first, (tuple, list)) and len(first) >= 2 and isinstance(first[0], torch.Tensor)):
        raise ExitError(f"the {what} data must give (input, label) pairs, got {type(first).__name__}")
    got = tuple(first[0].shape[1:])
    if got != want:
        raise ExitError(f"the {what} samples have shape {got} but the model takes {want} "
                        f"(traced input {(1, *want)}); resize the data (e.g. edgecut.data.digits({want})) "
                        "or trace the model with an input of the data's shape")
    classes = _num_classes(gm)
    labels = first[1]
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= classes:
        raise ExitError(f"the {what} labels must be integer classes in [0, {classes}), got "
                        f"{labels.dtype} in [{labels.min().item()}, {labels.max().item()}]")


def _num_classes(gm: fx.GraphModule) -> int:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    shapes = out.meta.get(M.SHAPE)
    return shapes[-1][-1] if isinstance(shapes[-1], tuple) else shapes[-1]     # exits' logits, or one output


def exit_logits(gm: fx.GraphModule, data: Data, batch_size: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's logits on `data` (in eval mode) and the labels: ([n, classes] per exit, [n])."""
    exits_of(gm)
    batches = loader(data, batch_size, shuffle=False)
    check_data(gm, batches, "evaluation")
    was_training = gm.training
    gm.eval()
    outs, labels = [], []
    try:
        with torch.no_grad():
            for x, y in batches:
                outs.append(gm(x))
                labels.append(y)
    finally:
        gm.train(was_training)
    return [torch.cat(z) for z in zip(*outs)], torch.cat(labels)


def evaluate(gm: fx.GraphModule, data: Data, batch_size: int = 256) -> list[float]:
    """Accuracy of every exit on `data`, ordered by exit id."""
    logits, y = exit_logits(gm, data, batch_size)
    return [float((z.argmax(1) == y).float().mean()) for z in logits]


def train_exits(model: fx.GraphModule, train: Data, val: Data, epochs: int = 20, mode: str = "joint",
                weights: Sequence[float] | None = None, lr: float = 1e-3, batch_size: int = 64,
                weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
                on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the exits of `model` (the graph from `insert_exits`) on CPU; return and record the
    accuracy of every exit on `val` (in `model.meta[EXITS][i]["accuracy"]`).

    mode: "joint" trains backbone and heads together on BranchyNet's weighted sum of the exits'
        cross-entropies; "heads" freezes the backbone (a pretrained model keeps its accuracy)
        and trains the heads only.
    weights: one loss weight per exit (default 1.0 each).
    train, val: torch Datasets of (input, label) or DataLoaders; inputs must have the traced
        model's input shape without the batch (an ExitError names both shapes otherwise).
    Adam with cosine learning-rate decay; seeds torch with `seed`; `on_epoch(epoch, mean_loss)` is
    called after each epoch. The model is left in eval mode.
    """
    exits = exits_of(model)
    if mode not in ("joint", "heads"):
        raise ExitError(f"mode must be 'joint' or 'heads', not {mode!r}")
    if epochs < 0 or lr <= 0 or batch_size <= 0:
        raise ExitError(f"need epochs >= 0, lr > 0, batch_size > 0; got {epochs}, {lr}, {batch_size}")
    weights = [1.0] * len(exits) if weights is None else [float(w) for w in weights]
    if len(weights) != len(exits) or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ExitError(f"weights must be {len(exits)} non-negative numbers (one per exit), got {weights}")
    torch.manual_seed(seed)
    train_batches = loader(train, batch_size, shuffle=True, seed=seed)
    check_data(model, train_batches, "training")
    val_batches = loader(val, 256, shuffle=False)
    check_data(model, val_batches, "validation")

    heads = _head_modules(model)
    if mode == "heads":
        weights[-1] = 0.0   # the final exit is the frozen backbone
    if not any(weights) or (mode == "heads" and not heads):
        raise ExitError(f"nothing to train in mode {mode!r}: the model has {len(exits)} exit(s) with loss weights "
                        f"{weights}; insert exit heads, or give some exit a positive weight")
    frozen = {}
    if mode == "heads":
        for name, p in model.named_parameters():
            if name.split(".")[0] not in heads:
                frozen[name] = p.requires_grad
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ExitError("every parameter of the model has requires_grad=False: nothing to train")
    steps = max(1, epochs * len(train_batches))
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    try:
        bar = tqdm(range(epochs), desc=f"training {len(exits)} exits ({mode})", unit="epoch", disable=not progress)
        for epoch in bar:
            _set_mode(model, heads, mode)
            total, count = 0.0, 0
            for x, y in train_batches:
                loss = joint_loss(model(x), y, weights)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
            if on_epoch is not None:
                on_epoch(epoch, total / max(count, 1))
    finally:
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(frozen[name])
        model.eval()
    acc = evaluate(model, val_batches)
    for entry, a in zip(exits, acc):
        entry["accuracy"] = a
    return acc


def _head_modules(gm: fx.GraphModule) -> set[str]:
    """Top-level submodule names that hold exit heads."""
    return {str(n.target).split(".")[0] for n in gm.graph.nodes
            if M.EXIT_ID in n.meta and n.op in ("call_module", "get_attr")}


def _set_mode(gm: fx.GraphModule, heads: set[str], mode: str) -> None:
    """joint: everything trains (dropout, batchnorm statistics); heads: only the heads do."""
    if mode == "joint":
        gm.train()
        return
    gm.eval()
    for name in heads:
        gm.get_submodule(name).train()
