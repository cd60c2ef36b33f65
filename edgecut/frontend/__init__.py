"""Turn an nn.Module into a torch.fx GraphModule whose every node carries edgecut metadata."""
from edgecut.frontend import meta
from edgecut.frontend.trace import trace, trace_graph

__all__ = ["meta", "trace", "trace_graph"]
