"""`edgecut demo`: the main job, end to end on this machine.

Trains the exits of Edgent's AlexNet on scikit-learn's digits, compiles it for two deadlines with
the shipped `local` profile, starts an edge server and a link emulator on loopback, and runs
co-inferences at three bandwidths through the real runtime. The device is an emulated one
(`edgecut.runtime.emulate.EmulatedDevice`: every library call computes here, then takes the fixed
time of a device model, by default `PI_CLASS`), and is planned with that model's own profile, so
predictions and measurements describe the same device on any machine.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgecut.units import format_bandwidth, format_time


@dataclass
class Row:
    bandwidth: float
    deadline: float
    plans: Counter
    predicted_s: float
    measured_s: list
    met: int
    correct: int
    n: int
    where: Counter

    def cells(self) -> list[str]:
        plan = self.plans.most_common(1)[0][0]
        others = len(self.plans) - 1
        return [format_bandwidth(self.bandwidth), format_time(self.deadline),
                plan + (f" (+{others})" if others else ""), format_time(self.predicted_s),
                format_time(statistics.median(self.measured_s)), f"{100 * self.met / self.n:.1f}%",
                f"{100 * self.correct / self.n:.1f}%",
                " ".join(f"{k}:{v}" for k, v in sorted(self.where.items()))]


HEADER = ["bandwidth", "deadline", "plan (most used)", "predicted", "measured (median)", "deadline met",
          "accuracy", "answered on"]


def predicted_latency(plan, bandwidth: float, rtt: float, overhead: float) -> float:
    from edgecut.types import Link

    link = Link(bandwidth, rtt, overhead)
    return plan.device_s + plan.edge_s + link.transfer_seconds(plan.cut.crossing_bytes)


def run_demo(out: str | Path = "demo-out", *, bandwidths=(0.5e6, 2e6, 10e6), deadlines=(0.03, 0.1),
             requests: int = 200, device=None, rtt: float = 0.02, epochs: int = 15,
             profile=None, seed: int = 0, progress: bool = True, log=print) -> list[Row]:
    import numpy as np
    import torch

    import edgecut
    from edgecut import zoo
    from edgecut.codegen.load import load
    from edgecut.costmodel.profile import load_profile
    from edgecut.data import digits
    from edgecut.runtime.client import DeviceRuntime
    from edgecut.runtime.emulate import PI_CLASS, EmulatedDevice
    from edgecut.runtime.linkemu import LinkEmulator
    from edgecut.runtime.server import EdgeServer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.monotonic()
    shape = (3, 32, 32)
    train, val, test = digits(shape, seed=seed)
    model = zoo.get("alexnet_cifar")
    x0 = test[0][0].unsqueeze(0)
    edge_prof = load_profile(profile or "local")
    device = device or PI_CLASS
    device_prof = device.profile()
    log(f"device: emulated ({device_prof.notes}); edge: this CPU "
        f"(profile {edge_prof.name}); link: {format_time(rtt)} round trip, bandwidths "
        f"{', '.join(format_bandwidth(b) for b in bandwidths)}")

    arts = {}
    gm = model
    for d in deadlines:
        log(f"compiling for deadline {format_time(d)}" + (" (training exits on digits first)" if gm is model else ""))
        art = edgecut.compile(gm, x0, target="local", edge="local", deadline=d, exits="auto",
                              data=(train, val, test), profile=device_prof, edge_profile=edge_prof, rtt=rtt,
                              epochs=epochs, out_dir=out / f"artifact-{int(d * 1e3)}ms", name="alexnet_cifar",
                              progress=progress)
        gm = art.gm
        arts[d] = art
    acc = arts[deadlines[0]].info.get("test_accuracy", [])
    log("exit test accuracy: " + ", ".join(f"exit {i}: {a:.3f}" for i, a in enumerate(acc)))
    for d, art in arts.items():
        log(art.report())
    png = arts[deadlines[0]].explain(out / "plan.png", bandwidths[len(bandwidths) // 2])
    log(f"explain: {png}")

    xs = np.stack([test[i][0].numpy() for i in range(len(test))])[:, None]
    ys = np.array([int(test[i][1]) for i in range(len(test))])
    rows: list[Row] = []
    for d, art in arts.items():
        server = EdgeServer(art.path, "127.0.0.1", 0, workers=1).start()
        link = LinkEmulator(("127.0.0.1", 0), server.address, rate=bandwidths[0], delay=rtt / 2).start()
        emulated = EmulatedDevice(load(art.path, "device"), device)
        try:
            for bw in bandwidths:
                link.set_rate(bw, bw)
                rt = DeviceRuntime(emulated, edge=link.address, probe_interval=None)
                try:
                    rt.probe()
                    rows.append(_run(rt, art, xs, ys, bw, d, requests, rtt, seed))
                finally:
                    rt.close()
                log("  " + " | ".join(rows[-1].cells()))
        finally:
            link.stop()
            server.shutdown(drain_timeout=5)
    log("")
    log(_table(rows))
    n = sum(r.n for r in rows)
    met, correct = sum(r.met for r in rows), sum(r.correct for r in rows)
    log(f"demo took {time.monotonic() - t_start:.0f} s; artifacts and plan.png in {out}")
    log(f"deadline met: {100 * met / n:.1f}% accuracy: {correct / n:.3f}")
    return rows


def _run(rt, art, xs, ys, bw, deadline, requests, rtt, seed) -> Row:
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(xs))[:requests]
    plans, where, measured = Counter(), Counter(), []
    met = correct = 0
    overhead = art.info.get("overhead", 0.0)
    plan = art.table.lookup(bw)
    for i in order:
        res = rt.infer(xs[i], deadline=deadline)
        plans[res.plan_id] += 1
        where[res.where] += 1
        measured.append(res.total_s)
        met += res.total_s <= deadline
        correct += int(np.argmax(res.logits)) == int(ys[i])
    return Row(bw, deadline, plans, predicted_latency(plan, bw, rtt, overhead), measured, met, correct,
               len(order), where)


def _table(rows: list[Row]) -> str:
    cells = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
