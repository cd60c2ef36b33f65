"""`edgecut demo`: Edgent's main job, end to end on this machine.

Trains the early exit of a slim AlexNet for 64x64 images (`zoo.alexnet_edgent`) on scikit-learn's
digits, compiles it once, starts an edge server (which calibrates its parts) and a link emulator
on loopback, and runs co-inferences through the real runtime at each bandwidth and deadline. The
device is emulated (`runtime.emulate.EmulatedDevice`: every library call computes here, then
takes the fixed time of a `DeviceModel`) and is calibrated like a real one at its first start, so
every plan comes from measured device times, the edge's welcome times and the link estimate.

The defaults show Edgent's three regimes under a 60 ms deadline with a 10 ms round trip: at
1 Mbit/s the input (48 KiB) or any cut is too slow to send and the whole model too slow for the
device, so the device answers from the early exit (right-sizing); at 10 Mbit/s a cut after pool1
sends 12 KiB (a partition in the middle); at 200 Mbit/s the input goes to the edge (offloading).
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgecut.units import format_bandwidth, format_time

MODEL, SHAPE, EXIT_POINTS = "alexnet_edgent", (3, 64, 64), ("features_2",)   # an exit after pool1
BANDWIDTHS, DEADLINES, RTT = (1e6, 10e6, 200e6), (0.06,), 0.01
TOLERANCE = 0.10          # a row's median measured latency within this of its prediction


@dataclass
class Row:
    bandwidth: float
    deadline: float
    plans: Counter
    predicted_s: list
    measured_s: list
    met: int
    correct: int
    n: int
    where: Counter
    regime: str = ""                                # of the most used plan (`regime`)

    @property
    def predicted(self) -> float:
        return statistics.median(self.predicted_s)

    @property
    def measured(self) -> float:
        return statistics.median(self.measured_s)

    @property
    def error(self) -> float:
        """|median measured - median predicted| / median predicted."""
        return abs(self.measured - self.predicted) / self.predicted

    @property
    def plan(self) -> str:
        return self.plans.most_common(1)[0][0]

    def cells(self) -> list[str]:
        others = len(self.plans) - 1
        return [format_bandwidth(self.bandwidth), format_time(self.deadline),
                self.plan + (f" (+{others})" if others else ""), self.regime, format_time(self.predicted),
                format_time(self.measured), f"{100 * self.error:.1f}%", f"{100 * self.met / self.n:.1f}%",
                f"{100 * self.correct / self.n:.1f}%",
                " ".join(f"{k}:{v}" for k, v in sorted(self.where.items()))]


HEADER = ["bandwidth", "deadline", "plan (most used)", "regime", "predicted (median)", "measured (median)",
          "error", "deadline met", "accuracy", "answered on"]


def regime(manifest, plan_id: str) -> str:
    """Edgent's regime of a plan: "right-sizing" (an early exit, all on the device), "device-only"
    (the final exit on the device), "partition" (a cut in the middle) or "offload" (all on the edge)."""
    route = manifest.route(plan_id)
    if route.device and route.edge:
        return "partition"
    if route.edge:
        return "offload"
    return "device-only" if route.exit == max(e.id for e in manifest.exits) else "right-sizing"


def run_demo(out: str | Path = "demo-out", *, bandwidths=BANDWIDTHS, deadlines=DEADLINES, requests: int = 100,
             device=None, rtt: float = RTT, epochs: int = 8, profile=None, seed: int = 0, progress: bool = True,
             log=print, model: str = MODEL, shape=SHAPE, exits=EXIT_POINTS, quantile: float = 0.99,
             early_exit: bool = False, artifact=None) -> list[Row]:
    """Run the demo (see the module docstring); the rows, one per deadline and bandwidth.
    `quantile`: of the measured times the device and the edge plan with. `early_exit`: also take
    an earlier exit's answer on the device when it is confident (BranchyNet); off, every request
    runs its plan's exit, so the measured latency is the plan's. `artifact`: one an earlier demo
    built (its `out/artifact`), used instead of training and compiling."""
    import numpy as np
    import torch

    import edgecut
    from edgecut import zoo
    from edgecut.costmodel.profile import load_profile
    from edgecut.data import digits
    from edgecut.runtime.emulate import DEMO_DEVICE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.monotonic()
    train, val, test = digits(shape, seed=seed)
    x0 = test[0][0].unsqueeze(0)
    edge_prof = load_profile(profile or "local")
    device = device or DEMO_DEVICE
    log(f"device: {device.profile().notes}; edge: this CPU (profile {edge_prof.name}); link: "
        f"{format_time(rtt)} round trip, bandwidths {', '.join(format_bandwidth(b) for b in bandwidths)}")
    if artifact is None:
        log(f"compiling {model} at {shape[1]}x{shape[2]} (training its exits on digits first)")
        art = edgecut.compile(zoo.get(model), x0, target="local", edge="local", deadline=min(deadlines),
                              exits=list(exits), data=(train, val, test), profile=device.profile(),
                              edge_profile=edge_prof, rtt=rtt, epochs=epochs, out_dir=out / "artifact", name=model,
                              progress=progress)
        path, man = art.path, art.manifest
        png = art.explain(out / "plan.png", bandwidths[len(bandwidths) // 2])
        log(f"explain: {png}")
    else:
        from edgecut.codegen.manifest import Manifest

        path = Path(artifact)
        man = Manifest.read(path)
        log(f"using the artifact in {path} (not training or compiling)")
    t_built = time.monotonic()
    acc = man.info.get("test_accuracy", [])
    log(f"built in {t_built - t_start:.0f} s: {len(man.candidates)} routes; exit test accuracy "
        + ", ".join(f"exit {i}: {a:.3f}" for i, a in enumerate(acc)))

    xs = np.stack([test[i][0].numpy() for i in range(len(test))])[:, None]
    ys = np.array([int(test[i][1]) for i in range(len(test))])
    rows = co_infer(path, xs, ys, bandwidths=bandwidths, deadlines=deadlines, requests=requests, device=device,
                    rtt=rtt, quantile=quantile, early_exit=early_exit, seed=seed, log=log)
    log("")
    log(summary(rows)[0])
    log(f"demo took {time.monotonic() - t_start:.0f} s (build {t_built - t_start:.0f} s); artifact and plan.png "
        f"in {out}")
    for line in summary(rows)[1:]:
        log(line)
    return rows


def summary(rows: list[Row]) -> list[str]:
    """The table, then the demo's two last lines."""
    n = sum(r.n for r in rows)
    met, correct = sum(r.met for r in rows), sum(r.correct for r in rows)
    return [_table(rows),
            f"prediction error: worst {100 * max(r.error for r in rows):.1f}% over {len(rows)} rows, "
            f"{sum(r.regime == 'partition' for r in rows)} rows with a middle cut",
            f"deadline met: {100 * met / n:.1f}% accuracy: {correct / n:.3f}"]


def co_infer(path, xs, ys, *, bandwidths=BANDWIDTHS, deadlines=DEADLINES, requests: int = 100, device=None,
             rtt: float = RTT, quantile: float = 0.99, early_exit: bool = False, seed: int = 0,
             log=print) -> list[Row]:
    """Serve the artifact at `path` (an edge server, which calibrates at start, behind a link
    emulator), calibrate `device` (an emulated `DeviceModel`) at its runtime's first start, and
    run `requests` of `xs` (labels `ys`) at each deadline and bandwidth: a Row each."""
    from edgecut.codegen.load import load
    from edgecut.codegen.manifest import Manifest
    from edgecut.runtime.emulate import DEMO_DEVICE, EmulatedDevice
    from edgecut.runtime.linkemu import LinkEmulator
    from edgecut.runtime.server import EdgeServer

    man = Manifest.read(path)
    rows: list[Row] = []
    server = EdgeServer(path, "127.0.0.1", 0, workers=1, quantile=quantile).start()   # calibrates the edge parts
    link = LinkEmulator(("127.0.0.1", 0), server.address, rate=bandwidths[0], delay=rtt / 2, burst=0).start()
    emulated = EmulatedDevice(load(path, "device"), device or DEMO_DEVICE)
    t_cal = time.monotonic()
    try:
        log(f"edge calibrated at start; calibrating the emulated device ({len(man.candidates)} routes) ...")
        _runtime(emulated, link, quantile, early_exit).close()                            # the first start calibrates
        log(f"device calibrated in {time.monotonic() - t_cal:.0f} s; {len(bandwidths) * len(deadlines)} rows "
            f"of {requests} requests")
        for d in deadlines:
            for bw in bandwidths:
                link.set_rate(bw, bw)
                rt = _runtime(emulated, link, quantile, early_exit)
                try:
                    rt.probe()
                    row = _run(rt, xs, ys, bw, d, requests, seed)
                finally:
                    rt.close()
                row.regime = regime(man, row.plan)
                rows.append(row)
                log("  " + " | ".join(row.cells()))
    finally:
        link.stop()
        server.shutdown(drain_timeout=5)
    if emulated.overruns:
        log(f"note: {len(emulated.overruns)} library calls took longer here than on the emulated device")
    return rows


def _runtime(part, link, quantile, early_exit):
    from edgecut.runtime.client import DeviceRuntime

    return DeviceRuntime(part, edge=link.address, probe_interval=None, quantile=quantile, early_exit=early_exit)


def _run(rt, xs, ys, bw, deadline, requests, seed) -> Row:
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(xs))[:requests]
    plans, where, measured, predicted = Counter(), Counter(), [], []
    met = correct = 0
    for i in order:
        res = rt.infer(xs[i], deadline=deadline)
        plans[res.plan_id] += 1
        where[res.where] += 1
        measured.append(res.total_s)
        predicted.append(res.predicted_s)
        met += res.total_s <= deadline
        correct += int(np.argmax(res.logits)) == int(ys[i])
    return Row(bw, deadline, plans, predicted, measured, met, correct, len(order), where)


def _table(rows: list[Row]) -> str:
    cells = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
