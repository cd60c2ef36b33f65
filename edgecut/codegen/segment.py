"""split: cut an (exit-lowered or multi-exit) fx graph into the segments its plans run.

Every plan (exit, cut) gets a `Route`: its device nodes in graph order, cut into one segment per
early-exit check span (up to the branch point of the first exit whose head can run there, then
up to the next, ...), one segment per check's head, and one edge segment from the crossing
tensors to the exit's logits. A route therefore makes as many library calls as its checks
need, however many cuts the artifact offers: the device can switch plans (move the cut, take
another exit, stop at an early exit) without recompiling, and no plan pays a segment call at
a boundary only another plan uses. Segments equal in nodes, inputs and outputs are built once
and shared; segments of different routes may overlap (a node compiled into several libraries).

Reads `gm.meta[meta.EXITS]` (exit id -> logits node, branch point, threshold) when present;
otherwise the graph's single output is exit 0 (or the largest id any plan names); each node's
work (`charged_macs`: `meta.MACS` as the cost model charges it) for `Segment.macs`. Needs `edgecut.trace` (and, for
multi-exit graphs, `insert_exits`) before. Does not modify `gm`.
"""
from __future__ import annotations

import math
import torch.fx as fx

from edgecut.codecs import coded_name, split_name
from edgecut.codecs import parse as parse_codec
from edgecut.codegen.manifest import ExitSpec, Route, Segment
from edgecut.costmodel.features import folded_into_conv, fused_into, work_features
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
    """Segments and one Route per plan (a PlanTable or Plans): (segments, {plan id: Route}, exits).

    A route's device part is one segment per early-exit check span (the device nodes up to the
    first check's branch point, then up to the next, ...), each check's head one segment, and its
    edge part one segment, so a route makes exactly as many library calls as its checks need,
    however many cuts the artifact offers. Segments equal in nodes, inputs and outputs are
    shared by the routes that use them."""
    plans = _plans(plans)
    exits = exits if exits is not None else exit_specs(gm, plans)
    by_id = {e.id: e for e in exits}
    nodes = {n.name: n for n in gm.graph.nodes}
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
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    for p in plans:
        device = set(p.cut.device) | placeholders
        for name in sorted(device & anc[p.exit], key=list(nodes).index):
            missing = [a.name for a in nodes[name].all_input_nodes if a.op != "get_attr" and a.name not in device]
            if missing:
                raise CodegenError(f"plan {p.id!r}: cut {p.cut.name!r} puts {name!r} on the device but not its "
                                   f"input {missing[0]!r}; a cut's device set must be closed under predecessors")
    made: dict[tuple, Segment] = {}

    def segment(members: list[str], outputs, coded: dict | None = None, encode=()) -> str:
        """`outputs`: the member names to return; `coded` (node -> coded tensor name): crossing
        tensors a coded plan reads as inputs, or returns coded (and raw only if in `outputs`);
        `encode`: model inputs the segment reads and returns coded (a coded input cut)."""
        coded = coded or {}
        ins = tuple(coded.get(i, i) for i in _inputs_of(members, nodes)) + tuple(encode)
        outs = tuple(x for o in members for x in ((o,) if o in outputs else ()) + ((coded[o],) if o in coded else ()))
        outs += tuple(coded[e] for e in encode)
        key = (tuple(members), ins, outs)
        if key not in made:
            made[key] = Segment(f"seg{len(made)}", *key, macs=round(sum(charged_macs(nodes[m]) for m in members)))
        return made[key].name

    routes = {p.id: _route(p, segment, nodes, anc, exits, placeholders) for p in plans}
    return list(made.values()), routes, exits


def chain_split(gm: fx.GraphModule, plans, exits: list[ExitSpec] | None = None):
    """Like `split`, but every cut is a boundary of every route: one segment between each two
    consecutive cuts, chained (a route runs several segments per side). Each node is compiled
    once, however many cuts there are, which is what checking every cut needs
    (`codegen.check_cuts`); a deployed artifact uses `split` (fewer calls per route). Needs the
    plans' device sets nested (single-tensor cuts of one exit are) and no early-exit checks;
    otherwise (or for coded plans) it returns `split(...)`."""
    plans = _plans(plans)
    exits = exits if exits is not None else exit_specs(gm, plans)
    nodes = {n.name: n for n in gm.graph.nodes}
    if len({p.exit for p in plans}) != 1 or not all(set(p.cut.device) <= set(nodes) for p in plans) \
            or any(getattr(p, "codec", "fp32") != "fp32" for p in plans):      # coded routes: split's
        return split(gm, plans, exits)
    ex = next((e for e in exits if e.id == plans[0].exit), None)
    if ex is None or any(e.id < ex.id and not math.isnan(e.threshold) for e in exits):
        return split(gm, plans, exits)
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    need = _ancestors(nodes[ex.output])
    own = {p.id: frozenset(set(p.cut.device) & need - placeholders) for p in plans}   # device nodes per plan
    sets = sorted(set(own.values()) | {frozenset()}, key=len)
    if any(not a <= b for a, b in zip(sets, sets[1:])):
        return split(gm, plans, exits)
    order = [n for n in nodes if n in need and n not in placeholders]
    sets.append(frozenset(order))
    pieces = [[n for n in order if n in b and n not in a] for a, b in zip(sets, sets[1:])]
    reads = [set(_inputs_of(piece, nodes)) for piece in pieces]
    segs = []
    for k, piece in enumerate(pieces):
        if not piece:
            segs.append(None)
            continue
        later = set().union(*reads[k + 1:]) | {ex.output}
        key = (tuple(piece), _inputs_of(piece, nodes), tuple(n for n in piece if n in later))
        segs.append(Segment(f"seg{len([x for x in segs if x])}", *key,
                            macs=round(sum(charged_macs(nodes[m]) for m in piece))))
    routes = {}
    for p in plans:
        k = sets.index(own[p.id])
        device = tuple(x.name for x in segs[:k] if x)
        edge = tuple(x.name for x in segs[k:] if x)
        edge_reads = set().union(*(set(x.inputs) for x in segs[k:] if x)) - set().union(
            *(set(x.nodes) for x in segs[k:] if x))
        routes[p.id] = Route(p.id, p.exit, device, edge, tuple(n for n in nodes if n in edge_reads))
    return [x for x in segs if x], routes, exits


def charged_macs(node: fx.Node) -> float:
    """The MACs the cost model charges `node` (`meta.MACS`, Winograd's share of a 3x3 conv; 0 for
    an epilogue fused into its producer or a batch norm folded into a conv): the work the
    compiled code does for it, and what `runtime.emulate.DeviceModel` times."""
    if meta.KIND not in node.meta:
        return float(node.meta.get(meta.MACS) or 0)
    if node.meta[meta.KIND] in meta.NO_COST_KINDS or folded_into_conv(node) or fused_into(node):
        return 0.0
    return work_features(node)["macs"]


def _inputs_of(members, nodes) -> tuple:
    """The tensors `members` read from outside, in order of first use (no weights)."""
    ins, own = [], set(members)
    for m in members:
        for a in nodes[m].all_input_nodes:
            if a.op != "get_attr" and a.name not in own and a.name not in ins:
                ins.append(a.name)
    return tuple(ins)


def _route(plan, segment, nodes, anc, exits, placeholders) -> Route:
    order = list(nodes)
    need = anc[plan.exit]
    computed = (set(plan.cut.device) & need) | placeholders
    dev = [n for n in order if n in computed and n not in placeholders]
    edge = [n for n in order if n in need and n not in computed]
    at = {n: i + 1 for i, n in enumerate(dev)}       # device nodes done once this node is
    # early exits: exits before the plan's whose heads can run on what the device computes;
    # a head runs as soon as the device nodes it reads exist
    heads = []
    for e in exits:
        if e.id >= plan.exit or math.isnan(e.threshold) or e.output in computed or e.point not in computed:
            continue
        head = [n for n in order if n in anc[e.id] and n not in computed]
        reads = set(_inputs_of(head, nodes))
        if reads <= computed:
            heads.append((max((at.get(r, 0) for r in reads), default=0), e, head))
    bounds = sorted({0, len(dev), *(pos for pos, _, _ in heads)})
    spans = [dev[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    edge_reads = set(_inputs_of(edge, nodes))
    # a coded plan's device spans return the crossing tensors coded, its edge segment reads them so
    base = parse_codec(getattr(plan, "codec", "fp32")).base
    coded = {n: coded_name(n, base) for n in edge_reads} if base != "fp32" else {}
    crossing = tuple(coded.get(n, n) for n in order if n in edge_reads)
    # a span returns what later spans, heads or the edge read, and the plan's logits
    later = [set(_inputs_of(s, nodes)) for s in spans]
    on_device = {r for _, _, h in heads for r in _inputs_of(h, nodes)} | {_logits(plan, exits)}
    wanted = on_device | (set() if coded else edge_reads)
    device = tuple(segment(s, wanted | set().union(*later[k + 1:]), coded) for k, s in enumerate(spans))
    sent_inputs = [n for n in order if n in coded and n in placeholders]
    if sent_inputs:                     # model inputs the edge reads: one more device call codes them
        device += (segment([], set(), coded, sent_inputs),)
    checks = sorted(((sum(1 for b in bounds[1:] if b <= pos), e.id, (segment(h, {e.output}),))
                     for pos, e, h in heads), key=lambda c: (c[0], c[1]))
    edge_seg = (segment(edge, {_logits(plan, exits)}, coded),) if edge else ()
    return Route(plan.id, plan.exit, device, edge_seg, crossing, tuple(checks), getattr(plan, "codec", "fp32"))


def _logits(plan, exits) -> str:
    return next(e.output for e in exits if e.id == plan.exit)


def segment_module(gm: fx.GraphModule, seg: Segment) -> fx.GraphModule:
    """The fx GraphModule of one segment: placeholders named as `seg.inputs`, a tuple of
    `seg.outputs` returned; submodules and attributes it uses are shared with `gm`."""
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in seg.inputs:
        raw = split_name(name)[0]
        ph = g.placeholder(name)
        ph.meta = dict(nodes[raw].meta) if raw == name else {}
        env[raw] = ph               # a coded input: apply_codecs decodes it before its users

    def arg(n: fx.Node) -> fx.Node:
        if n.name not in env:            # a get_attr: weights are copied into every segment using them
            env[n.name] = g.node_copy(n, arg)
        return env[n.name]

    for name in seg.nodes:
        env[name] = g.node_copy(nodes[name], arg)
    g.output(tuple(env[split_name(o)[0]] for o in seg.outputs))
    g.lint()
    seg_gm = fx.GraphModule(gm, g, f"{type(gm).__name__}_{seg.name}")
    seg_gm._edgecut_outputs = tuple(seg.outputs)
    from edgecut.codegen.codec_ops import apply_codecs

    return apply_codecs(seg_gm, gm)                     # coded inputs decoded, coded outputs encoded
