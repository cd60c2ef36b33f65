"""insert_exits: add BranchyNet exit heads after backbone nodes that dominate the rest.

Reads: `meta.SHAPE`, `meta.DTYPE`, `meta.MACS`, `meta.OUT_BYTES` (run `edgecut.trace` or
`passes.analyze` first). Writes: `meta.EXIT_ID` on every node of a head (its logits node
included), `meta.EXIT_POINT` on each backbone node an exit branches from (the node feeding the
output too: it is the final exit's point), `gm.meta[meta.EXITS]`; then re-runs `analyze`, so
every node, old or new, has its metadata.

The result is the *training view*: its forward returns a tuple of every exit's logits ordered by
exit id, the backbone's own output last. The input graph is not modified (the pass works on a
deep copy, so training the exits never changes the user's model). `lower_exit` turns the
training view into the single-exit *inference view*.

A valid exit point dominates everything after it: every path from the input to the output goes
through it, so a cut right after it crosses one tensor (`valid_exit_points`).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from edgecut.errors import ExitError
from edgecut.frontend import meta as M
from edgecut.passes.infra import NodeError

HeadFactory = Callable[[tuple, int], nn.Module]
_PREFIX = "edgecut_exit"      # head submodules live under edgecut_exit{id}
_AUTO_MAX_FRACTION = 0.95     # "auto" ignores points after this share of the backbone's MACs
_HEAD_SHARE = 0.25            # a default head aims at this share of the backbone MACs before it


def valid_exit_points(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes an exit may branch from, in graph order.

    A node qualifies when, once it is computed, no earlier value is needed any more (it
    dominates the rest of the graph), its output is one tensor, and it is neither the input nor
    the node feeding the output (that one is the final exit already). Weights (`get_attr`) do
    not count as values.
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    final = _final_node(gm)
    points, reach = [], -1   # reach: furthest use of any value computed so far, point excluded
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if n.op != "get_attr":
            shape = n.meta.get(M.SHAPE)
            is_tensor = isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) and len(shape) >= 2
            if reach <= i and n.op != "placeholder" and n is not final and is_tensor:
                points.append(n.name)
            reach = max(reach, last_use[n])
    return points


def insert_exits(gm: fx.GraphModule, points: str | Sequence[str] = "auto", head: HeadFactory | None = None,
                 *, num_exits: int = 5, num_classes: int | None = None) -> fx.GraphModule:
    """Return the training view of `gm` with an exit head after each of `points`.

    points: "auto" picks up to `num_exits - 1` points (so `num_exits` exits with the final one)
        spread evenly over the backbone's cumulative MACs, at the smallest tensor of each stage;
        or a list of node names (see `valid_exit_points`).
    head: None for the default head (below), or `head(shape, num_classes) -> nn.Module` that maps
        a tensor of `shape` (batch first) to logits `(batch, num_classes)`; it is traced with
        torch.fx and inlined, so it must be fx-traceable and should use ordinary layers.
    num_classes: defaults to the last dimension of the backbone's output.

    The default head is BranchyNet's: for an image tensor (N, C, H, W), a max pool down to at
    most 8x8, a 3x3 conv to min(32, C) channels, ReLU, an average pool down to at most 4x4,
    flatten and a linear layer (fixed kernels, no adaptive pooling: TVM and ONNX take it as is);
    for a vector (N, F), one linear layer. The conv narrows (down to 4 channels) where that is
    needed to keep the head near a quarter of the backbone's MACs before it.
    """
    if M.SHAPE not in next(iter(gm.graph.nodes)).meta:
        raise ExitError("insert_exits needs an analysed graph: get it from edgecut.trace(model, x) "
                        "or run edgecut.passes.analyze(gm, x) first")
    if gm.meta.get(M.EXITS):
        raise ExitError("this graph already has exits (gm.meta[EXITS]); insert exits on the traced "
                        "backbone, not on a training view")
    final = _final_node(gm)
    out_shape = final.meta.get(M.SHAPE)
    if not (isinstance(out_shape, tuple) and len(out_shape) == 2 and all(isinstance(d, int) for d in out_shape)):
        raise ExitError(f"the backbone's output {final.name!r} has shape {out_shape!r}; exits need a model "
                        "that returns one (batch, classes) tensor of logits")
    num_classes = num_classes or out_shape[-1]
    valid = valid_exit_points(gm)
    if isinstance(points, str) and points == "auto":
        if not isinstance(num_exits, int) or num_exits < 1:
            raise ExitError(f"num_exits counts the exits including the final one: 1 or more, not {num_exits!r}")
        if head is None:   # the default head takes images and vectors
            valid = [p for p in valid if len(_node(gm, p).meta[M.SHAPE]) in (2, 4)]
        chosen = _auto_points(gm, valid, num_exits - 1)
    else:
        chosen = _check_points(gm, points, valid)

    gm = copy.deepcopy(gm)
    example = example_inputs(gm)
    _drop_export_guards(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    chosen = sorted(chosen, key=list(by_name).index)
    logits = []
    for i, name in enumerate(chosen):
        point = by_name[name]
        _make_users_out_of_place(gm, point)
        if head is None:
            budget = int(_HEAD_SHARE * sum(a.meta[M.MACS] for a in _ancestors(point) | {point}))
            module = default_head(point.meta[M.SHAPE], num_classes, max_macs=budget)
        else:
            module = head(point.meta[M.SHAPE], num_classes)
        logits.append(_inline_head(gm, point, module, i, num_classes))
        point.meta[M.EXIT_POINT] = i
    final = _final_node(gm)
    final.meta[M.EXIT_POINT] = len(chosen)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(logits) + (final,),)
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        gm.graph.set_codegen(fx.graph.CodeGen())   # torch.export's pytree output spec no longer fits
    gm.graph.lint()
    gm.recompile()
    gm = _reanalyze(gm, example)
    gm.meta[M.EXITS] = _exit_table(gm, [by_name[c] for c in chosen] + [final], logits + [final])
    return gm


def default_head(shape: tuple, num_classes: int, max_macs: int | None = None) -> nn.Module:
    """BranchyNet-style head for a tensor of `shape` (batch first): see `insert_exits`. With
    `max_macs`, the conv gets fewer channels (at least 4) so that the head stays near that budget."""
    if len(shape) == 2:
        return nn.Sequential(nn.Linear(shape[1], num_classes))
    if len(shape) != 4:
        raise ExitError(f"the default exit head takes (N, C, H, W) or (N, F) tensors, not {shape}; "
                        "pass head=your_factory(shape, num_classes) for other shapes")
    _, c, h, w = shape
    layers: list[nn.Module] = []
    k = (math.ceil(h / 8), math.ceil(w / 8))
    if k != (1, 1):
        layers.append(nn.MaxPool2d(kernel_size=k, stride=k))
        h, w = h // k[0], w // k[1]
    width = min(32, c)
    k2 = (math.ceil(h / 4), math.ceil(w / 4))
    ph, pw = h // k2[0], w // k2[1]
    if max_macs is not None:
        per_channel = h * w * c * 9 + ph * pw * num_classes
        width = max(min(4, width), min(width, max_macs // per_channel))
    layers += [nn.Conv2d(c, width, kernel_size=3, padding=1), nn.ReLU()]
    if k2 != (1, 1):
        layers.append(nn.AvgPool2d(kernel_size=k2, stride=k2))
    layers += [nn.Flatten(), nn.Linear(width * ph * pw, num_classes)]
    return nn.Sequential(*layers)


def example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Zero tensors shaped like the analysed placeholders (for re-running the analysis)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            shape, dtype = n.meta.get(M.SHAPE), n.meta.get(M.DTYPE)
            if not isinstance(shape, tuple) or not isinstance(dtype, str):
                raise ExitError(f"input {n.name!r} has no recorded shape; trace the model with edgecut.trace first")
            out.append(torch.zeros(shape, dtype=getattr(torch, dtype)))
    return tuple(out)


def _reanalyze(gm: fx.GraphModule, example: tuple) -> fx.GraphModule:
    from edgecut.passes import analyze

    was_training = gm.training
    gm.eval()   # batchnorm must not update its statistics on the zero example
    try:
        return analyze(gm, *example)
    finally:
        gm.train(was_training)


def _drop_export_guards(gm: fx.GraphModule) -> None:
    """torch.export's graphs assert the traced batch size (`_guards_fn`, a call without users);
    exits are trained on batches, so the assertion goes (shapes are re-checked by `analyze`)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        gm.delete_submodule("_guards_fn")


def _final_node(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]    # torch.export's graphs return a 1-tuple
    if not isinstance(value, fx.Node):
        raise ExitError(f"the model returns {type(value).__name__} of values; exits need a model that returns "
                        "one logits tensor")
    return value


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _check_points(gm: fx.GraphModule, points: Sequence[str], valid: list[str]) -> list[str]:
    if isinstance(points, str):
        points = [points]
    names = {n.name for n in gm.graph.nodes}
    listing = ", ".join(valid) or "(none)"
    for p in points:
        if p not in names:
            raise ExitError(f"no node named {p!r} in the graph; valid exit points: {listing}")
        if p not in valid:
            raise ExitError(f"cannot put an exit after node {p!r}: it does not dominate the rest of the graph "
                            "(it is inside a residual block or one arm of a branch, or it is the input, the "
                            f"final output or not a single tensor); valid exit points: {listing}")
    if len(set(points)) != len(points):
        raise ExitError(f"exit points repeat: {list(points)}; give each node once")
    return list(points)


def _cumulative_macs(gm: fx.GraphModule) -> dict[str, int]:
    total, cum = 0, {}
    for n in gm.graph.nodes:
        total += n.meta.get(M.MACS, 0)
        cum[n.name] = total
    return cum


def _auto_points(gm: fx.GraphModule, valid: list[str], count: int) -> list[str]:
    """Up to `count` points spread over cumulative MACs: at most one per stage (the points after
    the same conv/linear layer), at the stage's smallest tensor, the latest one on ties."""
    if count <= 0:
        return []
    cum = _cumulative_macs(gm)
    total = cum[_final_node(gm).name] or 1
    stage_of, heavy = {}, 0
    for n in gm.graph.nodes:
        heavy += n.meta.get(M.KIND) in (M.CONV, M.DWCONV, M.LINEAR)
        stage_of[n.name] = heavy
    best: dict[int, str] = {}
    for p in valid:
        if cum[p] == 0 or cum[p] > _AUTO_MAX_FRACTION * total:
            continue
        s = stage_of[p]
        if s not in best or _node(gm, p).meta[M.OUT_BYTES] <= _node(gm, best[s]).meta[M.OUT_BYTES]:
            best[s] = p
    stages = {cum[p]: p for p in best.values()}
    levels = sorted(stages)
    if len(levels) <= count:
        return [stages[c] for c in levels]
    targets = [total * k / (count + 1) for k in range(1, count + 1)]
    chosen = _match_in_order(levels, targets)
    return [stages[c] for c in chosen]


def _match_in_order(levels: list[int], targets: list[float]) -> list[int]:
    """One distinct level per target, both in increasing order, minimising the total distance (DP)."""
    inf = float("inf")
    n, k = len(levels), len(targets)
    # cost[i][j]: best cost placing the first j targets on levels[:i]
    cost = [[inf] * (k + 1) for _ in range(n + 1)]
    take = [[False] * (k + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, k) + 1):
            skip, use = cost[i - 1][j], cost[i - 1][j - 1] + abs(levels[i - 1] - targets[j - 1])
            cost[i][j], take[i][j] = (use, True) if use <= skip else (skip, False)
    picked, i, j = [], n, k
    while j > 0:
        if take[i][j]:
            picked.append(levels[i - 1])
            j -= 1
        i -= 1
    return picked[::-1]


def _make_users_out_of_place(gm: fx.GraphModule, point: fx.Node) -> None:
    """An in-place user (ReLU(inplace=True), relu_) would overwrite the tensor the head reads and
    saves for backward; make such users out of place (same numbers)."""
    for u in list(point.users):
        if u.op == "call_module":
            mod = gm.get_submodule(u.target)
            if getattr(mod, "inplace", False):
                mod.inplace = False
        elif u.op == "call_method" and isinstance(u.target, str) and u.target.endswith("_") \
                and not u.target.startswith("_") and hasattr(torch.Tensor, u.target[:-1]):
            u.target = u.target[:-1]
        elif u.op == "call_function" and u.kwargs.get("inplace"):
            u.kwargs = {**u.kwargs, "inplace": False}


def _inline_head(gm: fx.GraphModule, point: fx.Node, module: nn.Module, exit_id: int,
                 num_classes: int) -> fx.Node:
    """Trace `module` and copy its nodes into `gm` right after `point`; return the logits node."""
    prefix = f"{_PREFIX}{exit_id}"
    if hasattr(gm, prefix):
        raise NodeError(point, f"the model already has an attribute {prefix!r}; rename it")
    try:
        head_gm = fx.symbolic_trace(module)
    except Exception as e:
        raise ExitError(f"the exit head for node {point.name!r} ({type(module).__name__}) cannot be traced by "
                        f"torch.fx: {type(e).__name__}: {e}") from e
    gm.add_submodule(prefix, module)
    env: dict[fx.Node, fx.Node] = {}
    prev, result = point, None
    for hn in head_gm.graph.nodes:
        if hn.op == "placeholder":
            if env:
                raise ExitError(f"an exit head must take one input, {type(module).__name__} takes more")
            env[hn] = point
            continue
        if hn.op == "output":
            result = env[hn.args[0]] if isinstance(hn.args[0], fx.Node) else None
            break
        with gm.graph.inserting_after(prev):
            new = gm.graph.node_copy(hn, lambda a: env[a])
        if new.op in ("call_module", "get_attr"):
            new.target = f"{prefix}.{hn.target}" if hn.target else prefix
        new.name = gm.graph._graph_namespace.create_name(f"{prefix}_{hn.name.lstrip('_')}", None)
        new.meta = {M.EXIT_ID: exit_id}
        env[hn], prev = new, new
    if result is None or result is point:
        raise ExitError(f"the exit head for node {point.name!r} must return one logits tensor computed from its input")
    with torch.no_grad():
        got = module.eval()(torch.zeros(point.meta[M.SHAPE]))
    module.train()
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (point.meta[M.SHAPE][0], num_classes):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ExitError(f"the exit head for node {point.name!r} returns {shape}, expected "
                        f"{(point.meta[M.SHAPE][0], num_classes)} logits")
    return result


def _exit_table(gm: fx.GraphModule, points: list[fx.Node], outputs: list[fx.Node]) -> list[dict]:
    head_macs: dict[int, int] = {}
    for n in gm.graph.nodes:
        if M.EXIT_ID in n.meta:
            head_macs[n.meta[M.EXIT_ID]] = head_macs.get(n.meta[M.EXIT_ID], 0) + n.meta[M.MACS]
    table = []
    for i, (p, o) in enumerate(zip(points, outputs)):
        backbone = sum(a.meta[M.MACS] for a in _ancestors(p) if M.EXIT_ID not in a.meta) + p.meta[M.MACS]
        table.append({"id": i, "point": p.name, "output": o.name, "macs": int(backbone + head_macs.get(i, 0)),
                      "accuracy": None, "threshold": None})
    return table


def _ancestors(n: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(n.all_input_nodes)
    while stack:
        a = stack.pop()
        if a not in seen:
            seen.add(a)
            stack.extend(a.all_input_nodes)
    return seen
