"""The latency-minimal cut of a DAG as a minimum s-t cut (DADS, Hu et al. 2019), with networkx.

The flow network of a `CutProblem` (source side = device, sink side = edge):

- `s -> v` with v's edge seconds (paid when v runs on the edge), plus, for the exit's logits
  node, the time to send the logits back; `v -> t` with v's device seconds (less the smaller of
  the two on both: it is paid either way). Placeholders are part of s: the input is on the
  device (and a block's tail, see `Block`, part of t), which spares the flow algorithm the
  infinite excess an infinite `s -> input` edge would start with.
- for every input `u` of `v`, an infinite `v -> u`: a device node never uses an edge node's
  output, so tensors only flow device -> edge.
- a producer `u` with consumers `c1..ck`: `u -> x_u` with the transfer time of u's output and
  infinite `x_u -> ci`, so the tensor is paid once however many edge nodes use it (a single
  consumer gets the edge `u -> c` directly).

A cut's capacity is then device seconds + edge seconds + 8 * (crossing + logits bytes) /
bandwidth. The link's fixed cost (rtt + overhead) is paid once by every cut except device-only,
so it stays out of the network: `best_cut` compares the min cut + fixed cost with device-only.
Capacities are integer picoseconds, so networkx's arithmetic is exact; only the transfer
capacities depend on the bandwidth, and `DadsNetwork.solve` re-sets those on one residual network.

Two exact reductions keep the networks small (`MinCut`): the problem is split into blocks at its
articulation nodes, tiny blocks are enumerated; and at low bandwidth, a producer whose transfer
alone costs more than an always-valid cut is merged with its consumers (`_merges`).
"""
from __future__ import annotations

import gc
from collections import deque
from contextlib import contextmanager

import networkx as nx
from networkx.algorithms.flow import preflow_push

from edgecut.passes.find_cuts import TIE, CutCost, CutProblem, prefer
from edgecut.types import Link

PS = 1e12  # capacity units per second


def _ps(seconds: float) -> int:
    return int(round(seconds * PS))


S, T = "s", "t"


class DadsNetwork:
    """DADS's flow network of `problem`, valid for transfer rates up to `lam_max` seconds per
    byte (8 / lowest bandwidth): `solve(lam)` re-sets the transfer capacities and cuts.
    `merged[i]`, when given, names the node that node i is merged into (S, T or a node)."""

    S, T = S, T

    def __init__(self, problem: CutProblem, lam_max: float, merged: list | None = None):
        with _no_gc():
            self._build(problem, lam_max, merged)

    def _build(self, p: CutProblem, lam_max: float, merged):
        self.problem, self.lam_max = p, lam_max
        edges = {}  # (u, v) -> [picoseconds, bytes] (capacity base + lam * bytes), None = infinite
        self.node = node = (lambda i: merged[i]) if merged else (
            lambda i: S if p.forced[i] else T if p.forced_edge[i] else i)  # fixed sides join s, t

        def add(u, v, ps=0, nbytes=0):
            if u == v or u == T or v == S:
                return  # never cut: within one node, out of the sink, into the source
            if ps is None:
                edges[u, v] = None
            elif edges.get((u, v), ()) is not None:
                c = edges.setdefault((u, v), [0, 0])
                c[0], c[1] = c[0] + ps, c[1] + nbytes

        sinks = set(p.sinks)
        for i in range(p.n):
            v = node(i)
            if v not in (S, T):
                ds, es = _ps(p.device_s[i]), _ps(p.edge_s[i])
                m = min(ds, es)  # the cheaper side is paid anyway: keep only the difference
                add(S, v, es - m, p.out_bytes[i] if i in sinks else 0)  # on the edge (+ logits back)
                add(v, T, ds - m)                                       # on the device
            for u in p.preds[i]:
                add(v, node(u), None)  # no device node after an edge node
            b, succ = p.out_bytes[i], p.succs[i]
            if succ and (b > 0 or not p.sendable[i]):
                tail = node(succ[0]) if len(succ) == 1 else ("x", i)
                if p.sendable[i]:
                    add(v, tail, 0, b)  # the transfer, once however many edge nodes use it
                else:
                    add(v, tail, None)  # not one tensor: never sent
                if len(succ) > 1:
                    for c in succ:
                        add(tail, node(c), None)
        self.dynamic = [(u, v, c[0], c[1]) for (u, v), c in edges.items() if c is not None and c[1]]
        self.R = _residual({e: None if c is None else c[0] + _ps(lam_max * c[1]) for e, c in edges.items()}, S, T)

    def cut(self, lam: float) -> CutCost:
        return self.problem.cost(self.solve(lam))

    def solve(self, lam: float) -> frozenset:
        """Device node indices of a minimum cut at `lam` = 8 / bandwidth seconds per byte."""
        if lam > self.lam_max * (1 + 1e-12):
            raise ValueError(f"rate {lam} s/byte above the network's maximum {self.lam_max}")
        R = self.R
        for u, v, base, b in self.dynamic:
            R[u][v]["capacity"] = base + _ps(lam * b)
        with _no_gc():
            preflow_push(R, S, T, residual=R, value_only=True)
        # the edge side: nodes that can still reach t in the residual network
        edge, queue, pred = {T}, deque([T]), R.pred
        while queue:
            v = queue.popleft()
            for u, attr in pred[v].items():
                if u not in edge and attr["flow"] < attr["capacity"]:
                    edge.add(u)
                    queue.append(u)
        node = self.node
        return frozenset(i for i in range(self.problem.n) if node(i) not in edge)


def _residual(edges: dict, S, T) -> nx.DiGraph:
    """networkx's residual network (what `build_residual_network` makes), built directly: both
    directions of every edge, infinite capacities as 3x the sum of the finite ones."""
    inf = 3 * sum(c for c in edges.values() if c) or 1
    edges = {e: c for e, c in edges.items() if c != 0}
    caps = {e: inf if c is None else c for e, c in edges.items()}
    for u, v in edges:
        caps.setdefault((v, u), 0)
    R = nx.DiGraph()
    R.add_nodes_from((S, T))
    R.add_edges_from((u, v, {"capacity": c}) for (u, v), c in caps.items())
    R.graph["inf"] = inf
    return R


@contextmanager
def _no_gc():
    """Pause the cyclic garbage collector: the flow network is many small dicts, and with torch
    loaded a full collection triggered by them costs more than the whole solve."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def lam_of(link: Link) -> float:
    """Seconds per byte on `link`."""
    return 8.0 / link.bandwidth


class Block:
    """Nodes start..end of a problem between two articulation nodes (`CutProblem.articulations`):
    a cut whose boundary lies here has everything before `start` on the device and everything
    after `end` on the edge, so the block is cut on its own and constants are added. A block
    with at most `enumerate_up_to` cuts (a residual arm, a short chain) lists them all; a
    larger one gets its own DADS network."""

    def __init__(self, p: CutProblem, start: int, end: int, last: bool, lam_max: float, enumerate_up_to: int):
        self.start, self.end, self.last = start, end, last
        self.sub = p.restrict(start, end, tail_on_edge=not last)
        self.pre_s = sum(p.device_s[:start]) + sum(p.edge_s[end + 1:])
        self.down = sum(p.out_bytes[s] for s in p.sinks if s > end)
        self.cuts = _all_cuts(self.sub, enumerate_up_to)
        self.lam_max, self._net = lam_max, None
        if self.cuts is None:  # cuts that are always valid: their cost bounds the optimum
            forced = self.sub.cost(i for i in range(self.sub.n) if self.sub.forced[i])
            self.bounds = [forced.line()] + ([self.sub.device_only().line()] if last else [])

    @property
    def net(self) -> DadsNetwork | None:
        """The block's flow network (built on first use); None for an enumerated block."""
        if self._net is None and self.cuts is None:
            self._net = DadsNetwork(self.sub, self.lam_max)
        return self._net

    def cut(self, lam: float) -> CutCost:
        if self.cuts is not None:
            return prefer(self.cuts, lambda c: _value(c.line(), lam))
        merged = _merges(self.sub, lam, min(_value(b, lam) for b in self.bounds))
        if merged is None:
            return self.net.cut(lam)
        return self.sub.cost(DadsNetwork(self.sub, lam, merged).solve(lam))


    def line(self, local: CutCost) -> tuple[float, int]:
        """The whole problem's A + lam * B of a cut of this block."""
        a, b = local.line()
        return a + self.pre_s, b + self.down

    def to_global(self, p: CutProblem, local: CutCost) -> CutCost:
        return p.cost(list(range(self.start)) + [self.start + i for i in local.device])


def _merges(p: CutProblem, lam: float, bound: float) -> list | None:
    """Which nodes can share one network node at rate `lam`: sending u's output alone costs more
    than `bound` (the cost of a valid cut), so no optimal cut separates u from its consumers.
    At low bandwidth this shrinks the network many times over; None when under a quarter of the
    nodes would merge (then the prebuilt network is cheaper)."""
    parent = list(range(p.n + 2))  # p.n stands for S, p.n + 1 for T

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, b):
        parent[find(a)] = find(b)

    for i in range(p.n):
        if p.forced[i] or p.forced_edge[i]:
            union(i, p.n if p.forced[i] else p.n + 1)
    limit, unions = bound * (1 + 1e-9) + 1e-12, 0
    for i in range(p.n):
        if p.succs[i] and lam * p.out_bytes[i] > limit:
            for c in p.succs[i]:
                if find(i) != find(c):
                    union(i, c)
                    unions += 1
    s, t = find(p.n), find(p.n + 1)
    if s == t or 4 * unions < p.n:
        return None
    return [S if r == s else T if r == t else r for r in map(find, range(p.n))]

def _all_cuts(p: CutProblem, cap: int) -> list[CutCost] | None:
    """Every cut of `p` (device sets closed under predecessors), or None if there are more than
    `cap`: grown node by node in graph order, a node may join the device if its inputs did."""
    sets = [()]
    for i in range(p.n):
        if p.forced[i] or p.forced_edge[i]:
            sets = [s + (p.forced[i],) for s in sets]
            continue
        sets = [s + (on,) for s in sets for on in (False, True) if not on or all(s[j] for j in p.preds[i])]
        if len(sets) > cap:
            return None
    return [cc for cc in (p.cost(i for i, on in enumerate(s) if on) for s in sets) if p.can_send(cc)]


class MinCut:
    """The minimum cut of a `CutProblem` at transfer rates up to `lam_max` (seconds per byte).

    A problem with articulation nodes (a chain; ResNet between its blocks) splits into blocks,
    each cut on its own (`Block`); the best block wins. Problems where a node other than a
    placeholder has no inputs, or with several sinks, are cut as one block."""

    def __init__(self, problem: CutProblem, lam_max: float, enumerate_up_to: int = 16):
        self.problem = p = problem
        cuts = p.articulations()
        sources = [i for i in range(p.n) if not p.preds[i] and not p.forced[i]]
        late_inputs = cuts and any(p.forced[i] for i in range(cuts[0], p.n))
        if sources or late_inputs or len(p.sinks) != 1:
            cuts = []
        bounds = [0, *cuts, p.n - 1]
        with _no_gc():
            self.blocks = [Block(p, a, b, b == p.n - 1, lam_max, enumerate_up_to) for a, b in zip(bounds, bounds[1:])
                           if b > a or p.n == 1]
        self._global = {}

    def _best(self, per_block: list, lam: float) -> CutCost:
        value = [_value(b.line(c), lam) for b, c in zip(self.blocks, per_block)]
        near = min(value) * (1 + TIE)  # on a tie, the cut with the most on the device (`prefer`)
        k = max((j for j in range(len(self.blocks)) if value[j] <= near),
                key=lambda j: (self.blocks[j].start + len(per_block[j].device), j))
        key = (k, per_block[k].device)
        if key not in self._global:
            self._global[key] = self.blocks[k].to_global(self.problem, per_block[k])
        return self._global[key]

    def cut(self, lam: float) -> CutCost:
        """A minimum cut at rate `lam` (without the link's fixed cost)."""
        with _no_gc():
            return self._best([b.cut(lam) for b in self.blocks], lam)

    def envelope(self, lams) -> list[CutCost]:
        """A minimum cut at every rate in `lams`, sharing work across rates (`envelope`)."""
        with _no_gc():
            per_block = [envelope(b.cut, lams) if b.cuts is None else [b.cut(x) for x in lams]
                         for b in self.blocks]
            return [self._best([cuts[k] for cuts in per_block], lam) for k, lam in enumerate(lams)]


def _value(line: tuple[float, int], lam: float) -> float:
    return line[0] + lam * line[1]


def envelope(cut_at, lams) -> list[CutCost]:
    """`cut_at(lam)` (a minimum cut) at every rate in `lams`, with few calls.

    A cut costs A + lam * B, so the minimum is the lower envelope of lines, concave in lam.
    Eisner-Severance: cut at both ends; where two optimal lines cross, one more cut either finds
    a new line below them or certifies both pieces. That takes 2 * pieces - 1 cuts."""
    lams = [float(x) for x in lams]
    lo, hi = min(lams), max(lams)
    ends = (cut_at(lo), cut_at(hi))
    lines, stack, budget = list(ends), [(lo, ends[0], hi, ends[1])], 2 * len(lams) + 8
    while stack and budget > 0:
        l1, c1, l2, c2 = stack.pop()
        (a1, b1), (a2, b2) = c1.line(), c2.line()
        if c1.device == c2.device or b1 <= b2:
            continue  # one line, or c1 is below c2 on all of [l1, l2]
        x = min(max((a2 - a1) / (b1 - b2), l1), l2)  # where the two lines cross
        c, budget = cut_at(x), budget - 1
        best = min(_value(c1.line(), x), _value(c2.line(), x))
        if _value(c.line(), x) >= best - (1e-9 + 1e-9 * best):
            continue  # nothing below the two lines on [l1, l2]
        lines.append(c)
        stack += [(l1, c1, x, c), (x, c, l2, c2)]
    if stack:  # did not converge (float trouble): cut at every rate
        return [cut_at(x) for x in lams]
    return [prefer(lines, lambda c: _value(c.line(), x)) for x in lams]


def local_or(problem: CutProblem, cut: CutCost, link: Link) -> CutCost:
    """`cut` (a min cut) with the link's fixed cost paid, or device-only if that is faster (or
    as fast, within `TIE`): the min cut is the best offloading cut, so one of the two is the best cut."""
    local = problem.device_only()
    if cut.offloaded and cut.latency(link) * (1 + TIE) < local.latency(link):
        return cut
    return local


def best_cut(problem: CutProblem, link: Link) -> CutCost:
    """The latency-minimal cut of `problem` over `link` (device-only wins ties)."""
    lam = lam_of(link)
    return local_or(problem, MinCut(problem, lam).cut(lam), link)
