"""annotate_shapes: run the graph once on example inputs and record each node's output.

Reads: nothing. Writes: `meta.SHAPE`, `meta.DTYPE`, `meta.OUT_BYTES` on every node.
Must run first; needs example inputs of the shapes the model will be deployed with.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from edgecut.frontend import meta
from edgecut.passes.infra import NodeError


def describe(value: Any) -> tuple[Any, Any, int]:
    """(shape, dtype, bytes) of a node's value; tuples of tensors give tuples; others give None."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return tuple(int(d) for d in value.shape), dtype, int(value.numel() * value.element_size())
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        parts = [describe(v) for v in value]
        return tuple(p[0] for p in parts), tuple(p[1] for p in parts), sum(p[2] for p in parts)
    return None, None, 0


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as e:
            raise NodeError(n, f"running {n.format_node()} on the example inputs: {type(e).__name__}: {e}") from e
        shape, dtype, nbytes = describe(value)
        n.meta[meta.SHAPE], n.meta[meta.DTYPE], n.meta[meta.OUT_BYTES] = shape, dtype, nbytes
        return value


def annotate_shapes(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> fx.GraphModule:
    """Fill shape, dtype and output bytes of every node by running `gm` on `example_inputs`."""
    with torch.no_grad():
        # Clone inputs: in-place ops in the model must not modify the user's tensors.
        _Recorder(gm).run(*[x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs])
    return gm
