"""lower_exit: the single-exit inference view of a training view with exits.

Reads: `gm.meta[meta.EXITS]`, `meta.EXIT_ID` (run `insert_exits` first; train the exits with
`edgecut.train_exits` before lowering if the numbers matter). Writes: `gm.meta[meta.EXIT]` (the
exit the graph computes); keeps `gm.meta[meta.EXITS]` (accuracies, thresholds) and the exit
metadata of the nodes that remain; re-runs `analyze`, so every node has its metadata.

The result returns that exit's logits only: the other heads and the backbone after the exit's
point are removed, as are their submodules. It computes exactly what the training view returns
at position `exit_id`, and is plain torch.fx (call_module / torch functions), ready for TVM or ONNX.
The input is not modified.
"""
from __future__ import annotations

import copy

import torch.fx as fx

from edgecut.errors import ExitError
from edgecut.frontend import meta as M
from edgecut.passes.insert_exits import _reanalyze, example_inputs


def lower_exit(gm: fx.GraphModule, exit_id: int = -1) -> fx.GraphModule:
    """Return a copy of `gm` that computes exit `exit_id` only (negative ids count from the end:
    -1 is the backbone's own output)."""
    exits = gm.meta.get(M.EXITS)
    if not exits:
        raise ExitError("lower_exit needs a graph with exits: run edgecut.passes.insert_exits first")
    ids = [e["id"] for e in exits]
    if not isinstance(exit_id, int) or not -len(ids) <= exit_id < len(ids):
        raise ExitError(f"no exit {exit_id!r}; this model has exits {ids} (or -1 for the last)")
    entry = exits[exit_id]
    example = example_inputs(gm)
    gm = copy.deepcopy(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    if entry["output"] not in nodes:
        raise ExitError(f"exit {entry['id']}'s logits node {entry['output']!r} is not in the graph; "
                        "was the graph changed after insert_exits?")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (nodes[entry["output"]],)
    # Dead code: everything that no longer reaches the output (other heads, the rest of the backbone).
    for n in reversed(list(gm.graph.nodes)):
        if n.op not in ("placeholder", "output") and not n.users:
            gm.graph.erase_node(n)
    for n in gm.graph.nodes:
        if n.meta.get(M.EXIT_POINT) not in (None, entry["id"]):
            del n.meta[M.EXIT_POINT]
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm = _reanalyze(gm, example)
    gm.meta[M.EXIT] = entry["id"]
    return gm
