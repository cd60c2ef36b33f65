"""The picture of a plan: per-layer device and edge latency with output sizes (the
Neurosurgeon/Edgent figure) with the chosen cut and exit marked, and the plan table against
bandwidth. Input is plain data (`layer_rows`, a PlanTable), so an artifact can be explained
without torch.
"""
from __future__ import annotations

import math

from edgecut.types import Plan, PlanTable
from edgecut.units import format_bandwidth


def layer_rows(gm) -> list[dict]:
    """Per-node rows {name, kind, exit, device_s, edge_s, bytes} in topological order, from an
    annotated graph (annotate_cost must have run); `exit` is the exit id of head nodes, else None."""
    from edgecut.frontend import meta

    rows = []
    for n in gm.graph.nodes:
        if n.op in ("output", "get_attr"):
            continue
        eid = n.meta.get(meta.EXIT_ID)
        rows.append({"name": n.name, "kind": n.meta.get(meta.KIND, "other"), "exit": eid,
                     "device_s": float(n.meta.get(meta.DEVICE_S, 0.0)), "edge_s": float(n.meta.get(meta.EDGE_S, 0.0)),
                     "bytes": int(n.meta.get(meta.OUT_BYTES, 0))})
    return rows


def render(path: str, layers: list[dict], table: PlanTable, plan: Plan | None = None, *,
           title: str = "", bandwidth: float | None = None) -> str:
    """Write a PNG (or any format matplotlib knows from the suffix) to `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = plan or (table.lookup(bandwidth) if bandwidth else table.plans[-1])
    layers = [r for r in layers if r.get("exit") is None or r["exit"] == plan.exit]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 8.5), gridspec_kw={"height_ratios": [3, 2]})
    _layers_panel(ax, layers, plan)
    _table_panel(bx, table, plan, bandwidth)
    fig.suptitle(title or f"plan {plan.id}: {plan.latency_s * 1e3:.1f} ms predicted", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layers_panel(ax, layers: list[dict], plan: Plan) -> None:
    import numpy as np

    names = [r["name"] for r in layers]
    x = np.arange(len(layers))
    dev = np.array([r["device_s"] for r in layers]) * 1e3
    edge = np.array([r["edge_s"] for r in layers]) * 1e3
    w = 0.4
    on_device = np.array([r["name"] in plan.cut.device for r in layers])
    ax.bar(x - w / 2, dev, w, color=np.where(on_device, "#1f77b4", "#aec7e8"), label="device latency (ms)")
    ax.bar(x + w / 2, edge, w, color=np.where(on_device, "#ffbb78", "#ff7f0e"), label="edge latency (ms)")
    ax.set_ylabel("predicted latency per layer (ms)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7 if len(names) < 60 else 5)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    twin = ax.twinx()
    twin.plot(x, [r["bytes"] / 1024 for r in layers], "k.-", lw=1, ms=4, label="output size (KiB)")
    twin.set_ylabel("output size (KiB)")
    if any(r["bytes"] > 0 for r in layers):
        twin.set_yscale("log")
    # The cut: after the last device layer in topological order.
    if plan.cut.crossing:
        last = max(i for i, r in enumerate(layers) if on_device[i])
        ax.axvline(last + 0.5, color="red", lw=2, ls="--")
        ax.text(last + 0.6, ax.get_ylim()[1] * 0.92, f"cut: {', '.join(plan.cut.crossing)}\n"
                f"sends {plan.cut.crossing_bytes / 1024:.1f} KiB ({plan.codec})", color="red", fontsize=9, va="top")
    else:
        ax.text(0.5, 0.92, "device-only: nothing crosses", transform=ax.transAxes, color="red", ha="center")
    exits = [i for i, r in enumerate(layers) if r.get("exit") is not None]
    if exits:
        ax.axvspan(min(exits) - 0.5, max(exits) + 0.5, color="green", alpha=0.08)
        ax.text(min(exits), ax.get_ylim()[1] * 0.75, f"exit {plan.exit} head", color="green", fontsize=9)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    ax.set_title(f"per-layer cost; device part in dark colours (exit {plan.exit}, "
                 f"device {plan.device_s * 1e3:.1f} ms + transfer {plan.transfer_s * 1e3:.1f} ms "
                 f"+ edge {plan.edge_s * 1e3:.1f} ms)", fontsize=10)


def _table_panel(bx, table: PlanTable, plan: Plan, bandwidth: float | None) -> None:
    import matplotlib.pyplot as plt

    hi_all = max(table.bounds[-1] * 10, 1e9)
    colours = plt.get_cmap("tab10")
    exits = sorted({p.exit for p in table.plans})
    for i, (lo, p) in enumerate(zip(table.bounds, table.plans)):
        hi = table.bounds[i + 1] if i + 1 < len(table.bounds) else hi_all
        c = colours(exits.index(p.exit) % 10)
        bx.fill_between([lo, hi], 0, p.latency_s * 1e3, color=c, alpha=0.35 if p.feasible else 0.12,
                        step="pre", hatch=None if p.feasible else "//")
        bx.hlines(p.latency_s * 1e3, lo, hi, color=c, lw=2)
        mid = math.sqrt(lo * hi)
        codec = "" if p.codec == "fp32" else f"\n{p.codec}"
        bx.text(mid, p.latency_s * 1e3, f"e{p.exit}\n{p.cut.name}{codec}", ha="center", va="bottom", fontsize=7)
    if math.isfinite(table.deadline):
        bx.axhline(table.deadline * 1e3, color="red", ls="--", lw=1, label=f"deadline {table.deadline * 1e3:.0f} ms")
    if bandwidth:
        bx.axvline(bandwidth, color="black", ls=":", lw=1, label=f"now: {format_bandwidth(bandwidth)}")
    bx.set_xscale("log")
    bx.set_xlim(table.bounds[0], hi_all)
    bx.set_xlabel("bandwidth (bit/s)")
    bx.set_ylabel("predicted latency (ms)")
    bx.set_title("plan table: the plan per bandwidth range (colour = exit; hatched = infeasible)", fontsize=10)
    bx.legend(loc="upper right", fontsize=8)


def codec_lines(candidates, measured: dict) -> list[str]:
    """The crossing bytes of every offloading cut under each codec compiled (fp32 from the cut,
    the others as measured on validation data, `measured` = `manifest.info["codecs"]`), and each
    plan's codec and accuracy; empty when the artifact has fp32 only."""
    if not measured:
        return []
    names = sorted({v["codec"] for v in measured.values()}, key=lambda c: (c.split("+")[0] != "fp32", c))
    cuts: dict = {}
    for p in candidates:
        if p.codec == "fp32" and not p.cut.device_only:
            cuts.setdefault(p.id, {})["fp32"] = f"{p.cut.crossing_bytes}"
    for pid, v in measured.items():
        base_id = pid.rpartition("@")[0]
        cuts.setdefault(base_id, {})[v["codec"]] = f"{v['bytes']:.0f}" + ("" if v["kept"] else "*")
    cols = ["fp32", *names]
    lines = ["  crossing bytes per cut (measured on validation data; * = dropped: loses more than max_accuracy_loss)",
             f"  {'plan':<30}" + "".join(f"{c:>11}" for c in cols)]
    for pid, row in cuts.items():
        lines.append(f"  {pid[:30]:<30}" + "".join(f"{row.get(c, '-'):>11}" for c in cols))
    lines.append(f"  {'plan (exit/cut@codec)':<44} {'codec':<10} {'accuracy':>8}  measured loss")
    for p in candidates:
        loss = measured.get(p.id, {}).get("loss")
        lines.append(f"  {p.id[:44]:<44} {p.codec:<10} {p.accuracy:>8.3f}  "
                     + ("-" if loss is None else f"{100 * loss:.1f} points"))
    return lines
