"""bench/runtime.py: what the runtime costs on top of the network.

1. Loopback: one 1 MB float32 tensor sent to a real EdgeServer as an infer request (framing,
   msgpack, sendmsg, recv_into, decode, the run, the reply) against a raw socket `sendall` of the
   same bytes to a thread that `recv_into`s them, runs the same edge part (the same object, so
   the same weights in memory) on them and answers one byte. Both round trips; on both the edge's
   compute, timed the same way (time.monotonic around `part.run` on the receiving thread), is
   subtracted. The raw side computes too because what a 1 MiB copy costs depends on whether its
   buffers are still in the 2 MiB L2 cache here (0.13 ms if so, 0.23-0.45 ms if not), and the
   run reads 1 MiB of weights and the tensor; with `--bare-raw` the raw side skips the run (the
   baseline before, kinder to raw). Where buffers land in physical memory moves a 1 MiB copy by
   up to 2x from one process to the next, so the runs are split over `--sessions` fresh sets of
   servers, connections and buffers; raw and runtime interleaved within each; the ratio printed
   is the median of the sessions' ratios of medians. Goal: ratio <= 1.2.
2. Emulated link (edgecut.runtime.linkemu, --rate, --delay): `DeviceRuntime.infer` with an
   edge-only plan whose crossing tensor is that 1 MB input; its measured transfer time against
   bytes*8/rate + RTT (the bytes of both frames, RTT = 2 x delay). Goal: within 10%.
3. With --soak N: 32 devices for N seconds, requests per second and the check that no reply was
   lost, duplicated or crossed (tests/runtime/test_soak.py, in its slow 30 s form).

    python bench/runtime.py [--runs 200] [--sessions 10] [--link-runs 7] [--bare-raw] [--rate 20mbit] [--delay 20ms] [--soak 30]

The machine is shared by other work: figures move; the medians are what to read. The last line
is `loopback_ratio=X link_ratio=Y`.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "runtime"))

from numpy_part import NumpyPart, make_table  # noqa: E402

from edgecut.runtime import protocol as P  # noqa: E402
from edgecut.runtime.client import DeviceRuntime, EdgeConnection  # noqa: E402
from edgecut.runtime.linkemu import LinkEmulator  # noqa: E402
from edgecut.runtime.server import EdgeServer  # noqa: E402
from edgecut.units import parse_bandwidth, parse_time  # noqa: E402

N = 262_144                        # float32 elements: 1 MiB
DIMS = (N, 1, 1, 10)
TABLE = make_table(DIMS, bounds=(0.0,), cuts=("input",), exits=(1,))


def raw_server(part=None):
    """A thread answering each 1 MiB with one byte; with `part`, after running it on the bytes
    (the edge's seconds appended to the returned list, as the server reports them)."""
    srv = socket.create_server(("127.0.0.1", 0))
    buf = memoryview(bytearray(4 * N))
    x = np.frombuffer(buf, np.float32).reshape(1, N)
    edge_s: list[float] = []

    def serve():
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                got = 0
                while got < len(buf):
                    n = conn.recv_into(buf[got:])
                    if not n:
                        return
                    got += n
                if part is not None:
                    t = time.monotonic()
                    assert part.run("e1/input", {"x": x}).done
                    edge_s.append(time.monotonic() - t)
                conn.sendall(b"!")

    threading.Thread(target=serve, daemon=True).start()
    return srv, edge_s


def loopback(runs: int, bare_raw: bool = False) -> tuple[float, float, float]:
    """One session: medians of raw and runtime round trips (compute subtracted), and their ratio."""
    x = np.random.default_rng(0).standard_normal((1, N), dtype=np.float32)
    payload = memoryview(x.reshape(-1).view(np.uint8))
    edge = NumpyPart("edge", DIMS, TABLE)
    srv, edge_s = raw_server(None if bare_raw else edge)
    raw = socket.create_connection(srv.getsockname())
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    part = NumpyPart("device", DIMS, TABLE)
    with EdgeServer(edge, "127.0.0.1", 0) as server:
        conn = EdgeConnection(*server.address, *P.manifest_identity(part))
        t_raw, t_rt = [], []
        for i in range(runs + 5):
            t = time.perf_counter()
            raw.sendall(payload)
            assert raw.recv(1) == b"!"
            a = time.perf_counter() - t - (edge_s[-1] if edge_s else 0.0)
            t = time.perf_counter()
            reply, _, _ = conn.request(P.infer(i, "e1/input", {"x": x}, None), None)
            b = time.perf_counter() - t - reply["edge_s"]
            assert reply["type"] == "result", reply
            if i >= 5:                                  # warm-up
                t_raw.append(a)
                t_rt.append(b)
        conn.close()
    raw.close()
    srv.close()
    a, b = statistics.median(t_raw), statistics.median(t_rt)
    return a, b, b / a


def link(runs: int, rate: float, delay: float) -> tuple[float, float]:
    part = NumpyPart("device", DIMS, TABLE)
    x = np.random.default_rng(1).standard_normal((1, N), dtype=np.float32)
    measured, ideal = [], []
    with EdgeServer(NumpyPart("edge", DIMS, TABLE), "127.0.0.1", 0) as server, \
            LinkEmulator(to=server.address, rate=rate, delay=delay) as emu, \
            DeviceRuntime(part, edge=emu.address, probe_interval=None, initial_bandwidth=rate) as rt:
        for _ in range(runs):
            r = rt.infer(x)
            assert r.where == "edge", r.reason
            measured.append(r.transfer_s)
            ideal.append(8 * (r.timing["up_bytes"] + r.timing["down_bytes"]) / rate + 2 * delay)
            time.sleep(0.05)                            # let the bucket refill as between real requests
    return statistics.median(measured), statistics.median(ideal)


def soak(seconds: float) -> None:
    import pytest  # noqa: F401  (the soak lives in the tests; run it with its fixtures)

    rc = pytest.main(["-q", "-m", "slow", str(Path(__file__).resolve().parent.parent / "tests" / "runtime"
                                           / "test_soak.py"), "-k", "30s" if seconds >= 30 else "5s"])
    print(f"soak (32 devices, {seconds:g} s): {'ok' if rc == 0 else 'FAILED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--link-runs", type=int, default=7)
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--delay", default="20ms")
    ap.add_argument("--sessions", type=int, default=10, help="fresh servers and buffers for the loopback runs")
    ap.add_argument("--bare-raw", action="store_true", help="the raw side skips the edge compute (see 1.)")
    ap.add_argument("--soak", type=float, default=0.0, help="also run the 32-device soak (30: the slow test)")
    args = ap.parse_args()
    rate, delay = parse_bandwidth(args.rate), parse_time(args.delay)

    per = max(20, args.runs // args.sessions)
    sessions = [loopback(per, args.bare_raw) for _ in range(args.sessions)]
    raw_s, rt_s, ratio = (statistics.median(v) for v in zip(*sessions))
    print(f"loopback, 1 MiB: raw sendall{' (no compute)' if args.bare_raw else ''} {raw_s * 1e3:.3f} ms, "
          f"runtime {rt_s * 1e3:.3f} ms (edge compute subtracted; medians over {args.sessions} sessions of "
          f"{per} interleaved runs; session ratios {min(v[2] for v in sessions):.2f}-{max(v[2] for v in sessions):.2f})")
    got, want = link(args.link_runs, rate, delay)
    print(f"link {args.rate} + {args.delay} each way, 1 MiB: transfer {got * 1e3:.1f} ms, "
          f"bytes/rate + RTT {want * 1e3:.1f} ms (medians of {args.link_runs})")
    if args.soak:
        soak(args.soak)
    print(f"loopback_ratio={ratio:.3f} link_ratio={got / want:.3f}")


if __name__ == "__main__":
    main()
