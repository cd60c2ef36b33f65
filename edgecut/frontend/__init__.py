"""Turn an nn.Module into a torch.fx GraphModule whose every node carries edgecut metadata.

`meta` is torch-free; `trace`/`trace_graph` import torch on first use.
"""
import importlib

from edgecut.frontend import meta


def __getattr__(name: str):
    if name in ("trace", "trace_graph"):
        module = importlib.import_module("edgecut.frontend.trace")
        # Importing the submodule binds `edgecut.frontend.trace` to it: rebind both names to functions.
        globals().update(trace=module.trace, trace_graph=module.trace_graph)
        return globals()[name]
    raise AttributeError(f"module 'edgecut.frontend' has no attribute {name!r}")


__all__ = ["meta", "trace", "trace_graph"]
