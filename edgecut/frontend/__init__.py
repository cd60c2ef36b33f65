"""Turn an nn.Module into a torch.fx GraphModule whose every node carries edgecut metadata.

`meta` is torch-free; `trace`/`trace_graph` (in `tracing`) import torch on first use.
"""
import importlib

from edgecut.frontend import meta


def __getattr__(name: str):
    if name in ("trace", "trace_graph"):
        value = getattr(importlib.import_module("edgecut.frontend.tracing"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgecut.frontend' has no attribute {name!r}")


__all__ = ["meta", "trace", "trace_graph"]
