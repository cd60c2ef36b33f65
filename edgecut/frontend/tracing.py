"""`trace(model, *example_inputs)`: torch.fx symbolic tracing, then torch.export as a fallback,
then an error that says which module, which operation and which source line stopped both.

The returned GraphModule carries edgecut metadata on every node (`edgecut.frontend.meta`),
filled by the analysis passes `annotate_shapes` and `annotate_layers`.
"""
from __future__ import annotations

import linecache
import os
import traceback
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from edgecut.errors import TraceError
from edgecut.frontend.meta import TRACER as _GRAPH_ATTR

_TORCH_DIR = os.path.dirname(torch.__file__)
_EDGECUT_DIR = os.path.dirname(os.path.dirname(__file__))


class _Tracer(fx.Tracer):
    """fx.Tracer that remembers which module it is inside and which proxy forced a Python value."""

    def __init__(self, leaf_modules: Iterable[type] = ()):
        super().__init__()
        self.leaf_types = tuple(leaf_modules)
        self.stack: list[tuple[str, str]] = []
        self.culprit: fx.Node | None = None
        self.culprit_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (bool(self.leaf_types) and isinstance(m, self.leaf_types)) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()

    def _blame(self, obj):
        self.culprit, self.culprit_stack = obj.node, list(self.stack)

    def to_bool(self, obj):
        self._blame(obj)
        return super().to_bool(obj)

    def iter(self, obj):
        self._blame(obj)
        return super().iter(obj)

    def keys(self, obj):
        self._blame(obj)
        return super().keys(obj)


def _user_frame(exc: BaseException) -> str:
    """'file.py:LINE: source' of the innermost frame that is neither torch's nor edgecut's."""
    found = ""
    for fs in traceback.extract_tb(exc.__traceback__):
        f = os.path.abspath(fs.filename)
        if f.startswith(_TORCH_DIR) or f.startswith(_EDGECUT_DIR) or fs.filename.startswith("<"):
            continue
        line = (fs.line or linecache.getline(fs.filename, fs.lineno)).strip()
        found = f"{fs.filename}:{fs.lineno}: {line}"
    return found


def _describe_node(n: fx.Node) -> str:
    tgt = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{n.op} {tgt!s} (node {n.name!r})"


def _fx_trace(model: nn.Module, leaf_modules) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        e._edgecut_tracer = tracer  # type: ignore[attr-defined]
        raise
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[_GRAPH_ATTR] = "fx"
    return gm


def _export_trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    ep = torch.export.export(model, tuple(example_inputs), strict=False)
    gm = ep.module()
    # Drop the pytree wrapper's input checks (the `_guards_fn` call pins shapes and is dead code to
    # fx) so the module is a plain fx GraphModule again, valid under `edgecut.passes.verify`.
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    gm = fx.GraphModule(gm, gm.graph, type(model).__name__)
    gm.meta[_GRAPH_ATTR] = "export"
    return gm


def trace_graph(model: nn.Module, *example_inputs: torch.Tensor, leaf_modules: Iterable[type] = ()) -> fx.GraphModule:
    """Trace without analysis: torch.fx first, torch.export's FX graph if fx cannot."""
    try:
        return _fx_trace(model, leaf_modules)
    except Exception as fx_err:
        try:
            return _export_trace(model, example_inputs)
        except Exception as ex_err:
            raise _trace_error(model, fx_err, ex_err) from ex_err


def _trace_error(model: nn.Module, fx_err: Exception, ex_err: Exception) -> TraceError:
    tracer: _Tracer | None = getattr(fx_err, "_edgecut_tracer", None)
    stack = (tracer.culprit_stack or tracer.stack) if tracer else []
    where = (f"module {stack[-1][0] or '<root>'!r} ({stack[-1][1]})" if stack
             else f"module <root> ({type(model).__name__})")
    op = ""
    if tracer is not None and tracer.culprit is not None:
        op = f"; operation: Python control flow on the value of {_describe_node(tracer.culprit)}"
    line = _user_frame(fx_err) or _user_frame(ex_err)
    src = f"; source: {line}" if line else ""
    ex_first = str(ex_err).strip().splitlines()[0] if str(ex_err).strip() else type(ex_err).__name__
    return TraceError(
        f"cannot trace {type(model).__name__}: {where}{op}{src}\n"
        f"  torch.fx: {type(fx_err).__name__}: {str(fx_err).strip().splitlines()[0] if str(fx_err).strip() else ''}\n"
        f"  torch.export: {type(ex_err).__name__}: {ex_first}\n"
        "  what to do: make the branch static (depend on shapes or constructor arguments, not on tensor "
        "values), or mark the module as a leaf: edgecut.trace(model, x, leaf_modules=[ThatModule])")


def trace(model: nn.Module, *example_inputs: torch.Tensor, leaf_modules: Iterable[type] = (),
          check: bool = True) -> fx.GraphModule:
    """Trace `model` into a torch.fx GraphModule with edgecut metadata on every node.

    torch.fx symbolic tracing first; where it cannot trace (data-dependent control flow,
    unsupported Python), the FX graph of `torch.export`; where both fail, a `TraceError`
    naming the module, the operation and the source line. With `check`, the traced module is
    run on the example inputs and must give exactly the model's output (skipped in training
    mode, where dropout makes outputs random).
    """
    from edgecut.passes import analyze

    if not isinstance(model, nn.Module):
        raise TraceError(f"trace expects an nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise TraceError("trace needs at least one example input (shapes are read from it)")
    gm = trace_graph(model, *example_inputs, leaf_modules=leaf_modules)
    gm = analyze(gm, *example_inputs)
    if check and not model.training:
        with torch.no_grad():
            want, got = model(*example_inputs), gm(*example_inputs)
        if not _equal(want, got):
            raise TraceError(f"the traced {type(model).__name__} does not compute what the model computes "
                             "(outputs differ on the example input); please report this model")
    return gm


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b
