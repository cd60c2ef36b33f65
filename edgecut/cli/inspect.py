"""`edgecut inspect MODEL [--input SHAPE] [--json]`: per-layer table and totals."""
from __future__ import annotations

import json

from edgecut.frontend import meta
from edgecut.units import format_bytes


def register(sub) -> None:
    p = sub.add_parser("inspect", help="trace a model and print its layers, shapes, bytes, MACs and params",
                       description="Trace MODEL with torch.fx and print a per-layer table with totals.")
    p.add_argument("model", help="edgecut.zoo:NAME or path/to/file.py:Factory")
    p.add_argument("--input", metavar="SHAPE", help="example input shape, e.g. 1x3x224x224 (zoo models have a default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def layer_rows(gm) -> list[dict]:
    rows = []
    for n in gm.graph.nodes:
        if n.op in ("output", "get_attr"):
            continue
        m = n.meta
        rows.append({"name": n.name, "kind": m[meta.KIND], "type": m[meta.MODULE_TYPE],
                     "shape": list(m[meta.SHAPE]) if m[meta.SHAPE] else None, "dtype": m[meta.DTYPE],
                     "bytes": m[meta.OUT_BYTES], "macs": m[meta.MACS], "params": m[meta.PARAMS],
                     "features": list(m[meta.FEATURES])})
    return rows


def totals(gm) -> dict:
    nodes = list(gm.graph.nodes)
    return {"macs": sum(n.meta[meta.MACS] for n in nodes), "params": sum(n.meta[meta.PARAMS] for n in nodes),
            "param_bytes": sum(n.meta[meta.PARAM_BYTES] for n in nodes),
            "activation_bytes": sum(n.meta[meta.OUT_BYTES] for n in nodes if n.op not in ("output", "get_attr")),
            "layers": sum(1 for n in nodes if n.op in ("call_module", "call_function", "call_method"))}


def run(args) -> int:
    from edgecut.cli._common import load_model_and_input
    from edgecut.frontend import trace

    model, name, x = load_model_and_input(args.model, args.input)
    gm = trace(model, x)
    rows, total = layer_rows(gm), totals(gm)
    if args.json:
        print(json.dumps({"model": name, "input": list(x.shape), "layers": rows, "total": total}))
        return 0
    w = max(8, *(len(r["name"]) for r in rows))
    print(f"{'name':<{w}}  {'kind':<12} {'output shape':<20} {'bytes':>10} {'MACs':>14} {'params':>12}")
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] and isinstance(r["shape"][0], int) else str(r["shape"])
        print(f"{r['name']:<{w}}  {r['kind']:<12} {shape:<20} {format_bytes(r['bytes']):>10} "
              f"{r['macs']:>14,} {r['params']:>12,}")
    print(f"total: {total['layers']} layers, {total['macs'] / 1e9:.3f} GMACs, {total['params']:,} params "
          f"({format_bytes(total['param_bytes'])}), activations {format_bytes(total['activation_bytes'])}")
    return 0
