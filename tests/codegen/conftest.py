"""Helpers for codegen tests: plan tables built by hand from tiny traced models."""
import math

import pytest
import torch

import edgecut
from edgecut import zoo
from edgecut.codegen.segment import _ancestors, exit_specs
from edgecut.types import Cut, Plan, PlanTable


def make_cut(gm, after, label, exit_id=None):
    """The cut whose device set is the ancestors of the nodes `after` (a chain: "after:node"),
    with the crossing tensors of exit `exit_id`'s subgraph (the last exit by default)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    exits = exit_specs(gm)
    ex = exits[-1] if exit_id is None else next(e for e in exits if e.id == exit_id)
    need = _ancestors(nodes[ex.output])
    device = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    for name in after:
        device |= _ancestors(nodes[name])
    crossing = tuple(n for n in nodes if n in device and n in need
                     and any(u.name in need and u.name not in device for u in nodes[n].users))
    return Cut(label, frozenset(device), crossing, 0)


def make_table(gm, cuts, exit_id=0, deadline=math.inf):
    plans = tuple(Plan(exit_id if not isinstance(c, tuple) else c[0], c if not isinstance(c, tuple) else c[1],
                       0.01 * i, 0.0, 0.0, accuracy=0.5) for i, c in enumerate(cuts))
    return PlanTable(tuple(float(10 ** i) for i in range(len(plans))), plans, deadline)


def three_cuts(gm, middle):
    """Edge-only, a middle cut after `middle` (a list of node names), device-only."""
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    last = out.name if hasattr(out, "name") else out[-1].name
    return [make_cut(gm, [], "input"), make_cut(gm, middle, "mid"), make_cut(gm, [last], "device")]


@pytest.fixture
def tiny():
    """name -> (model, example input, traced gm)."""
    def get(name):
        model = zoo.get(name)
        x = torch.randn(*zoo.default_input_shape(name))
        return model, x, edgecut.trace(model, x)
    return get
