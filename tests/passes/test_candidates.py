"""The candidate cuts an artifact compiles: per exit, the Pareto front of (device seconds, crossing bytes)."""
import pytest
import torch
from test_solve import three_exits

import edgecut
from edgecut import zoo
from edgecut.costmodel.profile import load_profile
from edgecut.errors import UsageError
from edgecut.passes.annotate_cost import annotate_cost
from edgecut.passes.candidates import candidates, pareto
from edgecut.passes.find_cuts import cut_problem
from edgecut.passes.insert_exits import insert_exits
from edgecut.passes.plan_table import plan_table


def dominated(a, b) -> bool:
    """b does no more device work and sends no more bytes than a, and is better in one."""
    return (b.device_s <= a.device_s and b.cut.crossing_bytes <= a.cut.crossing_bytes
            and (b.device_s, b.cut.crossing_bytes) != (a.device_s, a.cut.crossing_bytes))


def test_dominated_cuts_are_left_out():
    gm = three_exits()          # exit 2: after:l2 sends what after:l1 sends, after twice the device work
    ids = {p.id for p in candidates(gm)}
    assert {"e2/input", "e2/after:l1", "e2/device"} <= ids and "e2/after:l2" not in ids
    assert {"e0/input", "e0/device", "e1/input", "e1/device"} <= ids


@pytest.fixture(scope="module")
def alexnet64():
    """AlexNet at 64x64 with exits, a device 100x slower than this machine's profile; its table."""
    gm = insert_exits(edgecut.trace(zoo.get("alexnet"), torch.randn(1, 3, 64, 64)), "auto")
    local = load_profile("local")
    annotate_cost(gm, local.scaled(100), local)
    return gm, plan_table(gm, 0.1, rtt=0.02)


@pytest.mark.parametrize("per_exit", [2, 3, 6])
def test_front_cap_ends_and_kept_plans_on_a_real_graph(alexnet64, per_exit):
    gm, table = alexnet64
    cands = candidates(gm, per_exit=per_exit, keep=table.plans)
    by_exit = {}
    for p in cands:
        by_exit.setdefault(p.exit, []).append(p)
    for eid, plans in by_exit.items():
        names = [p.cut.name for p in plans]
        assert "input" in names and "device" in names and len(set(names)) == len(names)
        kept = [p for p in table.plans if p.exit == eid]
        assert len(plans) <= max(per_exit, 2 + len(kept))
        free = [p for p in plans if all(p.id != k.id for k in kept)]   # kept plans stay even if dominated
        assert all(not dominated(a, b) for a in free for b in plans if a is not b)
        for k in kept:
            assert any(p.id == k.id for p in plans)
    if per_exit == 6:       # pool1's output is 4x smaller than the input: a middle cut for every exit
        assert all(any(p.cut.name.startswith("after:") for p in plans) for plans in by_exit.values())
        assert sum(len(v) for v in by_exit.values()) > len(table.plans)


def test_pareto_and_arguments():
    gm = three_exits()
    p = cut_problem(gm, 2)
    front = pareto(list(p.valid_cuts()))
    assert [(round(c.device_s * 1e3), c.up_bytes) for c in front] == [(0, 20000), (10, 1000), (30, 0)]
    with pytest.raises(UsageError, match="per_exit"):
        candidates(gm, per_exit=1)
    with pytest.raises(UsageError, match="factors"):
        candidates(gm, factors=(0.0,))


class _Residual(torch.nn.Module):
    """A down-sampling residual block, relu(conv(x) + shortcut(x)): the cut after its add is the
    first to send a quarter of the input, and the cut after its ReLU sends the same."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.sc = torch.nn.Conv2d(8, 8, 1, stride=2)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x) + self.sc(x))
        x = torch.relu(self.c2(x) + x)
        return self.head(x.mean((2, 3)))


def test_no_candidate_cuts_between_an_add_and_its_relu():
    gm = edgecut.trace(_Residual().eval(), torch.randn(1, 8, 16, 16))
    local = load_profile("local")
    annotate_cost(gm, local.scaled(20), local)
    plans = candidates(gm, per_exit=20)
    users = {n.name: [u.name for u in n.users] for n in gm.graph.nodes}
    for p in plans:
        for name in p.cut.device:
            if name.startswith("add"):     # its ReLU goes with it
                assert set(users[name]) <= set(p.cut.device), (p.id, name)
    assert any(any(n.startswith("relu") for n in p.cut.device) and p.cut.crossing for p in plans)
