"""bench/runtime.py: what the runtime costs on top of the network.

1. Loopback: one 1 MB float32 tensor sent to a real EdgeServer as an infer request (framing,
   msgpack, sendmsg, recv_into, decode, thread handoff, the reply) against a raw socket `sendall`
   of the same bytes to a thread that `recv_into`s them and answers one byte. Both round trips;
   the edge's compute (reported in the reply) is subtracted. Runs are interleaved, medians kept.
   Goal: ratio <= 1.2.
2. Emulated link (edgecut.runtime.linkemu, --rate, --delay): `DeviceRuntime.infer` with an
   edge-only plan whose crossing tensor is that 1 MB input; its measured transfer time against
   bytes*8/rate + RTT (the bytes of both frames, RTT = 2 x delay). Goal: within 10%.
3. With --soak N: 32 devices for N seconds, requests per second and the check that no reply was
   lost, duplicated or crossed (tests/runtime/test_soak.py, in its slow 30 s form).

    python bench/runtime.py [--runs 200] [--link-runs 7] [--rate 20mbit] [--delay 20ms] [--soak 30]

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


def raw_server():
    srv = socket.create_server(("127.0.0.1", 0))
    buf = memoryview(bytearray(4 * N))

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
                conn.sendall(b"!")

    threading.Thread(target=serve, daemon=True).start()
    return srv


def loopback(runs: int) -> tuple[float, float]:
    x = np.random.default_rng(0).standard_normal((1, N), dtype=np.float32)
    payload = memoryview(x.reshape(-1).view(np.uint8))
    srv = raw_server()
    raw = socket.create_connection(srv.getsockname())
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    part = NumpyPart("device", DIMS, TABLE)
    with EdgeServer(NumpyPart("edge", DIMS, TABLE), "127.0.0.1", 0) as server:
        conn = EdgeConnection(*server.address, *P.manifest_identity(part))
        t_raw, t_rt = [], []
        for i in range(runs + 5):
            t = time.perf_counter()
            raw.sendall(payload)
            assert raw.recv(1) == b"!"
            a = time.perf_counter() - t
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
    return statistics.median(t_raw), statistics.median(t_rt)


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
    ap.add_argument("--soak", type=float, default=0.0, help="also run the 32-device soak (30: the slow test)")
    args = ap.parse_args()
    rate, delay = parse_bandwidth(args.rate), parse_time(args.delay)

    raw_s, rt_s = loopback(args.runs)
    print(f"loopback, 1 MiB: raw sendall {raw_s * 1e3:.3f} ms, runtime {rt_s * 1e3:.3f} ms "
          f"(medians of {args.runs}, interleaved)")
    got, want = link(args.link_runs, rate, delay)
    print(f"link {args.rate} + {args.delay} each way, 1 MiB: transfer {got * 1e3:.1f} ms, "
          f"bytes/rate + RTT {want * 1e3:.1f} ms (medians of {args.link_runs})")
    if args.soak:
        soak(args.soak)
    print(f"loopback_ratio={rt_s / raw_s:.3f} link_ratio={got / want:.3f}")


if __name__ == "__main__":
    main()
