"""Exact ties: the solver keeps a fusion (cuts after the activation) and the table does not flap."""
import warnings

import pytest
import torch
from torch import nn

import edgecut
from edgecut.costmodel.profile import load_profile
from edgecut.frontend import meta
from edgecut.passes import annotate_cost, bandwidth_grid, find_cuts, min_cut, plan_table
from edgecut.passes.find_cuts import best_of, cut_problem
from edgecut.passes.plan_table import range_key
from edgecut.types import Link


def conv_relu_chain():
    """conv -> relu pairs that narrow and widen, so cuts inside the network win at some
    bandwidths; a relu after a conv is a fused epilogue that costs the same on either side, so
    the cut before it and the cut after it tie exactly (up to summation order)."""
    torch.manual_seed(0)
    layers, c = [], 3
    for w, stride in ((32, 1), (8, 2), (64, 1), (8, 2), (128, 1), (8, 2), (128, 1), (16, 2)):
        layers += [nn.Conv2d(c, w, 3, stride=stride, padding=1), nn.ReLU()]
        c = w
    m = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()
    gm = edgecut.trace(m, torch.randn(1, 3, 224, 224))
    local = load_profile("local")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return annotate_cost(gm, local.scaled(100), local)


def _before_an_activation(gm, cut) -> bool:
    nodes = {n.name: n for n in gm.graph.nodes}
    return any(len(nodes[c].users) == 1 and next(iter(nodes[c].users)).meta[meta.KIND] == meta.RELU
               for c in cut.crossing)


@pytest.fixture(scope="module")
def chain():
    return conv_relu_chain()


def test_the_relu_costs_tie_so_the_test_means_something(chain):
    relu = next(n for n in chain.graph.nodes if n.meta[meta.KIND] == meta.RELU)
    assert relu.meta[meta.DEVICE_S] == relu.meta[meta.EDGE_S] > 0


def test_table_cuts_after_the_activation_and_adjacent_ranges_differ(chain):
    table = plan_table(chain, deadline=10, rtt=0.005, bandwidths=bandwidth_grid(points=400))
    offloaded = [p for p in table.plans if not p.cut.device_only and p.cut.name != "input"]
    assert offloaded, [p.cut.name for p in table.plans]  # the table holds a real split
    for p in table.plans:
        assert not _before_an_activation(chain, p.cut), p.cut.name
    for a, b in zip(table.plans, table.plans[1:]):
        assert range_key(a) != range_key(b), (a.cut.name, b.cut.name)


@pytest.mark.parametrize("bw", [2e7, 2.5e7, 3e7, 1e8])
def test_min_cut_and_brute_force_agree_on_ties(chain, bw):
    link = Link(bw, rtt=0.005)
    got = min_cut(chain, link)
    assert not _before_an_activation(chain, got), got.name
    p = cut_problem(chain)
    single = best_of(p.chain_cuts(), link)   # the enumerated single-tensor cuts, same tie rule
    assert p.to_cut(single).name == got.name


def test_find_cuts_lists_both_sides_of_a_fusion(chain):
    names = [c.name for c in find_cuts(chain)]
    assert "after:_0" in names and "after:_1" in names  # candidates stay; only ties choose


class SplitMix(nn.Module):
    """MixNet's mixed conv: torch.split's tuple feeds two convs; a tuple cannot be sent."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        p, q = torch.split(self.stem(x), 4, dim=1)
        return self.head(torch.cat([self.a(p), self.b(q)], 1).mean((2, 3)))


def test_a_tuple_is_never_a_cut():
    gm = edgecut.trace(SplitMix().eval(), torch.randn(1, 3, 32, 32))
    local = load_profile("local")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        annotate_cost(gm, local.scaled(100), local)
    split = next(n.name for n in gm.graph.nodes if n.target is torch.split)
    assert f"after:{split}" not in [c.name for c in find_cuts(gm)]
    for bw in bandwidth_grid(points=16):
        assert split not in min_cut(gm, Link(bw)).crossing
    table = plan_table(gm, deadline=10)
    assert all(split not in p.cut.crossing for p in table.plans)
