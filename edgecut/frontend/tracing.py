"""`trace(model, *example_inputs)`: torch.fx symbolic tracing, then torch.export as a fallback,
then an error that says which module, which operation and which source line stopped both.

The returned GraphModule carries edgecut metadata on every node (`edgecut.frontend.meta`),
filled by the analysis passes `annotate_shapes` and `annotate_layers`.
"""
from __future__ import annotations

import linecache
import operator
import os
import traceback
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from edgecut.errors import TraceError
from edgecut.frontend.meta import TRACER as _GRAPH_ATTR
from edgecut.passes.fold_static import fold_static

_TORCH_DIR = os.path.dirname(torch.__file__)
EXPORT_RTOL = 1e-5  # how far torch.export's graph may be from eager, relative to the output's scale
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


_VIEWS = frozenset({"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "squeeze", "unsqueeze",
                    "expand", "select", "slice", "narrow", "unbind", "split", "split_with_sizes", "chunk", "alias",
                    "flatten", "unflatten", "as_strided", "diagonal", "detach", "view_as"})


def _op_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.partition("::")[2]
    return None


def _functionalize(gm: fx.GraphModule) -> bool:
    """Turn in-place aten ops (relu_, add_, hardswish_, ...) into their out-of-place forms,
    where that is exact: the mutated tensor is no view and has no views, so its later readers
    can read the op's result instead. False (graph partly rewritten) where that is not so."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or not n.target._schema.is_mutable:
            continue
        name = _op_name(n.target)
        packet = getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") and not name.endswith("__") else None
        pure = getattr(packet, n.target._overloadname, None) if packet is not None else None
        src = n.args[0] if n.args else None
        if pure is None or not isinstance(src, fx.Node) or _op_name(src.target) in _VIEWS or (
                src.op == "call_function" and src.target is operator.getitem) or any(
                _op_name(u.target) in _VIEWS for u in src.users):
            return False
        for u in list(src.users):
            if u is not n and order[u] > order[n]:
                u.replace_input_with(src, n)
        n.target = pure
    return True


def _export_trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """torch.export's graph without in-place ops (`_functionalize`, else the whole program through
    `run_decompositions({})`, whose views bake in the batch size), weights as get_attr, as a
    plain fx GraphModule: positional inputs and the model's own output structure instead of
    the pytree wrapper."""
    from torch.utils import _pytree as pytree

    ep = torch.export.export(model, tuple(example_inputs), strict=False)
    gm = ep.module()
    if not _functionalize(gm):
        gm = ep.run_decompositions({}).module()
    graph = gm.graph
    out_spec = graph._codegen.pytree_info.out_spec if hasattr(graph._codegen, "pytree_info") else None
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    if out_spec is not None:
        out.args = (pytree.tree_unflatten(list(out.args[0]), out_spec),)
    # Drop the wrapper's input checks (the `_guards_fn` call pins shapes) and buffers nothing
    # reads (num_batches_tracked), so the graph is valid under `edgecut.passes.verify`.
    for n in reversed(list(graph.nodes)):
        if not n.users and (n.op == "get_attr" or (n.op == "call_module" and n.target == "_guards_fn")):
            graph.erase_node(n)
    gm = fx.GraphModule(gm, graph, type(model).__name__)
    gm.meta[_GRAPH_ATTR] = "export"
    return gm


def trace_graph(model: nn.Module, *example_inputs: torch.Tensor, leaf_modules: Iterable[type] = ()) -> fx.GraphModule:
    """Trace without analysis: torch.fx first, torch.export's FX graph if fx cannot."""
    try:
        return fold_static(_fx_trace(model, leaf_modules), *example_inputs)
    except Exception as fx_err:
        try:
            return _export_trace(model, example_inputs)
        except Exception as ex_err:
            raise _trace_error(model, fx_err, ex_err) from ex_err


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _located(model: nn.Module, exc: BaseException) -> tuple[str, str]:
    """("module 'a.b' (Class)", "file.py:LINE: source") of the innermost frame of `exc` that is
    neither torch's nor edgecut's; the module is the nearest such frame's `self` in `model`."""
    names = {id(m): f"module {name or '<root>'!r} ({type(m).__name__})" for name, m in model.named_modules()}
    user = []
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        f = os.path.abspath(frame.f_code.co_filename)
        if not (f.startswith(_TORCH_DIR) or f.startswith(_EDGECUT_DIR) or frame.f_code.co_filename.startswith("<")):
            user.append((frame, lineno))
    if not user:
        return "", ""
    frame, lineno = user[-1]
    src = f"{frame.f_code.co_filename}:{lineno}: {linecache.getline(frame.f_code.co_filename, lineno).strip()}"
    module = next((names[id(fr.f_locals.get("self"))] for fr, _ in reversed(user)
                   if id(fr.f_locals.get("self")) in names), "")
    return module, src


def _trace_error(model: nn.Module, fx_err: Exception, ex_err: Exception) -> TraceError:
    """Where torch.export (the last resort) stopped: module, operation, source line; and where
    torch.fx stopped before it, which may be elsewhere."""
    tracer: _Tracer | None = getattr(fx_err, "_edgecut_tracer", None)
    root = f"module <root> ({type(model).__name__})"
    fx_module, fx_src = _located(model, fx_err)
    stack = (tracer.culprit_stack or tracer.stack) if tracer else []
    if stack:
        fx_module = f"module {stack[-1][0] or '<root>'!r} ({stack[-1][1]})"
    fx_op = (f"Python control flow on the value of {_describe_node(tracer.culprit)}"
             if tracer is not None and tracer.culprit is not None else _first_line(fx_err))
    ex_module, ex_src = _located(model, ex_err)
    ex_op = _first_line(ex_err)
    if ex_src == fx_src or not ex_src:   # both stopped at the same line
        ex_module, ex_src = fx_module, fx_src
        if tracer is not None and tracer.culprit is not None:
            ex_op = fx_op                # the node whose value Python needed
    return TraceError(
        f"cannot trace {type(model).__name__}: {ex_module or root}; operation: {ex_op}"
        + (f"; source: {ex_src}" if ex_src else "") + "\n"
        f"  torch.fx stopped at {fx_module or root}; operation: {fx_op}" + (f"; source: {fx_src}" if fx_src else "")
        + f"\n  torch.export: {_first_line(ex_err)}\n"
        "  what to do: make the branch static (depend on shapes or constructor arguments, not on tensor "
        "values), or mark the module as a leaf: edgecut.trace(model, x, leaf_modules=[ThatModule])")


def _outputs(res) -> str:
    if isinstance(res, dict):
        return f"a dict (keys {', '.join(repr(k) for k in res)})"
    return f"a {type(res).__name__} of {len(res)} values"


def select_output(gm: fx.GraphModule, output) -> fx.GraphModule:
    """Make `gm` return only `output` (an index or key of what the model returns); `None`
    keeps the model's outputs as they are."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    res = out.args[0]
    if output is None:
        return gm
    if isinstance(res, fx.Node):
        raise TraceError(f"{type(gm).__name__} returns one tensor; output={output!r} selects nothing (leave it out)")
    try:
        chosen = res[output]
    except (KeyError, IndexError, TypeError):
        raise TraceError(f"{type(gm).__name__} returns {_outputs(res)}: it has no output {output!r}") from None
    if not isinstance(chosen, fx.Node):
        raise TraceError(f"output {output!r} of {type(gm).__name__} is {type(chosen).__name__}, not one tensor")
    out.args = (chosen,)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def require_one_output(gm: fx.GraphModule) -> None:
    """A one-line `TraceError` unless `gm` returns one tensor: `compile` splits and checks a
    single output (the logits)."""
    res = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(res, fx.Node):
        raise TraceError(f"{type(gm).__name__} returns {_outputs(res)}, not one tensor: say which is the "
                         "logits with edgecut.trace(model, x, output=KEY_OR_INDEX), or wrap the model")


def trace(model: nn.Module, *example_inputs: torch.Tensor, leaf_modules: Iterable[type] = (),
          check: bool = True, output=None) -> fx.GraphModule:
    """Trace `model` into a torch.fx GraphModule with edgecut metadata on every node.

    torch.fx symbolic tracing first; where it cannot trace (data-dependent control flow,
    unsupported Python), the FX graph of `torch.export`; where both fail, a `TraceError`
    naming the module, the operation and the source line. A model that returns a tuple or a
    dict keeps all its outputs, or only `output` (an index or key) when given. With `check`, the traced module is
    run on the example inputs and must give the model's output (exactly for torch.fx, within
    `EXPORT_RTOL` of its scale for torch.export; skipped in training mode, where dropout makes
    outputs random).
    """
    from edgecut.passes import analyze

    if not isinstance(model, nn.Module):
        raise TraceError(f"trace expects an nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise TraceError("trace needs at least one example input (shapes are read from it)")
    gm = select_output(trace_graph(model, *example_inputs, leaf_modules=leaf_modules), output)
    gm = analyze(gm, *example_inputs)
    if check and not model.training:
        with torch.no_grad():
            want, got = model(*example_inputs), gm(*example_inputs)
        want = want if output is None else want[output]
        # torch.export's graph may run other kernels (nn.MultiheadAttention's fused eval path
        # becomes linear + scaled_dot_product_attention): equal within EXPORT_RTOL of the scale
        if not _equal(want, got, 0.0 if gm.meta[_GRAPH_ATTR] == "fx" else EXPORT_RTOL):
            raise TraceError(f"the traced {type(model).__name__} does not compute what the model computes "
                             "(outputs differ on the example input); please report this model")
    return gm


def _equal(a, b, rtol: float = 0.0) -> bool:
    """Equal structure and tensors: exactly, or within `rtol` x the largest magnitude of `a`."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or not rtol:
            return a.shape == b.shape and torch.equal(a, b)
        scale = float(a.abs().max()) if a.numel() else 0.0
        return bool((a - b).abs().max() <= rtol * max(scale, 1e-30)) if a.numel() else True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k], rtol) for k in a)
    return a == b
