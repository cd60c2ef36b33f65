"""Pass infrastructure: a pass is a plain function `GraphModule -> GraphModule`.

`Pipeline` runs passes in order (optionally `verify`-ing after each) and wraps any failure in a
`PassError` that names the pass and, where known, the node. A pass that wants to report the
node it failed on raises `NodeError(node, message)`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch.fx as fx

from edgecut.errors import EdgecutError, PassError, VerifyError
from edgecut.frontend import meta

Pass = Callable[..., fx.GraphModule]


class NodeError(Exception):
    """Raised inside a pass to name the node it failed on."""

    def __init__(self, node: fx.Node | str, message: str):
        self.node = node.name if isinstance(node, fx.Node) else node
        super().__init__(message)


def pass_name(p: Pass) -> str:
    return getattr(p, "__name__", type(p).__name__)


def run_pass(p: Pass, gm: fx.GraphModule, *args, **kwargs) -> fx.GraphModule:
    """Run one pass, turning any failure into a `PassError` naming the pass and node."""
    try:
        out = p(gm, *args, **kwargs)
    except PassError:
        raise
    except NodeError as e:
        raise PassError(pass_name(p), e.node, str(e)) from e
    except EdgecutError:
        raise
    except Exception as e:
        raise PassError(pass_name(p), None, f"{type(e).__name__}: {e}") from e
    if not isinstance(out, fx.GraphModule):
        raise PassError(pass_name(p), None, f"returned {type(out).__name__}, not a GraphModule")
    return out


class Pipeline:
    """Run `passes` in order; with `verify=True` check the graph's invariants after each."""

    def __init__(self, passes: Iterable[Pass], verify: bool = False):
        self.passes, self.verify = list(passes), verify

    def __call__(self, gm: fx.GraphModule, **kwargs) -> fx.GraphModule:
        for p in self.passes:
            gm = run_pass(p, gm, **kwargs) if _accepts_kwargs(p, kwargs) else run_pass(p, gm)
            if self.verify:
                try:
                    verify(gm)
                except VerifyError as e:
                    raise PassError(pass_name(p), None, f"left the graph invalid: {e}") from e
        return gm


def _accepts_kwargs(p: Pass, kwargs: dict) -> bool:
    import inspect

    if not kwargs:
        return False
    params = inspect.signature(p).parameters
    return any(v.kind is v.VAR_KEYWORD for v in params.values()) or all(k in params for k in kwargs)


def verify(gm: fx.GraphModule) -> fx.GraphModule:
    """Check the invariants every edgecut graph keeps; raise `VerifyError` naming the node.

    - fx's own lint (topological order, well-formed args, targets that exist);
    - exactly one output node; every node reaches the output or is a placeholder;
    - metadata that is present is well-typed (shapes are int tuples, bytes/MACs non-negative,
      kinds from `meta.KINDS`); once any node is analysed, every node is;
    - exit ids are only on nodes that are not used by backbone nodes.
    """
    g = gm.graph
    try:
        g.lint()
    except Exception as e:
        raise VerifyError(f"fx lint: {e}") from e
    outputs = [n for n in g.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise VerifyError(f"graph has {len(outputs)} output nodes, expected 1")
    analysed = any(meta.KIND in n.meta for n in g.nodes)
    for n in g.nodes:
        if n.op not in ("placeholder", "output") and not n.users:
            raise VerifyError(f"node {n.name!r} ({n.format_node()}) is dead: nothing uses its output")
        if not analysed:
            continue
        missing = [k for k in meta.REQUIRED_AFTER_ANALYSIS if k not in n.meta]
        if missing:
            raise VerifyError(f"node {n.name!r} lacks metadata {missing}")
        if n.meta[meta.KIND] not in meta.KINDS:
            raise VerifyError(f"node {n.name!r} has unknown kind {n.meta[meta.KIND]!r}")
        for k in (meta.OUT_BYTES, meta.MACS, meta.PARAMS, meta.PARAM_BYTES):
            v = n.meta[k]
            if not isinstance(v, int) or v < 0:
                raise VerifyError(f"node {n.name!r}: {k}={v!r} is not a non-negative int")
        if not _is_shape(n.meta[meta.SHAPE]):
            raise VerifyError(f"node {n.name!r}: shape {n.meta[meta.SHAPE]!r} is not a tuple of ints")
    for n in g.nodes:
        if meta.EXIT_ID in n.meta:
            for u in n.users:
                if u.op != "output" and meta.EXIT_ID not in u.meta:
                    raise VerifyError(f"exit node {n.name!r} feeds backbone node {u.name!r}")
    return gm


def _is_shape(s) -> bool:
    if s is None:
        return True  # non-tensor values (ints, tuples of sizes) carry no shape
    if isinstance(s, tuple) and all(isinstance(d, int) for d in s):
        return True
    return isinstance(s, tuple) and all(_is_shape(x) and x is not None for x in s)
