"""The edge tier (edgecut serve --ray) under load, failure, a slow link and hostile input.

    PYTHONPATH=. python bench/serve.py [--model alexnet-fc|numpy[:D0,D1,D2,D3]|zoo:NAME] [--seconds 60]
                                       [--devices 64] [--fuzz-frames 100000]

Starts a local Ray cluster (2 CPUs) and stops it at the end. `--model alexnet-fc` (default):
AlexNet's three fully connected layers (9216-4096-4096-1000) in numpy, the edge half at Edgent's
own cut, where batching pays (234 MB of weights read per batch); `numpy`: the numpy MLP of the
runtime tests at dims (1024, 2048, 2048, 10); `zoo:NAME`: that zoo model built with TVM (one
plan, everything on the edge) at batch 1 and, for the edge, at batches 2, 4 and 8
(`edge_batches`), cached in build/bench-serve-NAME.

1. compute limit: a replica of the idle tier runs batches of 1, 2, 4 and 8 requests (its own
   edge_s, median of 20 each); limit = cores / (the best batch's seconds per request). Then both
   replicas fed batches of 8 directly (two calls in flight each, no front, no devices): what the
   two replicas compute at once on this machine, the ceiling the tier's front can approach.
2. load: `--devices` devices (threads in 4 processes, raw protocol connections) send requests with
   a `--load-deadline` (1 s: both modes meet it, so their throughputs compare at equal deadline
   met) for `--seconds`, back to back, against the tier with batching on, then off (2 replicas,
   1 CPU each); no replica is killed here (`--load-kills` kills one every `--kill-every` s). Each
   reply is checked: its id (crossed or duplicated replies), its logits against the batch-1
   reference, the deadline. Lost: a request without any reply. After an error reply a device
   waits out its deadline, as a real one does while it answers from its local exit.
3. failure within capacity: the same devices paced to `--kill-load` x the batched throughput of
   2., a `--deadline` (0.1 s) each, a replica killed every `--kill-every` seconds; deadline met
   over all requests (every deadline here leaves room for one retry), then 20 s without kills.
4. fuzz: hypothesis-drawn hostile sessions (tests/runtime/hostile.py) against the tier's front,
   8 senders, while a well-behaved device checks its answers; then the front's fds and threads.
5. one device through a 20 ms RTT link (runtime/linkemu.py): median co-inference latency against
   a tier of one replica with both CPUs (its calls over the replica's data port, as the tier
   sends them; and through Ray calls, for comparison) vs against the single-process server
   (same front, LocalExecutor, both cores), in alternating blocks of 12 requests.

Last line: `serve: batched/unbatched X, vs limit Y, lost Z, fuzz N frames C crashes`.
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "runtime"))

import numpy_part  # noqa: E402
from numpy_part import NumpyPart, make_table  # noqa: E402

from edgecut.runtime import protocol as P  # noqa: E402
from edgecut.runtime.client import DeviceRuntime  # noqa: E402
from edgecut.runtime.linkemu import LinkEmulator  # noqa: E402
from edgecut.runtime.server import EdgeServer  # noqa: E402

DIMS = (1024, 2048, 2048, 10)
CORES, BATCHES = 2, (1, 2, 4, 8)


@dataclass
class Workload:
    """What the devices send and what they must get back: `cases` (crossing tensors, logits)."""

    name: str
    artifact: object            # what the replicas load: a path, or the numpy part itself
    plan: str
    identity: tuple             # (model, manifest sha256)
    cases: list


# the edge half of AlexNet cut after pool5 (Edgent's own split): its three fully connected layers,
# 9216 -> 4096 -> 4096 -> 1000, 59 M multiply-adds and 234 MB of weights read per batch
ALEXNET_FC = (9216, 4096, 4096, 1000)


def workload(spec: str, n_cases: int = 16) -> Workload:
    rng = np.random.default_rng(0)
    if spec == "alexnet-fc":
        spec = "numpy:" + ",".join(map(str, ALEXNET_FC))
    if spec == "numpy" or spec.startswith("numpy:"):
        dims = tuple(int(d) for d in spec[6:].split(",")) if ":" in spec else DIMS
        part = NumpyPart("edge", dims, make_table(dims, bounds=(0.0,), cuts=("input",), exits=(1,)))
        xs = [rng.standard_normal((1, dims[0]), dtype=np.float32) for _ in range(n_cases)]
        return Workload("numpy-mlp", part, "e1/input", P.manifest_identity(part),
                        [({"x": x}, part.reference(x)) for x in xs])
    if not spec.startswith("zoo:"):
        raise SystemExit(f"--model numpy or zoo:NAME, got {spec!r}")
    from edgecut.codegen.load import load

    path = build_zoo(spec[4:])
    edge, device = load(path, side="edge"), load(path, side="device")
    plan = edge.manifest.table.plans[0].id
    shape = edge.manifest.inputs[0].shape
    cases = []
    for _ in range(n_cases):
        t = device.run(plan, {edge.manifest.inputs[0].name: rng.standard_normal(shape, dtype=np.float32)}).outputs
        cases.append((t, edge.run(plan, t).outputs["logits"]))
    return Workload(spec[4:], str(path), plan, P.manifest_identity(edge), cases)


def build_zoo(name: str) -> Path:
    """The zoo model with one plan (everything on the edge), edge libraries at BATCHES; cached."""
    out = ROOT / "build" / f"bench-serve-{name}"
    if (out / "manifest.msgpack").exists():
        return out
    import importlib.util

    import torch

    import edgecut
    from edgecut import zoo
    from edgecut.codegen.artifact import build_artifact

    spec = importlib.util.spec_from_file_location("codegen_helpers", ROOT / "tests" / "codegen" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    torch.manual_seed(0)
    model, x = zoo.get(name), torch.randn(*zoo.MODELS[name][1])
    gm = edgecut.trace(model, x)
    table = helpers.make_table(gm, [helpers.make_cut(gm, [], "input")])
    t = time.monotonic()
    build_artifact(gm, table, "local", "local", out, (x,), onnx=False, progress=False, model_name=name,
                   edge_batches=BATCHES[1:])
    print(f"built {name} for the edge at batches {BATCHES} in {time.monotonic() - t:.0f} s", flush=True)
    return out


def tier_server(w: Workload, batching: bool, replicas: int = 2, **kw):
    """The tier with `replicas` replicas sharing the CORES (one each for 2, all of them for 1)."""
    from edgecut.runtime.tier import RayExecutor

    return EdgeServer(w.artifact, "127.0.0.1", 0, calibrate=False, request_timeout=5.0, **kw,
                      executor=lambda p, a: RayExecutor(p, a, min_replicas=replicas, max_replicas=replicas,
                                                        batching=batching, max_batch=BATCHES[-1], batch_wait_s=0.002,
                                                        max_queue=512, replica_cpus=CORES / replicas)).start()


def run_many(ex, actor, w: Workload, reqs: list):
    """A replica's run_many called directly (no front): the ref of its replies for `reqs`."""
    from edgecut.runtime.replicas import _metadata

    return actor.handle_request.remote(_metadata(ex.app, "run_many"), w.plan, [10.0] * len(reqs), *reqs)


def compute_limit(ray, w: Workload, server) -> dict:
    """Seconds per request at each batch size, as a replica of the idle tier reports them."""
    ex = server.models[w.identity[0]].executor
    actor = ex._actors[sorted(ex._actors)[0]]
    per = {}
    for n in BATCHES:
        ts = []
        for k in range(22):
            reqs = [w.cases[(k + j) % len(w.cases)][0] for j in range(n)]
            reply = ray.get(run_many(ex, actor, w, reqs))
            assert all(r[0] == "ok" and r[3] == n for r in reply), reply[0][:1]
            ts.append(reply[0][2] / n)
        per[n] = statistics.median(ts[2:])
    print("edge compute per request on a replica: " + ", ".join(f"batch {n} {s * 1e3:.2f} ms" for n, s in per.items()),
          flush=True)
    return per


def fed_directly(ray, w: Workload, server, seconds: float = 10.0, n: int = 8, inflight: int = 2) -> float:
    """Requests/s that the replicas compute when fed batches of `n` directly, `inflight` calls
    each, from threads of this process, the way the tier's front calls them (over their data
    ports when it sends batches there, else through Ray): the tier's ceiling here, without the
    front's queue or the devices."""
    ex = server.models[w.identity[0]].executor
    done, lock, end = [0], threading.Lock(), time.monotonic() + seconds
    reqs = [w.cases[j % len(w.cases)][0] for j in range(n)]

    def feed_ray(actor):
        refs = []
        while time.monotonic() < end:
            while len(refs) < inflight:
                refs.append(run_many(ex, actor, w, reqs))
            reply = ray.get(refs.pop(0))
            with lock:
                done[0] += sum(r[0] == "ok" for r in reply)
        ray.get(refs)

    def feed_port(name):
        while time.monotonic() < end:
            reply = ex._port_call(name, ex._connect(name), w.plan, [10.0] * n, reqs, 10.0)
            with lock:
                done[0] += sum(r[0] == "ok" for r in reply)

    if ex.port_batches:
        threads = [threading.Thread(target=feed_port, args=(name,)) for name in list(ex._actors) for _ in range(inflight)]
    else:
        threads = [threading.Thread(target=feed_ray, args=(actor,)) for actor in list(ex._actors.values())]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rps = done[0] / (time.monotonic() - t0)
    print(f"{len(ex._actors)} replicas fed batches of {n} directly ({'data ports' if ex.port_batches else 'Ray calls'}): "
          f"{rps:.0f} req/s", flush=True)
    return rps


class Device(threading.Thread):
    def __init__(self, addr, w: Workload, seed: int, stop: threading.Event, deadline: float, period: float = 0.0):
        super().__init__(daemon=True)
        self.addr, self.w, self.stop, self.deadline, self.period = addr, w, stop, deadline, period
        self.mine = [w.cases[(seed + k) % len(w.cases)] for k in range(4)]
        self.next = time.monotonic() + (seed % 97) / 97 * period
        self.lat, self.met, self.sent, self.lost, self.crossed, self.wrong, self.errors = [], 0, 0, 0, 0, 0, {}

    def connect(self):
        import socket

        ch = P.Channel(socket.create_connection(self.addr, timeout=5))
        ch.recv(time.monotonic() + 5)
        ch.send(P.hello(*self.w.identity, None))
        assert ch.recv(time.monotonic() + 5)["type"] == "welcome"
        return ch

    def run(self):
        ch, i = self.connect(), 0
        while not self.stop.is_set():
            if self.period:                     # paced: one request every period
                self.next += self.period
                time.sleep(max(0.0, self.next - time.monotonic()))
            tensors, want = self.mine[i % 4]
            t = time.perf_counter()
            self.sent += 1
            try:
                ch.send(P.infer(i, self.w.plan, tensors, self.deadline))
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
                got = P.decode_tensors(r["outputs"])["logits"]
                if not np.allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(want).max()))):
                    self.wrong += 1
                self.lat.append(dt)
                self.met += dt <= self.deadline
            else:               # a real device answers from its local exit now: wait out the deadline
                code = P.error_of(r)[0]
                self.errors[code] = self.errors.get(code, 0) + 1
                if not self.period:
                    time.sleep(max(0.0, self.deadline - dt))
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
        for f in ("met", "sent", "lost", "crossed", "wrong"):
            setattr(self, f, sum(getattr(d, f) for d in ds))
        self.errors = {}
        for d in ds:
            for c, n in d.errors.items():
                self.errors[c] = self.errors.get(c, 0) + n


def device_process(addr, w, seeds, seconds: float, deadline: float, period: float, out) -> None:
    """Devices as threads of their own process: 64 device threads beside the front in one
    process would measure the GIL, not the tier."""
    stop = threading.Event()
    ds = [Device(addr, w, s, stop, deadline, period) for s in seeds]
    t0 = time.monotonic()
    for d in ds:
        d.start()
    time.sleep(seconds)
    stop.set()
    for d in ds:
        d.join(15)
    stats = _Stats(ds)
    stats.wall = time.monotonic() - t0
    out.put(stats)


def load(ray, w: Workload, server, label: str, devices: int, seconds: float, deadline: float, kill_every: float,
         rate: float = 0.0, procs: int = 4) -> dict:
    """`devices` devices for `seconds` (back to back, or paced to `rate` requests/s in all)."""
    import multiprocessing as mp

    ex = server.models[w.identity[0]].executor
    stop, killed = threading.Event(), []
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    period = devices / rate if rate else 0.0
    light = Workload(w.name, None, w.plan, w.identity, w.cases)     # the devices need no weights
    ps = [ctx.Process(target=device_process, args=(server.address, light, range(i, devices, procs), seconds,
                                                   deadline, period, out)) for i in range(procs)]
    for p in ps:
        p.start()
    time.sleep(3.0)                     # the device processes import and connect
    k = threading.Thread(target=killer, args=(ray, ex, kill_every, stop, killed), daemon=True)
    k.start()
    ds = [out.get(timeout=seconds + 120) for _ in ps]
    stop.set()
    wall = max(d.wall for d in ds)      # the devices' own time: they connect before t0
    for p in ps:
        p.join(15)
    lat = sorted(x for d in ds for x in d.lat)
    sent = sum(d.sent for d in ds)
    errors = {}
    for d in ds:
        for c, n in d.errors.items():
            errors[c] = errors.get(c, 0) + n
    r = dict(rps=len(lat) / wall, p50=lat[len(lat) // 2] if lat else float("nan"),
             p99=lat[int(len(lat) * 0.99)] if lat else float("nan"), sent=sent,
             met=sum(d.met for d in ds) / max(1, sent), lost=sum(d.lost for d in ds),
             crossed=sum(d.crossed for d in ds), wrong=sum(d.wrong for d in ds), errors=errors, killed=len(killed))
    print(f"  {label}: {r['rps']:.0f} req/s answered, p50 {r['p50'] * 1e3:.1f} ms, p99 {r['p99'] * 1e3:.1f} ms, "
          f"deadline met {r['met']:.1%} of {sent}, lost {r['lost']}, crossed {r['crossed']}, wrong {r['wrong']}, "
          f"errors {errors}, replicas killed {len(killed)}", flush=True)
    return r


def one_device_rtt(w: Workload, servers: dict, rounds: int = 10, block: int = 12, before: dict | None = None) -> dict:
    """Median co-inference latency of one device through a 20 ms RTT link to each of `servers`
    (name -> server): `rounds` rounds of a block of `block` requests to each in turn, the first
    two of each block dropped; `before[name]()`, if given, runs before each of name's blocks.
    Blocks, not alternating requests: a BLAS thread pool spins for a while after its work, and
    alternating made each side compute beside the other's spinning threads (both 2x slower, as
    measured here)."""
    from contextlib import ExitStack

    from edgecut.codegen.load import load as load_part

    if isinstance(w.artifact, str):
        dev = load_part(w.artifact, side="device")
        x = np.random.default_rng(1).standard_normal(dev.manifest.inputs[0].shape, dtype=np.float32)
    else:
        dims = w.artifact.dims
        dev, x = NumpyPart("device", dims, w.artifact.table), np.ones((1, dims[0]), np.float32)
    ts = {name: [] for name in servers}
    with ExitStack() as stack:
        rts = {}
        for name, server in servers.items():
            emu = stack.enter_context(LinkEmulator(to=server.address, delay=0.010))
            rts[name] = stack.enter_context(DeviceRuntime(dev, edge=emu.address, probe_interval=None,
                                                          initial_bandwidth=1e9))
        for _ in range(rounds):
            for name, rt in rts.items():
                if before and name in before:
                    before[name]()
                for j in range(block):
                    t = time.perf_counter()
                    r = rt.infer(x)
                    if j >= 2:
                        ts[name].append(time.perf_counter() - t)
                    assert r.where == "edge", r.reason
    return {name: statistics.median(v) for name, v in ts.items()}


def fuzz(w: Workload, server, frames: int, deadline: float, senders: int = 8) -> tuple[int, int]:
    """(frames sent, crashes: the front stopped or the bystander got a wrong answer)."""
    from hostile import run_session, sessions
    from hypothesis import HealthCheck, given, settings

    class Ident:                        # what run_session's handshake reads
        def __init__(self):
            self.manifest_sha256 = w.identity[1]
            self.manifest = type("M", (), {"model": w.identity[0]})()

    work, part, sent, batch = queue.Queue(maxsize=4096), Ident(), [0], max(1, frames // 4)
    lock, t0 = threading.Lock(), time.monotonic()

    def sender():
        while (s := work.get()) is not None:
            n = run_session(server.address, part, s, read_s=0.005)
            with lock:
                sent[0] += n

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    stop = threading.Event()
    good = Device(server.address, w, 99, stop, deadline)
    good.start()
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
    stop.set()
    good.join(15)
    print(f"  bystander: {len(good.lat)} answers, {good.wrong} wrong, {good.crossed} crossed, {good.lost} lost, "
          f"errors {good.errors}", flush=True)
    alive = server._accept_thread.is_alive()
    return sent[0], int(not alive) + good.wrong + good.crossed + good.lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="alexnet-fc", help="alexnet-fc (default), numpy[:D0,D1,D2,D3] "
                    "(numpy: 1024,2048,2048,10) or zoo:NAME (a TVM build)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=0.1,
                    help="each request's deadline in seconds in the kill, one-device and fuzz phases (0.1)")
    ap.add_argument("--load-deadline", type=float, default=1.0,
                    help="the deadline in the throughput phases (1.0: both modes meet it, so their "
                    "throughputs compare at equal deadline met)")
    ap.add_argument("--kill-every", type=float, default=10.0)
    ap.add_argument("--kill-load", type=float, default=0.1,
                    help="phase 3's load, x the batched throughput (0.1: what one replica carries alone with half the "
                    "deadline left for a retry; at 0.3 the small batches that form make both 70-100%% busy)")
    ap.add_argument("--fuzz-frames", type=int, default=100_000)
    ap.add_argument("--only-kills", action="store_true", help="phase 3 only, at --kill-rate req/s")
    ap.add_argument("--kill-rate", type=float, default=0.0)
    ap.add_argument("--load-kills", action="store_true", help="kill replicas in the throughput phases too")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("edgecut").setLevel(logging.INFO if os.environ.get("BENCH_LOG") else logging.WARNING)
    import ray
    from ray import serve

    from edgecut.runtime.tier import start_ray

    w = workload(args.model)
    start_ray(num_cpus=CORES)
    ray.cloudpickle.register_pickle_by_value(numpy_part)
    never = 1e9
    try:
        if args.only_kills:
            server = tier_server(w, True)
            print(f"  failure within capacity: {args.devices} devices paced to {args.kill_rate:.0f} req/s, "
                  f"a replica killed every {args.kill_every:g} s", flush=True)
            load(ray, w, server, "paced, kills ", args.devices, args.seconds, args.deadline, args.kill_every,
                 args.kill_rate)
            server.shutdown(5.0)
            return
        server = tier_server(w, True)
        per = compute_limit(ray, w, server)
        fed = fed_directly(ray, w, server, n=BATCHES[-1])
        every = args.kill_every if args.load_kills else never
        on = load(ray, w, server, "batching on ", args.devices, args.seconds, args.load_deadline, every)
        server.shutdown(5.0)
        server = tier_server(w, False)
        off = load(ray, w, server, "batching off", args.devices, args.seconds, args.load_deadline, every)
        server.shutdown(5.0)
        server = tier_server(w, True)
        rate = args.kill_load * on["rps"]
        print(f"  failure within capacity: {args.devices} devices paced to {rate:.0f} req/s "
              f"({args.kill_load:g} x the batched throughput), a replica killed every {args.kill_every:g} s", flush=True)
        kills = load(ray, w, server, "paced, kills ", args.devices, args.seconds, args.deadline, args.kill_every, rate)
        quiet = load(ray, w, server, "paced, quiet ", args.devices, min(args.seconds, 20.0), args.deadline, never, rate)
        sent, crashes = 0, 0
        if args.fuzz_frames:
            ex = server.models[w.identity[0]].executor

            def counts():       # fds less the front's idle connections to replica ports, threads
                pooled = sum(len(v) for v in ex._idle.values())
                return len(os.listdir("/proc/self/fd")) - pooled, threading.active_count(), pooled

            fd0, th0, po0 = counts()
            sent, crashes = fuzz(w, server, args.fuzz_frames, args.deadline)
            end, waited = time.monotonic() + 10.0, time.monotonic()
            while ((c := counts())[0] > fd0 or c[1] > th0) and time.monotonic() < end:    # connections closing
                time.sleep(0.1)
            fd1, th1, po1 = c
            print(f"fuzz: {sent} frames, {crashes} crashes; fds {fd0} -> {fd1}, threads {th0} -> {th1} "
                  f"({time.monotonic() - waited:.1f} s after; fds less the {po0} -> {po1} idle port connections)")
        server.shutdown(5.0)
        one = tier_server(w, True, replicas=1)     # one device: one replica with the cores, as the single process has
        ex = one.models[w.identity[0]].executor

        def via(port: bool):
            def set_path():
                ex.data_port = port
            return set_path

        with EdgeServer(w.artifact, "127.0.0.1", 0, calibrate=False) as local:
            rtt = one_device_rtt(w, {"tier": one, "tier-ray": one, "local": local},
                                 before={"tier": via(True), "tier-ray": via(False)})
        one.shutdown(5.0)
        t_tier, t_ray, t_local = rtt["tier"], rtt["tier-ray"], rtt["local"]
        print(f"one device, 20 ms RTT: tier (1 replica, {CORES} CPUs) {t_tier * 1e3:.1f} ms over the data port, "
              f"{t_ray * 1e3:.1f} ms through Ray calls, single process {t_local * 1e3:.1f} ms median "
              f"({t_tier / t_local:.2f}x; through Ray {t_ray / t_local:.2f}x)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    best = min(per, key=per.get)
    limit = CORES / per[best]
    print(f"compute limit: {CORES} cores / {per[best] * 1e3:.2f} ms per request at batch {best} = {limit:.0f} req/s; "
          f"replicas fed directly {fed:.0f} ({fed / limit:.2f} of it); batching on {on['rps']:.0f} "
          f"({on['rps'] / fed:.2f} of fed directly), off {off['rps']:.0f} req/s, deadline met {on['met']:.1%} / "
          f"{off['met']:.1%}")
    print(f"failure within capacity: deadline met {kills['met']:.2%} with kills ({quiet['met']:.2%} without, p99 "
          f"{quiet['p99'] * 1e3:.0f} ms of a {args.deadline * 1e3:.0f} ms deadline), lost {kills['lost']}, "
          f"crossed {kills['crossed']}, wrong {kills['wrong']}")
    lost = sum(r["lost"] + r["crossed"] + r["wrong"] for r in (on, off, kills, quiet))
    print(f"serve: batched/unbatched {on['rps'] / off['rps']:.2f}, vs limit {max(on['rps'], off['rps']) / limit:.2f}, "
          f"lost {lost}, fuzz {sent} frames {crashes} crashes")


if __name__ == "__main__":
    main()
