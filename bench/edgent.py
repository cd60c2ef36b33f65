"""Edgent's experiment on the emulated link: accuracy met under deadlines, across bandwidths.

Strategies (all on the same trained alexnet_cifar with 5 exits, the same emulated device, the same
edge server and link emulator, each request through the real runtime):
  edgecut          exit + cut chosen per bandwidth under the deadline (Edgent; DAG min cut)
  edgecut+ee       the same, plus BranchyNet early exit on the device when confident
  neurosurgeon     partition only: the final exit's lowest-latency cut
  right-sizing     exits only, no partition: the most accurate exit that fits, on the device
  device-only      the final exit on the device
  edge-only        the final exit on the edge (the input is sent)
Each strategy is told the link's true bandwidth. A request counts as "within deadline and correct"
when it returns within the deadline with the right label; a late answer counts as a miss.

The device is emulated (`runtime.emulate.EmulatedDevice` with a fixed `DeviceModel`, by default
`PI_CLASS`) and planned with that model's profile, so its speed does not depend on this machine.

    python bench/edgent.py [--requests 40] [--device-macs 0.7e9] [--device-call-ms 0.5] [--epochs 15]
Last line: `edgecut accuracy-within-deadline X vs best baseline Y (name)`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

import edgecut
from edgecut import zoo
from edgecut.codegen.artifact import build_artifact
from edgecut.codegen.load import load
from edgecut.codegen.manifest import Manifest
from edgecut.costmodel.profile import load_profile
from edgecut.data import digits
from edgecut.passes.candidates import predict_routes
from edgecut.passes.find_cuts import cut_problem, exit_specs
from edgecut.passes.solve import exit_order, make_plan, solve
from edgecut.runtime.client import DeviceRuntime
from edgecut.runtime.emulate import PI_CLASS, EmulatedDevice
from edgecut.runtime.linkemu import LinkEmulator
from edgecut.runtime.server import EdgeServer
from edgecut.types import Link, PlanTable
from edgecut.units import format_bandwidth, format_time

STRATEGIES = ("edgecut", "edgecut+ee", "neurosurgeon", "right-sizing", "device-only", "edge-only")


def plan_for(strategy: str, gm, link: Link, deadline: float):
    """The plan `strategy` runs at this link and deadline."""
    if strategy in ("edgecut", "edgecut+ee"):
        return solve(gm, link, deadline)
    if strategy == "neurosurgeon":
        return solve(gm, link, deadline, objective="latency")
    exits = exit_specs(gm)
    if strategy in ("device-only", "edge-only"):
        p = cut_problem(gm, exits[-1]["id"])
        cc = p.device_only() if strategy == "device-only" else p.cost([i for i in range(p.n) if p.forced[i]])
        return make_plan(p, cc, link, deadline, 0.0)
    # right-sizing: the most accurate exit whose device-only run fits; else the fastest
    plans = [make_plan(p, p.device_only(), link, deadline, 0.0)
             for p in (cut_problem(gm, e["id"]) for e in exit_order(exits, "accuracy"))]
    return next((p for p in plans if p.feasible), min(plans, key=lambda p: p.latency_s))


class FixedPlan:
    """A device part that always plans `plan` (the strategy's choice)."""

    def __init__(self, part, plan, deadline):
        self._part, self.table = part, PlanTable((0.0,), (plan,), deadline)

    def __getattr__(self, name):
        return getattr(self._part, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--device-macs", type=float, default=PI_CLASS.macs_per_s, help="emulated device MAC/s")
    ap.add_argument("--device-call-ms", type=float, default=PI_CLASS.call_s * 1e3, help="emulated device ms a call")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--rtt", type=float, default=0.02)
    ap.add_argument("--bandwidths", default="0.5,2,8,32", help="Mbit/s, comma-separated")
    ap.add_argument("--deadlines", default="30,60,100", help="ms, comma-separated")
    ap.add_argument("--out", default="bench-out/edgent")
    a = ap.parse_args()
    bws = [float(b) * 1e6 for b in a.bandwidths.split(",")]
    deadlines = [float(d) / 1e3 for d in a.deadlines.split(",")]

    torch.manual_seed(0)
    train, val, test = digits((3, 32, 32))
    x0 = test[0][0].unsqueeze(0)
    edge_prof = load_profile("local")
    device = replace(PI_CLASS, macs_per_s=a.device_macs, call_s=a.device_call_ms / 1e3)
    dev_prof = device.profile()
    t0 = time.monotonic()
    art = edgecut.compile(zoo.get("alexnet_cifar"), x0, target="local", edge="local", deadline=deadlines[0],
                          data=(train, val, test), profile=dev_prof, edge_profile=edge_prof, rtt=a.rtt,
                          epochs=a.epochs, out_dir=f"{a.out}/trained", name="alexnet_cifar")
    gm = art.gm
    print(f"trained and compiled in {time.monotonic() - t0:.0f} s; exit test accuracy "
          + ", ".join(f"{x:.3f}" for x in art.info.get("test_accuracy", [])))

    overhead = art.info["overhead"]
    choice = {(s, bw, d): plan_for(s, gm, Link(bw, a.rtt, overhead), d)
              for s in STRATEGIES for bw in bws for d in deadlines}
    # One artifact per set of plans a strategy uses (as compile would build it), so that no
    # strategy pays for segments cut for another's plans.
    paths, groups, predicted = {}, {}, {}
    for (s, bw, d), p in choice.items():
        groups.setdefault((s, d), {})[p.id] = p
    for key, plans in groups.items():
        ids = tuple(sorted(plans))
        if ids not in paths:
            path = f"{a.out}/plans-{len(paths)}"
            carrier = PlanTable(tuple(float(i) for i in range(len(ids))), tuple(plans[i] for i in ids), key[1])
            m = build_artifact(gm, carrier, "local", "local", path, (x0,), model_name="alexnet_cifar", onnx=False,
                               progress=False)
            for ee in (False, True):     # as built: the nodes' seconds and one segment call per library call
                predicted[path, ee] = {p.id: p for p in predict_routes(gm, m, dev_prof, edge_prof, early_exit=ee)}
            paths[ids] = path
        groups[key] = paths[ids]
    print(f"{len(paths)} artifacts for {len(groups)} (strategy, deadline) pairs")

    xs = np.stack([test[i][0].numpy() for i in range(len(test))])[:, None]
    ys = np.array([int(test[i][1]) for i in range(len(test))])
    order = np.random.default_rng(0).permutation(len(xs))[: a.requests]
    offload = [path for path in paths.values() if any(r.edge for r in Manifest.read(path).routes.values())]
    servers = {path: EdgeServer(path, "127.0.0.1", 0, workers=1).start() for path in offload}   # device-only: no edge
    links = {path: LinkEmulator(("127.0.0.1", 0), srv.address, rate=bws[0], delay=a.rtt / 2).start()
             for path, srv in servers.items()}
    devices = {path: EmulatedDevice(load(path, "device"), device) for path in paths.values()}
    score = {s: [] for s in STRATEGIES}
    rows = []
    try:
        for bw in bws:
            for link in links.values():
                link.set_rate(bw, bw)
            for d in deadlines:
                for s in STRATEGIES:
                    plan, path = choice[(s, bw, d)], groups[(s, d)]
                    rt = DeviceRuntime(FixedPlan(devices[path], plan, d),
                                       edge=links[path].address if path in links else None,
                                       probe_interval=None, early_exit=(s == "edgecut+ee"), initial_bandwidth=bw)
                    ok = met = 0
                    lat = []
                    try:
                        rt.probe()      # connect (and measure) before the timed requests, as a device would
                        for i in order:
                            r = rt.infer(xs[i], deadline=d)
                            lat.append(r.total_s)
                            in_time = r.total_s <= d
                            met += in_time
                            ok += in_time and int(np.argmax(r.logits)) == int(ys[i])
                    finally:
                        rt.close()
                    score[s].append(ok / len(order))
                    built = predicted[path, s == "edgecut+ee"][plan.id]
                    rows.append((format_bandwidth(bw), format_time(d), s, plan.id,
                                 format_time(built.device_s + plan.transfer_s + built.edge_s),
                                 format_time(statistics.median(lat)), f"{100 * met / len(order):.0f}%",
                                 f"{ok / len(order):.3f}"))
                    print("  ".join(rows[-1]), flush=True)
    finally:
        for link in links.values():
            link.stop()
        for srv in servers.values():
            srv.shutdown(drain_timeout=5)

    print("\n| bandwidth | deadline | strategy | plan | predicted | measured (median) | deadline met | "
          "accuracy within deadline |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\n| strategy | mean accuracy within deadline |\n|---|---|")
    means = {s: statistics.mean(v) for s, v in score.items()}
    for s, m in means.items():
        print(f"| {s} | {m:.3f} |")
    best = max((s for s in STRATEGIES if not s.startswith("edgecut")), key=means.get)
    print(f"edgecut accuracy-within-deadline {means['edgecut']:.3f} vs best baseline {means[best]:.3f} ({best})")


if __name__ == "__main__":
    main()
