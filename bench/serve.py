"""The edge tier (edgecut serve --ray) under load, failure, a slow link and hostile input.

    PYTHONPATH=. python bench/serve.py [--seconds 60] [--devices 64] [--fuzz-frames 100000]

Starts a local Ray cluster (2 CPUs) and stops it at the end. The model is the numpy MLP of the
runtime tests at dims (1024, 2048, 2048, 10), one plan: everything on the edge ("e1/input").

1. compute limit: the edge part's median seconds at batch 1 as the replicas report it (edge_s
   of the replies without batching; the artifacts are batch-1 code, so batch 1 is the best batch
   size); limit = cores / that. The same part in this process is printed for comparison.
2. load: `--devices` devices (threads with raw protocol connections, in this process, beside the
   front: they share its 2 cores) send requests with a 100 ms deadline for `--seconds`, against
   the tier with batching on, then off (2 replicas, 1 CPU each); one replica is killed every
   `--kill-every` seconds. Each reply is checked: its id (crossed or duplicated replies), its
   logits against numpy's, the deadline. Lost: a request without any reply.
3. one device through a 20 ms RTT link (runtime/linkemu.py): median co-inference latency against
   the tier vs against the single-process server (same front, LocalExecutor).
4. fuzz: hypothesis-drawn hostile sessions (tests/runtime/hostile.py) against the tier's front,
   8 senders, while a well-behaved device checks its answers; then the front's fds and threads.

Last line: `serve: batched/unbatched X, vs limit Y, lost Z, fuzz N frames C crashes`.
"""
from __future__ import annotations

import argparse
import functools
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "runtime"))

import numpy_part  # noqa: E402
from numpy_part import NumpyPart, make_table  # noqa: E402

from edgecut.runtime import protocol as P  # noqa: E402
from edgecut.runtime.client import DeviceRuntime  # noqa: E402
from edgecut.runtime.linkemu import LinkEmulator  # noqa: E402
from edgecut.runtime.server import EdgeServer  # noqa: E402

DIMS = (1024, 2048, 2048, 10)
TABLE = make_table(DIMS, bounds=(0.0,), cuts=("input",), exits=(1,))
PLAN, DEADLINE, CORES = "e1/input", 0.1, 2


def edge_part(**kw):
    return NumpyPart("edge", DIMS, TABLE, **kw)


@functools.cache
def identity() -> tuple[str, str]:
    """(model, manifest sha256): once per process (a part is 6M random weights to draw)."""
    return P.manifest_identity(edge_part())


def compute_limit() -> float:
    part, x = edge_part(), np.ones((1, DIMS[0]), np.float32)
    ts = []
    for _ in range(200):
        t = time.perf_counter()
        part.run(PLAN, {"x": x})
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[20:])


def tier_server(batching: bool, **kw):
    from edgecut.runtime.tier import RayExecutor

    return EdgeServer(edge_part(), "127.0.0.1", 0, calibrate=False, request_timeout=5.0, **kw,
                      executor=lambda p, a: RayExecutor(p, a, min_replicas=2, max_replicas=2, batching=batching,
                                                        max_batch=8, batch_wait_s=0.002, max_queue=512)).start()


class Device(threading.Thread):
    def __init__(self, addr, seed: int, stop: threading.Event, ref: NumpyPart):
        super().__init__(daemon=True)
        self.addr, self.stop, rng = addr, stop, np.random.default_rng(seed)
        self.xs = [rng.standard_normal((1, DIMS[0]), dtype=np.float32) for _ in range(4)]
        self.want = [ref.reference(x) for x in self.xs]
        self.edge_s = []
        self.lat, self.met, self.sent, self.lost, self.crossed, self.wrong, self.errors = [], 0, 0, 0, 0, 0, {}

    def connect(self):
        import socket

        ch = P.Channel(socket.create_connection(self.addr, timeout=5))
        ch.recv(time.monotonic() + 5)
        ch.send(P.hello(*identity(), None))
        assert ch.recv(time.monotonic() + 5)["type"] == "welcome"
        return ch

    def run(self):
        ch, i = self.connect(), 0
        while not self.stop.is_set():
            k = i % 4
            t = time.perf_counter()
            self.sent += 1
            try:
                ch.send(P.infer(i, PLAN, {"x": self.xs[k]}, DEADLINE))
                r = ch.recv(time.monotonic() + 10)
            except (OSError, ConnectionError, P.ProtocolError):
                self.lost += 1
                ch.close()
                ch = self.connect()
                i += 1
                continue
            dt = time.perf_counter() - t
            if r.get("id") != i:
                self.crossed += 1
            elif r["type"] == "result":
                if not np.allclose(P.decode_tensors(r["outputs"])["logits"], self.want[k], atol=1e-4):
                    self.wrong += 1
                self.lat.append(dt)
                self.edge_s.append(r["edge_s"])
                self.met += dt <= DEADLINE
            else:               # a real device answers from its local exit now: wait out the deadline
                code = P.error_of(r)[0]
                self.errors[code] = self.errors.get(code, 0) + 1
                time.sleep(max(0.0, DEADLINE - dt))
            i += 1
        ch.close()


def killer(ray, ex, every: float, stop: threading.Event, killed: list):
    while not stop.wait(every):
        names = list(ex._actors)
        if names:
            try:
                ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
                killed.append(names[0])
            except ValueError:
                pass


class _Stats:
    """What a device process sends back: the fields of its devices, summed or concatenated."""

    def __init__(self, ds):
        self.lat = [x for d in ds for x in d.lat]
        self.edge_s = [x for d in ds for x in d.edge_s]
        for f in ("met", "sent", "lost", "crossed", "wrong"):
            setattr(self, f, sum(getattr(d, f) for d in ds))
        self.errors = {}
        for d in ds:
            for c, n in d.errors.items():
                self.errors[c] = self.errors.get(c, 0) + n


def device_process(addr, seeds, seconds: float, out) -> None:
    """Devices as threads of their own process: 64 device threads beside the front in one
    process would measure the GIL, not the tier."""
    stop, ref = threading.Event(), edge_part()
    identity()                          # before the threads: each would draw the weights again
    ds = [Device(addr, s, stop, ref) for s in seeds]
    for d in ds:
        d.start()
    time.sleep(seconds)
    stop.set()
    for d in ds:
        d.join(15)
    out.put(_Stats(ds))


def load(ray, batching: bool, devices: int, seconds: float, kill_every: float, procs: int = 4) -> dict:
    import multiprocessing as mp

    server = tier_server(batching)
    ex = server.models[server.model].executor
    stop, killed = threading.Event(), []
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ps = [ctx.Process(target=device_process, args=(server.address, range(i, devices, procs), seconds, out))
          for i in range(procs)]
    for p in ps:
        p.start()
    time.sleep(3.0)                     # the device processes import and connect
    k = threading.Thread(target=killer, args=(ray, ex, kill_every, stop, killed), daemon=True)
    t0 = time.monotonic()
    k.start()
    ds = [out.get(timeout=seconds + 120) for _ in ps]
    stop.set()
    wall = time.monotonic() - t0
    for p in ps:
        p.join(15)
    server.shutdown(5.0)
    lat = sorted(x for d in ds for x in d.lat)
    sent = sum(d.sent for d in ds)
    errors = {}
    for d in ds:
        for c, n in d.errors.items():
            errors[c] = errors.get(c, 0) + n
    out = dict(rps=len(lat) / wall, p50=lat[len(lat) // 2] if lat else float("nan"),
               p99=lat[int(len(lat) * 0.99)] if lat else float("nan"), sent=sent,
               met=sum(d.met for d in ds) / max(1, sent), lost=sum(d.lost for d in ds),
               edge_s=statistics.median([x for d in ds for x in d.edge_s] or [float("nan")]), crossed=sum(d.crossed for d in ds), wrong=sum(d.wrong for d in ds), errors=errors, killed=len(killed))
    print(f"  batching {'on ' if batching else 'off'}: {out['rps']:.0f} req/s, p50 {out['p50'] * 1e3:.1f} ms, "
          f"p99 {out['p99'] * 1e3:.1f} ms, deadline met {out['met']:.1%} of {sent}, lost {out['lost']}, "
          f"crossed {out['crossed']}, wrong {out['wrong']}, errors {errors}, replicas killed {len(killed)}",
          flush=True)
    return out


def one_device_rtt(server, runs: int = 100) -> float:
    dev, x = NumpyPart("device", DIMS, TABLE), np.ones((1, DIMS[0]), np.float32)
    ts = []
    with LinkEmulator(to=server.address, delay=0.010) as emu, \
            DeviceRuntime(dev, edge=emu.address, probe_interval=None, initial_bandwidth=1e9) as rt:
        for _ in range(runs):
            t = time.perf_counter()
            r = rt.infer(x)
            ts.append(time.perf_counter() - t)
            assert r.where == "edge", r.reason
    return statistics.median(ts[10:])


def fuzz(server, frames: int, senders: int = 8) -> tuple[int, int]:
    """(frames sent, crashes: the front stopped or the bystander got a wrong answer)."""
    from hostile import run_session, sessions
    from hypothesis import HealthCheck, given, settings

    work, part, sent, batch = queue.Queue(maxsize=4096), edge_part(), [0], max(1, frames // 4)
    lock, t0 = threading.Lock(), time.monotonic()

    def sender():
        while (s := work.get()) is not None:
            n = run_session(server.address, part, s, read_s=0.005)
            with lock:
                sent[0] += n

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    good = GoodDevice(server.address)
    queued = [0]

    @settings(max_examples=batch, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(sessions)
    def draw(s):
        work.put(s)
        queued[0] += len(s[1])

    while queued[0] < frames:
        draw()
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join(60)
    print(f"  fuzz: {sent[0]} frames in {time.monotonic() - t0:.0f} s", flush=True)
    bad = good.finish()
    alive = server._accept_thread.is_alive()
    return sent[0], int(not alive) + bad


class GoodDevice:
    """A well-behaved device of the bench's model beside the fuzzing: counts wrong answers."""

    def __init__(self, addr):
        self.stop = threading.Event()
        self.d = Device(addr, 99, self.stop, edge_part())
        self.d.start()

    def finish(self) -> int:
        self.stop.set()
        self.d.join(15)
        print(f"  bystander: {len(self.d.lat)} answers, {self.d.wrong} wrong, {self.d.crossed} crossed, "
              f"{self.d.lost} lost, errors {self.d.errors}", flush=True)
        return self.d.wrong + self.d.crossed + self.d.lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--kill-every", type=float, default=10.0)
    ap.add_argument("--fuzz-frames", type=int, default=100_000)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("edgecut").setLevel(logging.INFO if os.environ.get("BENCH_LOG") else logging.WARNING)
    import ray

    from edgecut.runtime.tier import start_ray

    print(f"edge part at batch 1 in this process: {compute_limit() * 1e3:.2f} ms median")
    start_ray(num_cpus=CORES)
    ray.cloudpickle.register_pickle_by_value(numpy_part)
    try:
        on = load(ray, True, args.devices, args.seconds, args.kill_every)
        off = load(ray, False, args.devices, args.seconds, args.kill_every)
        with EdgeServer(edge_part(), "127.0.0.1", 0, calibrate=False) as local:
            t_local = one_device_rtt(local)
        server = tier_server(True)
        try:
            t_tier = one_device_rtt(server)
            print(f"one device, 20 ms RTT: tier {t_tier * 1e3:.1f} ms, single process {t_local * 1e3:.1f} ms "
                  f"median ({t_tier / t_local:.2f}x)", flush=True)
            fd0, th0 = len(os.listdir("/proc/self/fd")), threading.active_count()
            sent, crashes = fuzz(server, args.fuzz_frames)
            time.sleep(2.0)
            fd1, th1 = len(os.listdir("/proc/self/fd")), threading.active_count()
            print(f"fuzz: {sent} frames, {crashes} crashes; fds {fd0} -> {fd1}, threads {th0} -> {th1}")
        finally:
            server.shutdown(5.0)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    limit = CORES / off["edge_s"]
    print(f"edge part at batch 1 on the replicas: {off['edge_s'] * 1e3:.2f} ms median -> compute limit "
          f"{limit:.0f} req/s on {CORES} cores")
    best = max(on["rps"], off["rps"])
    print(f"serve: batched/unbatched {on['rps'] / off['rps']:.2f}, vs limit {best / limit:.2f}, "
          f"lost {on['lost'] + off['lost']}, fuzz {sent} frames {crashes} crashes")


if __name__ == "__main__":
    main()
