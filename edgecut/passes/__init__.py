"""Graph-to-graph passes on torch.fx GraphModules, one per file; infrastructure in `infra`.

Analysis (frontend metadata): `annotate_shapes`, `annotate_layers` (together: `analyze`).
"""
from __future__ import annotations

import torch.fx as fx

from edgecut.passes.annotate_layers import annotate_layers
from edgecut.passes.annotate_shapes import annotate_shapes
from edgecut.passes.infra import NodeError, Pipeline, run_pass, verify
from edgecut.passes.annotate_cost import annotate_cost  # cost model (issue 5)
from edgecut.passes.insert_exits import insert_exits, valid_exit_points  # exits (issue 4)
from edgecut.passes.lower_exit import lower_exit  # exits (issue 4)
from edgecut.passes.find_cuts import brute_force_cut, find_cuts, min_cut  # solver (issue 6)
from edgecut.passes.plan_table import bandwidth_grid, plan_table  # solver (issue 6)
from edgecut.passes.solve import solve  # solver (issue 6)


def analyze(gm: fx.GraphModule, *example_inputs) -> fx.GraphModule:
    """Fill every node's metadata: shapes, dtypes, bytes, kind, MACs, params, Edgent features."""
    gm = run_pass(annotate_shapes, gm, *example_inputs)
    return run_pass(annotate_layers, gm)


__all__ = ["NodeError", "Pipeline", "analyze", "annotate_layers", "annotate_shapes", "run_pass", "verify"]
__all__ += ["annotate_cost"]  # cost model (issue 5)
__all__ += ["insert_exits", "lower_exit", "valid_exit_points"]  # exits (issue 4)
__all__ += ["bandwidth_grid", "brute_force_cut", "find_cuts", "min_cut", "plan_table", "solve"]  # solver (issue 6)
