"""split: cut an (exit-lowered or multi-exit) fx graph into segments at every cut the plan table uses.

Each node gets a signature: for every distinct cut in the table, whether the node is on the
device, and for every exit, whether the exit's logits need it. Nodes with equal signatures form
one segment. Every cut and every exit head is then a union of whole segments, so the device can
switch plans (move the cut, take another exit, stop at an early exit) without recompiling. The
segments form a DAG: an edge u -> v between segments implies sig(u) >= sig(v) componentwise,
because device sets are closed under predecessors and so are exits' ancestor sets.

Reads `gm.meta[meta.EXITS]` (exit id -> logits node, branch point, threshold) when present;
otherwise the graph's single output is exit 0 (or the largest id any plan names). Needs
`edgecut.trace` (and, for multi-exit graphs, `insert_exits`) before. Does not modify `gm`.
"""
from __future__ import annotations

import heapq
import math
import torch.fx as fx

from edgecut.codegen.manifest import ExitSpec, Route, Segment
from edgecut.errors import CodegenError
from edgecut.frontend import meta
from edgecut.types import PlanTable


def _num(v) -> float:
    return math.nan if v is None else float(v)


def exit_specs(gm: fx.GraphModule, plans=()) -> list[ExitSpec]:
    """The exits of `gm` from `gm.meta[meta.EXITS]` (on a view lowered to one exit, that exit
    only), or the graph's single output as the only exit (id 0, or the largest a plan names)."""
    names = {n.name for n in gm.graph.nodes}
    entries = [e for e in gm.meta.get(meta.EXITS) or () if e.get("output")]
    lowered = gm.meta.get(meta.EXIT)
    if lowered is not None:
        entries = [e for e in entries if e["id"] == lowered]
    if entries:
        return [ExitSpec(int(e["id"]), e["output"], e.get("point") or e["output"], _num(e.get("accuracy")),
                         _num(e.get("threshold")))
                for e in sorted(entries, key=lambda e: e["id"]) if lowered is not None or e["output"] in names]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    res = out.args[0]
    if isinstance(res, (tuple, list)):
        if len(res) != 1:
            raise CodegenError(f"graph {type(gm).__name__} returns {len(res)} values and has no "
                               f"gm.meta[{meta.EXITS!r}] saying which are exits; run insert_exits, "
                               "or trace a model that returns one tensor")
        res = res[0]
    if not isinstance(res, fx.Node):
        raise CodegenError("the graph output is not a tensor node; trace a model that returns one tensor")
    eid = lowered if lowered is not None else max((p.exit for p in _plans(plans)), default=0)
    return [ExitSpec(int(eid), res.name, res.name)]


def _ancestors(node: fx.Node) -> set[str]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.name in seen or n.op == "get_attr":
            continue
        seen.add(n.name)
        stack.extend(n.all_input_nodes)
    return seen


def _plans(plans) -> tuple:
    return tuple(plans.plans) if isinstance(plans, PlanTable) else tuple(plans)


def split(gm: fx.GraphModule, plans, exits: list[ExitSpec] | None = None):
    """Segments and one Route per plan (a PlanTable or Plans): (segments, {plan id: Route}, exits)."""
    plans = _plans(plans)
    exits = exits if exits is not None else exit_specs(gm, plans)
    by_id = {e.id: e for e in exits}
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    for p in plans:
        if p.exit not in by_id:
            raise CodegenError(f"plan {p.id!r} names exit {p.exit}, but the graph has exits "
                               f"{sorted(by_id)}; build the table from this graph")
        unknown = sorted(set(p.cut.device) - set(nodes))
        if unknown:
            raise CodegenError(f"plan {p.id!r}: cut {p.cut.name!r} names nodes the graph lacks: {unknown[:5]}; "
                               "the plan table was made for another graph")
    for e in exits:
        if e.output not in nodes:
            raise CodegenError(f"exit {e.id}: logits node {e.output!r} is not in the graph")
    anc = {e.id: _ancestors(nodes[e.output]) for e in exits}
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for p in plans:
        device = set(p.cut.device) | set(placeholders)
        for name in sorted(device & anc[p.exit], key=list(nodes).index):
            missing = [a.name for a in nodes[name].all_input_nodes if a.op != "get_attr" and a.name not in device]
            if missing:
                raise CodegenError(f"plan {p.id!r}: cut {p.cut.name!r} puts {name!r} on the device but not its "
                                   f"input {missing[0]!r}; a cut's device set must be closed under predecessors")
    cuts = sorted({frozenset(p.cut.device) for p in plans}, key=lambda s: (len(s), sorted(s)))

    # 1. signatures -> atoms (segments)
    wanted = set().union(*anc.values()) - set(placeholders)
    sig_of = {name: (tuple(name in c for c in cuts), tuple(name in anc[e.id] for e in exits))
              for name in wanted}
    groups: dict[tuple, list[str]] = {}
    for name in sorted(wanted, key=order.__getitem__):
        groups.setdefault(sig_of[name], []).append(name)
    atom_of = {n: sig for sig, members in groups.items() for n in members}

    # 2. order atoms topologically; an atom is ready as soon as the nodes it reads exist, so a
    #    head is placed right after its branch point (early exits stop early)
    def inputs_of(members):
        ins, own = [], set(members)
        for m in members:
            for a in nodes[m].all_input_nodes:
                if a.op != "get_attr" and a.name not in own and a.name not in ins:
                    ins.append(a.name)
        return ins

    atom_inputs = {sig: inputs_of(ms) for sig, ms in groups.items()}
    deps = {sig: {atom_of[i] for i in atom_inputs[sig] if i in atom_of} for sig in groups}
    key = {sig: (max((order[i] for i in atom_inputs[sig]), default=-1), order[groups[sig][0]]) for sig in groups}
    ready = [(key[s], s) for s in groups if not deps[s]]
    heapq.heapify(ready)
    topo, done = [], set()
    while ready:
        _, s = heapq.heappop(ready)
        topo.append(s)
        done.add(s)
        for t in groups:
            if t not in done and deps[t] and deps[t] <= done and all(r[1] != t for r in ready):
                heapq.heappush(ready, (key[t], t))
    assert len(topo) == len(groups), "segment graph has a cycle"

    # 3. segments: outputs are the nodes read by another segment or that are exit logits
    read_elsewhere = {i for s in groups for i in atom_inputs[s]} | {e.output for e in exits}
    segments, name_of = [], {}
    for k, sig in enumerate(topo):
        members = groups[sig]
        name_of[sig] = f"seg{k}"
        segments.append(Segment(f"seg{k}", tuple(members), tuple(atom_inputs[sig]),
                                tuple(m for m in members if m in read_elsewhere)))
    seg_by_name = {s.name: s for s in segments}

    # 4. one route per plan
    routes = {}
    for p in plans:
        routes[p.id] = _route(p, seg_by_name, [name_of[s] for s in topo], groups, topo, anc, exits,
                              set(placeholders), nodes)
    return segments, routes, exits


def _route(plan, seg_by_name, seg_order, groups, topo, anc, exits, placeholders, nodes) -> Route:
    need = anc[plan.exit]
    device_set = set(plan.cut.device) | placeholders
    mine = [(name, groups[sig]) for name, sig in zip(seg_order, topo) if set(groups[sig]) <= need]
    dev = [name for name, ms in mine if ms[0] in device_set]
    edge = [name for name, ms in mine if ms[0] not in device_set]
    computed, after = set(placeholders), [set(placeholders)]
    for name in dev:
        missing = [i for i in seg_by_name[name].inputs if i not in computed]
        if missing:
            raise CodegenError(f"plan {plan.id!r}: cut {plan.cut.name!r} puts {seg_by_name[name].nodes[0]!r} "
                               f"on the device but not its input {missing[0]!r}; a cut's device set must "
                               "be closed under predecessors")
        computed.update(seg_by_name[name].nodes)
        after.append(set(computed))
    edge_reads = {i for name in edge for i in seg_by_name[name].inputs}
    order = list(nodes)
    crossing = sorted(edge_reads & computed, key=order.index)
    # early exits: exits before the plan's whose heads can run on what the device computes
    checks = []
    for e in exits:
        if e.id >= plan.exit or math.isnan(e.threshold) or e.output in computed:
            continue
        head = [name for name, sig in zip(seg_order, topo) if set(groups[sig]) <= anc[e.id] and name not in dev]
        own = {n for h in head for n in seg_by_name[h].nodes}
        reads = {i for h in head for i in seg_by_name[h].inputs} - own
        k = next((k for k, have in enumerate(after) if reads <= have), None)
        if k is not None and e.point in computed:
            checks.append((k, e.id, tuple(head)))
    checks.sort(key=lambda c: (c[0], c[1]))
    return Route(plan.id, plan.exit, tuple(dev), tuple(edge), tuple(crossing), tuple(checks))


def segment_module(gm: fx.GraphModule, seg: Segment) -> fx.GraphModule:
    """The fx GraphModule of one segment: placeholders named as `seg.inputs`, a tuple of
    `seg.outputs` returned; submodules and attributes it uses are shared with `gm`."""
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in seg.inputs:
        ph = g.placeholder(name)
        ph.meta = dict(nodes[name].meta)
        env[name] = ph

    def arg(n: fx.Node) -> fx.Node:
        if n.name not in env:            # a get_attr: weights are copied into every segment using them
            env[n.name] = g.node_copy(n, arg)
        return env[n.name]

    for name in seg.nodes:
        env[name] = g.node_copy(nodes[name], arg)
    g.output(tuple(env[o] for o in seg.outputs))
    g.lint()
    return fx.GraphModule(gm, g, f"{type(gm).__name__}_{seg.name}")
