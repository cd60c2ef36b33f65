"""fold_static: replace the values a graph computes from shapes alone with the constants they are.

edgecut compiles for the example input's shapes, so `x.shape`, `x.size(1)`, `x.dim()` and any
Python arithmetic, comparison or indexing on them are constants. torch.fx records them as nodes
(timm's models check `H == 224` with `torch._assert`, read `B, N, C = x.shape` before a
reshape); left in, they would be values that are not tensors, which a cut cannot send and a
compiled segment cannot take. This pass evaluates them on the example inputs, writes the
constants into their users' arguments, and erases them and the assertions they fed (which held
on the example input). Inputs the example inputs leave out (`forward(x, attn_mask=None)`) take
their default the same way.

Reads and writes no metadata; run before `analyze` (`edgecut.trace` does, on torch.fx graphs).
"""
from __future__ import annotations

import builtins

import torch
import torch.fx as fx

_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "is_floating_point"})
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
_ASSERTS = (torch._assert,)
_PURE_BUILTINS = frozenset({builtins.len, builtins.int, builtins.float, builtins.min, builtins.max,
                            builtins.abs, builtins.round, builtins.getattr, builtins.tuple, builtins.bool})


def _pure(target) -> bool:
    return target in _PURE_BUILTINS or getattr(target, "__module__", None) in ("_operator", "math")


def _static(n: fx.Node, static: set) -> bool:
    if n.op == "call_function" and n.target is builtins.getattr and len(n.args) == 2:
        return n.args[1] in _SHAPE_ATTRS or n.args[0] in static
    if n.op == "call_method" and n.target in _SHAPE_METHODS:
        return all(a in static for a in n.all_input_nodes[1:])
    if n.op == "call_function" and (_pure(n.target) or n.target in _ASSERTS):
        ins = n.all_input_nodes
        return bool(ins) and all(a in static for a in ins)
    return False


def _constant(v):
    if isinstance(v, torch.Size):
        return tuple(int(d) for d in v)
    if isinstance(v, (tuple, list)):
        return type(v)(_constant(x) for x in v)
    return v


def _substitute(gm: fx.GraphModule, values: dict) -> None:
    for n in gm.graph.nodes:
        if n not in values:
            n.args = fx.node.map_arg(n.args, lambda a: values[a] if a in values else a)
            n.kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a] if a in values else a)


def _fold_defaults(gm: fx.GraphModule, given: int) -> None:
    """Inputs after the `given` example inputs take their default (timm's ViT has
    `forward(x, attn_mask=None)`): the default goes into their users, the input goes away."""
    extra = [n for n in gm.graph.nodes if n.op == "placeholder"][given:]
    defaults = {n: n.args[0] for n in extra if n.args}
    _substitute(gm, defaults)
    for n in defaults:
        gm.graph.erase_node(n)


def fold_static(gm: fx.GraphModule, *example_inputs) -> fx.GraphModule:
    """Fold shape-only values of `gm` into constants, for the shapes of `example_inputs`, and
    inputs the example leaves out into their defaults."""
    _fold_defaults(gm, len(example_inputs))
    static: set = set()
    for n in gm.graph.nodes:
        if _static(n, static):
            static.add(n)
    if not static:
        gm.recompile()
        return gm
    values: dict = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in static:
                values[n] = _constant(out)
            return out

    with torch.no_grad():
        Record(gm).run(*[x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs])
    _substitute(gm, values)
    for n in reversed(list(gm.graph.nodes)):
        if n in static and not n.users:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm
