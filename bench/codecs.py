"""Codecs for the crossing tensors at low bandwidth: the best plan with codecs vs the best fp32 plan.

The Edgent bench's setup (bench/edgent.py, `edgecut.demo`): zoo.alexnet_edgent at 64x64 with an
exit after pool1, trained on digits, compiled once, here with codecs (fp32, fp16, int8, each with
and without a lossless stage); the emulated device `DEMO_DEVICE`, calibrated like a real one; an
edge server that calibrates at start; a link emulator with a 10 ms round trip. At each bandwidth
and one deadline, two devices run the same test requests through the real runtime:

  fp32     the artifact's fp32 routes only (what edgecut did before codecs)
  codecs   every route: (exit, cut, codec) chosen per request from the calibrated times

Each prints the plan it used most, measured latency (median), bytes sent (mean per request),
deadline met and test accuracy. Last line: `codecs: mean latency ratio X (coded / fp32) at
<= 8 Mbit/s, worst accuracy loss Y points, bytes ratio Z`: X and Z over the bandwidths at which
the fp32 device sends a tensor; at the others it answers on the device (nothing to code), and
they are listed apart. Y: the largest drop of test accuracy, codecs vs fp32, at any bandwidth.

    python bench/codecs.py [--requests 200] [--deadline 60] [--artifact DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import edgecut
from edgecut import zoo
from edgecut.codegen.manifest import Manifest
from edgecut.costmodel.profile import load_profile
from edgecut.data import digits
from edgecut.demo import EXIT_POINTS, MODEL, SHAPE
from edgecut.runtime.client import DeviceRuntime
from edgecut.runtime.emulate import DEMO_DEVICE
from edgecut.units import format_bandwidth, format_time

sys.path.insert(0, str(Path(__file__).parent))
from edgent import Narrowed, testbed  # noqa: E402  the Edgent bench's narrowed device part and parts

CODECS = ("fp32", "fp32+zstd", "fp16", "fp16+zstd", "int8", "int8+zstd", "int8+lz4")
BANDWIDTHS = (0.25e6, 0.5e6, 1e6, 2e6, 4e6, 8e6)


def cell(rt, xs, ys, order, deadline) -> dict:
    """Run the requests `order` of `xs`; what was measured."""
    lat, sent, plans, where = [], [], Counter(), Counter()
    met = correct = 0
    for i in order:
        r = rt.infer(xs[i], deadline=deadline)
        lat.append(r.total_s)
        sent.append(r.timing.get("up_bytes", 0) if r.where == "edge" else 0)
        plans[r.plan_id] += 1
        where[r.where] += 1
        met += r.total_s <= deadline
        correct += int(np.argmax(r.logits)) == int(ys[i])
    n = len(order)
    return {"latency": statistics.median(lat), "bytes": statistics.mean(sent), "met": met / n,
            "accuracy": correct / n, "plan": plans.most_common(1)[0][0], "sends": where["edge"] > n // 2,
            "where": " ".join(f"{k}:{v}" for k, v in sorted(where.items()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="test requests per bandwidth and device (default 200)")
    ap.add_argument("--deadline", type=float, default=60.0, help="ms (default 60, the demo's)")
    ap.add_argument("--rtt", type=float, default=0.01, help="seconds (default 0.01)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--bandwidths", default=",".join(f"{b / 1e6:g}" for b in BANDWIDTHS), help="Mbit/s")
    ap.add_argument("--out", default="bench-out/codecs")
    ap.add_argument("--artifact", help="an artifact this bench built (its --out/artifact): skip training and compiling")
    a = ap.parse_args()
    bws = [float(b) * 1e6 for b in a.bandwidths.split(",")]
    deadline = a.deadline / 1e3

    torch.manual_seed(0)
    train, val, test = digits(SHAPE)
    x0 = test[0][0].unsqueeze(0)
    t0 = time.monotonic()
    if a.artifact:
        path = Path(a.artifact)
        man = Manifest.read(path)
    else:
        art = edgecut.compile(zoo.get(MODEL), x0, target="local", edge="local", deadline=deadline,
                              exits=list(EXIT_POINTS), data=(train, val, test), profile=DEMO_DEVICE.profile(),
                              edge_profile=load_profile("local"), rtt=a.rtt, epochs=a.epochs, codecs=CODECS,
                              out_dir=Path(a.out) / "artifact", name=MODEL, progress=False)
        path, man = art.path, art.manifest
    coded = man.info.get("codecs", {})
    print(f"trained and compiled in {time.monotonic() - t0:.0f} s: {len(man.candidates)} routes "
          f"({sum(p.codec != 'fp32' for p in man.candidates)} coded, {len(man.segments)} segments); "
          f"{sum(not v['kept'] for v in coded.values())} coded plans dropped over max_accuracy_loss", flush=True)
    for pid, v in coded.items():
        print(f"  {pid}: {v['fp32_bytes']} -> {v['bytes']:.0f} B, validation accuracy loss "
              f"{100 * v['loss']:.1f} points{'' if v['kept'] else ' (dropped)'}")

    xs, ys, order, server, link, dev = testbed(path, test, a.requests, bws[0], a.rtt, DEMO_DEVICE)
    DeviceRuntime(dev).close()                                                 # calibrates the device
    routes = {"fp32": [p for p in man.candidates if p.codec == "fp32"], "codecs": list(man.candidates)}
    rows = []
    try:
        for bw in bws:
            link.set_rate(bw, bw)
            row = {}
            for name, plans in routes.items():
                rt = DeviceRuntime(Narrowed(dev, plans, deadline), edge=link.address, probe_interval=None,
                                   early_exit=False)          # each request runs its plan, as bench/edgent's edgecut
                try:
                    rt.probe()
                    row[name] = cell(rt, xs, ys, order, deadline)
                finally:
                    rt.close()
                r = row[name]
                print(f"{format_bandwidth(bw):>12}  {name:<6}  {r['plan']:<32} {format_time(r['latency']):>9}  "
                      f"{r['bytes']:>8.0f} B  met {100 * r['met']:5.1f}%  accuracy {r['accuracy']:.3f}  {r['where']}", flush=True)
            rows.append((bw, row))
    finally:
        link.stop()
        server.shutdown(drain_timeout=5)
    if dev.overruns:
        print(f"note: {len(dev.overruns)} library calls took longer here than on the emulated device")

    sending = [(bw, r) for bw, r in rows if r["fp32"]["sends"]]
    apart = [format_bandwidth(bw) for bw, r in rows if not r["fp32"]["sends"]]
    met = statistics.mean(r["codecs"]["met"] for _, r in rows)
    loss = max(100 * (r["fp32"]["accuracy"] - r["codecs"]["accuracy"]) for _, r in rows)
    print(f"fp32 stays on the device at: {', '.join(apart) or 'none'} (there codecs: "
          + ", ".join(f"{format_bandwidth(bw)} accuracy {r['fp32']['accuracy']:.3f} -> {r['codecs']['accuracy']:.3f}"
                      for bw, r in rows if not r["fp32"]["sends"]) + ")")
    print(f"deadline met with codecs: {100 * met:.1f}% (fp32: "
          f"{100 * statistics.mean(r['fp32']['met'] for _, r in rows):.1f}%)")
    if not sending:
        print("codecs: mean latency ratio n/a (coded / fp32) at <= 8 Mbit/s (fp32 never sends a tensor), "
              f"worst accuracy loss {loss:.1f} points, bytes ratio n/a")
        return
    ratio = statistics.mean(r["codecs"]["latency"] / r["fp32"]["latency"] for _, r in sending)
    nbytes = sum(r["codecs"]["bytes"] for _, r in sending) / sum(r["fp32"]["bytes"] for _, r in sending)
    print(f"codecs: mean latency ratio {ratio:.2f} (coded / fp32) at <= 8 Mbit/s, worst accuracy loss {loss:.1f} "
          f"points, bytes ratio {nbytes:.2f}")


if __name__ == "__main__":
    main()
