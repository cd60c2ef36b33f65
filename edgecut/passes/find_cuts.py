"""Cut candidates of an annotated graph, and the cut problem the solver works on.

For exit `e` the relevant subgraph is the ancestors of the exit's logits node
(`gm.meta[meta.EXITS][e]["output"]`; without exits, of the graph's outputs). A cut splits it
into a device set, closed under predecessors (placeholders always on the device; parameters
live on both sides and never cross), and an edge set. Its latency is

    device seconds of the device set
    + Link.transfer_seconds(bytes of the crossing tensors, bytes of the exit's logits)
    + edge seconds of the edge set,

with no transfer at all when everything runs on the device. Each crossing tensor is sent once,
however many edge nodes use it.

`find_cuts` lists the single-tensor cuts (Edgent's candidates on a chain: every node after which
only that node's output is live); `min_cut` finds the latency-minimal cut of any DAG as a minimum
s-t cut (`edgecut.passes.mincut`); `brute_force_cut` is the exhaustive oracle for small graphs.

Reads: `meta.DEVICE_S`, `meta.EDGE_S` (annotate_cost), `meta.OUT_BYTES`, `meta.KIND` (analyze),
`gm.meta[meta.EXITS]` (insert_exits; optional). Writes nothing. Run `annotate_cost` first.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch.fx as fx

from edgecut.errors import PlanError, UsageError
from edgecut.frontend import meta
from edgecut.types import Cut, Link


def exit_specs(gm: fx.GraphModule) -> list[dict]:
    """The graph's exits, ordered by id, with `accuracy` a float (nan when unknown). A graph
    without `gm.meta[EXITS]` has one exit, id 0, whose output is the graph's output."""
    exits = gm.meta.get(meta.EXITS) or []
    if not exits:
        return [{"id": 0, "point": None, "output": None, "macs": None, "accuracy": math.nan, "threshold": None}]
    out = []
    for e in exits:
        acc = e.get("accuracy")
        out.append({**e, "accuracy": math.nan if acc is None else float(acc)})
    return sorted(out, key=lambda e: e["id"])


def get_exit(gm: fx.GraphModule, exit_id: int | None) -> dict:
    """The exit with id `exit_id`, or the final one (largest id) when None."""
    exits = exit_specs(gm)
    if exit_id is None:
        return exits[-1]
    for e in exits:
        if e["id"] == exit_id:
            return e
    raise UsageError(f"exit {exit_id} does not exist; this graph has exits {[e['id'] for e in exits]}")


def _is_param(n: fx.Node) -> bool:
    return n.op == "get_attr" or n.meta.get(meta.KIND) == meta.PARAM


def _one_tensor(n: fx.Node) -> bool:
    shape = n.meta.get(meta.SHAPE)
    return isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)


def _seconds(n: fx.Node, key: str) -> float:
    if n.op in ("placeholder", "output") or n.meta.get(meta.KIND) in meta.NO_COST_KINDS:
        return 0.0
    v = n.meta.get(key)
    if v is None:
        raise PlanError(f"node {n.name!r} has no predicted seconds ({key}): run "
                        "edgecut.passes.annotate_cost with the device and edge profiles before solving")
    v = float(v)
    if not (math.isfinite(v) and v >= 0):
        raise PlanError(f"node {n.name!r} has {key}={v}: predicted seconds must be finite and >= 0; "
                        "check the profile used by annotate_cost")
    return v


@dataclass(frozen=True)
class CutCost:
    """A cut of one exit's subgraph by node index, with its cost split. `line()` gives the cost
    as A + B * 8/bandwidth (seconds), without the fixed per-message cost."""

    device: frozenset
    crossing: tuple
    device_s: float
    edge_s: float
    up_bytes: int
    down_bytes: int
    offloaded: bool  # anything at all on the edge

    def transfer_s(self, link: Link) -> float:
        if not self.offloaded:
            return 0.0
        if self.up_bytes > 0:
            return link.transfer_seconds(self.up_bytes, self.down_bytes)
        # only zero-byte values (ints, sizes) cross: still one round trip
        return link.rtt + link.overhead + 8.0 * self.down_bytes / link.bandwidth

    def latency(self, link: Link) -> float:
        return self.device_s + self.transfer_s(link) + self.edge_s

    def line(self) -> tuple[float, int]:
        return self.device_s + self.edge_s, self.up_bytes + self.down_bytes


class CutProblem:
    """The cut problem of one exit: its subgraph's nodes in graph order (index i), their
    predecessors/consumers within the subgraph, device/edge seconds and output bytes."""

    def __init__(self, gm: fx.GraphModule, exit: dict):
        self.exit = exit
        nodes = list(gm.graph.nodes)
        out = next((n for n in nodes if n.op == "output"), None)
        if exit.get("output") is None:
            if out is None:
                raise PlanError("the graph has no output node; trace the model with edgecut.trace")
            sinks = list(out.all_input_nodes)
        else:
            by_name = {n.name: n for n in nodes}
            if exit["output"] not in by_name:
                raise PlanError(f"exit {exit['id']} names output node {exit['output']!r}, which is not in "
                                "the graph; re-run insert_exits on the traced model")
            sinks = [by_name[exit["output"]]]
        keep, stack = set(), [s for s in sinks if not _is_param(s)]
        while stack:
            n = stack.pop()
            if n in keep or _is_param(n):
                continue
            keep.add(n)
            stack.extend(n.all_input_nodes)
        order = [n for n in nodes if n in keep]
        if not order:
            raise PlanError(f"exit {exit['id']} computes nothing from the inputs (its output is a "
                            "parameter or constant): there is nothing to place on device or edge")
        idx = {n: i for i, n in enumerate(order)}
        self.n = len(order)
        self.names = [n.name for n in order]
        self.preds = [sorted({idx[p] for p in n.all_input_nodes if p in idx}) for n in order]
        self.succs = [sorted({idx[u] for u in n.users if u in idx}) for n in order]
        self.forced = [n.op == "placeholder" for n in order]  # on the device
        self.forced_edge = [False] * self.n  # on the edge (the tail of a block, see `restrict`)
        self.params = [[p.name for p in n.all_input_nodes if _is_param(p)] for n in order]
        self.placeholders = frozenset(n.name for n in nodes if n.op == "placeholder" and not _is_param(n))
        self.device_s = [_seconds(n, meta.DEVICE_S) for n in order]
        self.edge_s = [_seconds(n, meta.EDGE_S) for n in order]
        self.out_bytes = []
        for n in order:
            b = n.meta.get(meta.OUT_BYTES)
            if b is None:
                raise PlanError(f"node {n.name!r} has no output size ({meta.OUT_BYTES}): run "
                                "edgecut.passes.analyze (edgecut.trace does) before solving")
            self.out_bytes.append(int(b))
        self.sinks = sorted({idx[s] for s in sinks if s in idx})
        # a value that is not one tensor (split's tuple, an int) cannot be sent: never crossing
        self.sendable = [_one_tensor(n) for n in order]
        self.accuracy = float(exit.get("accuracy", math.nan))

    # -- evaluating cuts -------------------------------------------------------------------
    def cost(self, device) -> CutCost:
        """The cost split of the cut whose device set is the node indices `device`."""
        on = [False] * self.n
        for i in device:
            on[i] = True
        for i in range(self.n):
            if (self.forced[i] and not on[i]) or (self.forced_edge[i] and on[i]):
                raise ValueError(f"node {self.names[i]!r} must be on the {'edge' if on[i] else 'device'}")
            if on[i] and not all(on[p] for p in self.preds[i]):
                raise ValueError(f"device set not closed under predecessors at {self.names[i]!r}")
        crossing = tuple(i for i in range(self.n) if on[i] and any(not on[j] for j in self.succs[i]))
        return CutCost(
            device=frozenset(i for i in range(self.n) if on[i]), crossing=crossing,
            device_s=sum(self.device_s[i] for i in range(self.n) if on[i]),
            edge_s=sum(self.edge_s[i] for i in range(self.n) if not on[i]),
            up_bytes=sum(self.out_bytes[i] for i in crossing),
            down_bytes=sum(self.out_bytes[s] for s in self.sinks if not on[s]),
            offloaded=not all(on))

    def can_send(self, cc: CutCost) -> bool:
        """Whether every value `cc` sends is one tensor."""
        return all(self.sendable[i] for i in cc.crossing)

    def device_only(self) -> CutCost:
        return self.cost(range(self.n))

    def to_cut(self, cc: CutCost) -> Cut:
        """The public `Cut` (node names) of an indexed cut."""
        if not cc.offloaded:
            name = "device"
        elif all(self.forced[i] for i in cc.device):
            name = "input"
        else:
            name = "after:" + "+".join(self.names[i] for i in cc.crossing)
        device = set(self.placeholders)
        for i in cc.device:
            device.add(self.names[i])
            device.update(self.params[i])
        return Cut(name, frozenset(device), tuple(self.names[i] for i in cc.crossing), cc.up_bytes)

    # -- candidates ------------------------------------------------------------------------
    def articulations(self) -> list[int]:
        """Indices i (not placeholders) after which only node i's output is live: every node up
        to i is an ancestor of i, every node after it a descendant (Edgent's chain cut points)."""
        last = [max(s) if s else -1 for s in self.succs]
        out, open_ = [], set()
        for i in range(self.n):
            open_ = {u for u in open_ if last[u] > i}
            if last[i] > i:
                open_.add(i)
            if open_ == {i} and not self.forced[i] and self.sendable[i]:
                out.append(i)
        return out

    def chain_cuts(self) -> list[CutCost]:
        """Edge-only, every single-tensor cut in graph order, then device-only."""
        out = [self.cost(i for i in range(self.n) if self.forced[i])] if not all(self.forced) else []
        out += [self.cost(range(i + 1)) for i in self.articulations()]
        return out + [self.device_only()]

    def restrict(self, start: int, end: int, tail_on_edge: bool) -> "CutProblem":
        """The sub-problem of nodes start..end, with node `start` on the device when start > 0
        and node `end` on the edge if `tail_on_edge`; edges leaving the range are dropped."""
        sub = object.__new__(CutProblem)
        r = range(start, end + 1)
        sub.exit, sub.accuracy, sub.placeholders = self.exit, self.accuracy, self.placeholders
        sub.n, sub.names = len(r), self.names[start:end + 1]
        sub.preds = [[p - start for p in self.preds[i] if p >= start] for i in r]
        sub.succs = [[c - start for c in self.succs[i] if c <= end] for i in r]
        sub.forced = [self.forced[i] or (i == start and start > 0) for i in r]
        sub.forced_edge = [i == end and tail_on_edge for i in r]
        sub.params = self.params[start:end + 1]
        sub.device_s, sub.edge_s = self.device_s[start:end + 1], self.edge_s[start:end + 1]
        sub.out_bytes = self.out_bytes[start:end + 1]
        sub.sendable = self.sendable[start:end + 1]
        sub.sinks = [s - start for s in self.sinks if start <= s <= end]
        return sub

    def valid_cuts(self):
        """Every valid device set (closed under predecessors, with the placeholders): exponential,
        for small graphs only."""
        free = [i for i in range(self.n) if not (self.forced[i] or self.forced_edge[i])]
        base = [i for i in range(self.n) if self.forced[i]]
        for bits in itertools.product((False, True), repeat=len(free)):
            on = set(base) | {i for i, b in zip(free, bits) if b}
            if all(p in on for i in on for p in self.preds[i]):
                cc = self.cost(on)
                if self.can_send(cc):
                    yield cc


def cut_problem(gm: fx.GraphModule, exit_id: int | None = None) -> CutProblem:
    """The cut problem of exit `exit_id` (the final exit when None)."""
    return CutProblem(gm, get_exit(gm, exit_id))


def find_cuts(gm: fx.GraphModule, exit_id: int | None = None) -> list[Cut]:
    """Edgent's cut candidates for exit `exit_id` (final exit when None): edge-only ("input"),
    a cut after every node whose output is the only live tensor there ("after:NODE"; on a chain,
    every node), and device-only ("device"), in graph order."""
    p = cut_problem(gm, exit_id)
    return [p.to_cut(c) for c in p.chain_cuts()]


# Costs within this relative distance are a tie: sums of the same per-node seconds in another
# order differ in the last bits, and letting that noise decide made plan tables flap.
TIE = 1e-9


def prefer(cuts, value):
    """The cut of least `value(cut)`; among those within `TIE` of it, the one with the most
    nodes on the device, then the latest ones. A tie then never cuts between a layer and the
    activation fused into it (conv | relu: the relu's fused epilogue costs the same on both
    sides), and the same problem always gives the same cut."""
    scored = [(value(c), c) for c in cuts]
    best = min(v for v, _ in scored)
    near = best + TIE * abs(best)
    return max((c for v, c in scored if v <= near), key=lambda c: (len(c.device), sorted(c.device, reverse=True)))


def best_of(cuts, link: Link) -> CutCost:
    """The lowest-latency cut among `cuts` (on ties, see `prefer`)."""
    return prefer(cuts, lambda c: c.latency(link))


def brute_force_cut(gm: fx.GraphModule, link: Link, exit_id: int | None = None, max_nodes: int = 20) -> Cut:
    """The latency-minimal cut by trying every valid device set: the oracle that `min_cut` is
    tested against. Refuses subgraphs of more than `max_nodes` nodes."""
    p = cut_problem(gm, exit_id)
    if p.n > max_nodes:
        raise UsageError(f"brute force over {p.n} nodes would try up to 2**{p.n} cuts; use min_cut")
    return p.to_cut(best_of(p.valid_cuts(), link))


def min_cut(gm: fx.GraphModule, link: Link, exit_id: int | None = None) -> Cut:
    """The latency-minimal cut of exit `exit_id` (final exit when None) over `link`: a minimum
    s-t cut of DADS's flow network, compared with device-only (the link's fixed cost)."""
    from edgecut.passes.mincut import best_cut

    p = cut_problem(gm, exit_id)
    return p.to_cut(best_cut(p, link))
