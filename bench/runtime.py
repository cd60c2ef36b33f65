"""bench/runtime.py: what the runtime costs on top of the network.

1. Loopback: one 1 MiB float32 tensor sent to a real EdgeServer as an infer request (framing,
   msgpack, sendmsg, recv_into, decode, the run, the reply) against a raw socket `sendall` of the
   same bytes to a process that `recv_into`s them, runs the same edge part on them and answers its
   8-byte compute time. Both are round trips from this process (the device) to an edge in its own
   process, as in deployment (a server thread in this process would share its GIL and caches); on
   both the edge's compute, timed the same way (time.monotonic around `part.run`), is subtracted.
   A third column, raw where both ends poll without sleeping as the runtime's do (the edge while
   a frame arrives, the device for a reply that came fast last time), shows what those tricks buy
   a bare socket: runtime / that is what the framing and the Python around it cost. Device and edge are pinned to different cores (--no-pin:
   wherever the scheduler puts them). The raw side computes too because what a 1 MiB copy costs
   depends on whether its buffers are still in the 2 MiB L2 cache; with `--bare-raw` it skips the
   run. Where buffers land in physical memory moves a 1 MiB copy by up to 2x from one process to
   the next, so the runs are split over `--sessions` fresh sets of processes, connections and
   buffers; the ratio printed is the median of the sessions' ratios of medians. Goal: ratio <= 1.2.
   Within a session the three kinds of trip go in blocks (4 of each, the order rotating, the first
   2 trips of a block not counted), so that one connection's requests follow each other as they do
   in deployment. The figure that the last line reports comes from the blocks. Beside it, sessions
   that interleave the trips one by one are printed. There one kind of trip sets up the next: a
   raw trip right after a runtime trip reads ~0.22 ms, against ~0.39 alone, after another raw
   connection's trip, or in blocks (the raw code is the same; the cause was not found, and it is
   not the runtime's polling for replies, which was switched off to check). In deployment a
   connection's trips follow each other, so the blocks are what the goal is read from. With
   --alone, raw and runtime are also timed each with only its own processes alive.
2. Emulated link (edgecut.runtime.linkemu, --rate, --delay): `DeviceRuntime.infer` with an
   edge-only plan whose crossing tensor is that 1 MB input; its measured transfer time against
   bytes*8/rate + RTT (the bytes of both frames, RTT = 2 x delay). Goal: within 10%.
3. With --soak N: 32 devices for N seconds, requests per second and the check that no reply was
   lost, duplicated or crossed (tests/runtime/test_soak.py, in its slow 30 s form).

    python bench/runtime.py [--runs 200] [--sessions 10] [--link-runs 7] [--bare-raw] [--rate 20mbit] [--delay 20ms]
                            [--alone SESSIONS] [--soak 30]

The machine is shared by other work: figures move; the medians are what to read. The last line
is `loopback_ratio=X link_ratio=Y`.
"""
from __future__ import annotations

import argparse
import socket
import multiprocessing as mp
import os
import statistics
import struct
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
PIN = True
BLOCKS = 4                         # blocks of each kind of trip per session
CPUS = sorted(os.sched_getaffinity(0))          # before any pinning
TABLE = make_table(DIMS, bounds=(0.0,), cuts=("input",), exits=(1,))


def _pin(cpu: int) -> None:
    """Device and edge on different cores, as on different machines (see the module docstring)."""
    if PIN and len(CPUS) > 1:
        os.sched_setaffinity(0, {CPUS[cpu]})


def _raw_child(listener: socket.socket, compute: bool, spin: bool) -> None:
    """The raw side's edge process: answers each 1 MiB with the edge's seconds (8 bytes), after
    running the edge part on the bytes when `compute`. `spin`: receive like the runtime does
    (poll without sleeping while bytes arrive) instead of blocking in every recv_into."""
    _pin(1)
    part = NumpyPart("edge", DIMS, TABLE)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(4 * N))
    x = np.frombuffer(buf, np.float32).reshape(1, N)
    while True:
        got = 0
        while got < len(buf):
            try:
                n = conn.recv_into(buf[got:], 0, socket.MSG_DONTWAIT if spin and got else 0)
            except BlockingIOError:
                continue
            if not n:
                return
            got += n
        edge_s = 0.0
        if compute:
            t = time.monotonic()
            assert part.run("e1/input", {"x": x}).done
            edge_s = time.monotonic() - t
        conn.sendall(struct.pack("<d", edge_s))


def _edge_child(pipe: socket.socket) -> None:
    _pin(1)
    with EdgeServer(NumpyPart("edge", DIMS, TABLE), "127.0.0.1", 0) as server:
        pipe.sendall(struct.pack(">H", server.address[1]))
        pipe.recv(1)                                    # until the parent kills this process


def _raw_client(compute: bool, spin: bool):
    ctx = mp.get_context("fork")
    listener = socket.create_server(("127.0.0.1", 0))
    child = ctx.Process(target=_raw_child, args=(listener, compute, spin), daemon=True)
    child.start()
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.close()
    return sock, child


def _edge_client():
    """An EdgeServer in a process of its own and a connection to it: (connection, pipe, process)."""
    mine, theirs = socket.socketpair()
    edge = mp.get_context("fork").Process(target=_edge_child, args=(theirs,), daemon=True)
    edge.start()
    (port,) = struct.unpack(">H", mine.recv(2))
    conn = EdgeConnection("127.0.0.1", port, *P.manifest_identity(NumpyPart("device", DIMS, TABLE)))
    return conn, mine, edge


def _raw_trip(sock: socket.socket, payload: memoryview, poll: bool = False) -> float:
    """Seconds of one raw round trip, the edge's compute subtracted. `poll`: wait for the reply
    without sleeping, as the runtime's device does for a fast reply."""
    t = time.perf_counter()
    sock.sendall(payload)
    if poll:
        got = b""
        while len(got) < 8:
            try:
                got += sock.recv(8 - len(got), socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
    else:
        got = sock.recv(8, socket.MSG_WAITALL)
    (edge_s,) = struct.unpack("<d", got)
    return time.perf_counter() - t - edge_s


def _runtime_trip(conn: EdgeConnection, x: np.ndarray, i: int) -> float:
    """Seconds of one infer request through the runtime, the edge's compute subtracted."""
    t = time.perf_counter()
    reply, _, _ = conn.request(P.infer(i, "e1/input", {"x": x}, None), None)
    assert reply["type"] == "result", reply
    return time.perf_counter() - t - reply["edge_s"]


def loopback(runs: int, bare_raw: bool = False, interleave: bool = False) -> tuple[float, float, float, float]:
    """One session: medians of the raw, raw-polling and runtime round trips (edge compute
    subtracted), and the ratio runtime / raw; `interleave`: one trip of each in turn instead of
    blocks (see the module docstring)."""
    x = np.random.default_rng(0).standard_normal((1, N), dtype=np.float32)
    payload = memoryview(x.reshape(-1).view(np.uint8))
    raw, raw_child = _raw_client(not bare_raw, spin=False)
    spun, spun_child = _raw_client(not bare_raw, spin=True)
    conn, mine, edge = _edge_client()
    trips = (lambda i: _raw_trip(raw, payload), lambda i: _raw_trip(spun, payload, poll=True),
             lambda i: _runtime_trip(conn, x, i))
    times = ([], [], [])
    if interleave:                                      # raw, spun, runtime, raw, spun, runtime, ...
        for i in range(runs + 5):
            got = [trip(i) for trip in trips]
            if i >= 5:                                  # warm-up
                for t, v in zip(times, got):
                    t.append(v)
    else:                                               # BLOCKS blocks of each, the order rotating
        per = max(1, runs // BLOCKS)
        for b in range(BLOCKS):
            for k in range(3):
                k = (k + b) % 3
                for i in range(per + 2):
                    v = trips[k](b * (per + 2) + i)
                    if i >= 2:                          # re-warm after the switch
                        times[k].append(v)
    t_raw, t_spun, t_rt = times
    conn.close()
    for sock in (raw, spun, mine):
        sock.close()
    for child in (raw_child, spun_child, edge):   # forked children hold each other's sockets: no EOF
        child.kill()
        child.join()
    a, b, c = (statistics.median(v) for v in (t_raw, t_spun, t_rt))
    return a, b, c, c / a


def alone(runs: int) -> tuple[float, float]:
    """One session of each kind with only its own processes alive: raw, then runtime (medians)."""
    x = np.random.default_rng(0).standard_normal((1, N), dtype=np.float32)
    payload = memoryview(x.reshape(-1).view(np.uint8))
    raw, raw_child = _raw_client(True, spin=False)
    t_raw = [_raw_trip(raw, payload) for _ in range(runs + 5)]
    raw.close()
    raw_child.kill()
    raw_child.join()
    conn, mine, edge = _edge_client()
    t_rt = [_runtime_trip(conn, x, i) for i in range(runs + 5)]
    conn.close()
    mine.close()
    edge.kill()
    edge.join()
    return statistics.median(t_raw[5:]), statistics.median(t_rt[5:])


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


def _report(sessions: list, how: str, args, per: int) -> float:
    raw_s, spun_s, rt_s, ratio = (statistics.median(v) for v in zip(*sessions))
    print(f"loopback, 1 MiB, {how}: raw sendall{' (no compute)' if args.bare_raw else ''} {raw_s * 1e3:.3f} ms, "
          f"raw with both ends polling {spun_s * 1e3:.3f} ms, runtime {rt_s * 1e3:.3f} ms (edge compute "
          f"subtracted; medians over {args.sessions} sessions of {per} runs; runtime / raw {ratio:.2f}, session "
          f"ratios {min(v[3] for v in sessions):.2f}-{max(v[3] for v in sessions):.2f}; runtime / polling raw "
          f"{statistics.median(v[2] / v[1] for v in sessions):.2f})")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--link-runs", type=int, default=7)
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--delay", default="20ms")
    ap.add_argument("--sessions", type=int, default=10, help="fresh servers and buffers for the loopback runs")
    ap.add_argument("--no-pin", action="store_true", help="leave device and edge processes where the scheduler puts them")
    ap.add_argument("--bare-raw", action="store_true", help="the raw side skips the edge compute (see 1.)")
    ap.add_argument("--alone", type=int, default=0, metavar="SESSIONS",
                    help="also time raw and runtime each with only its own processes alive, in this many sessions")
    ap.add_argument("--soak", type=float, default=0.0, help="also run the 32-device soak (30: the slow test)")
    args = ap.parse_args()
    rate, delay = parse_bandwidth(args.rate), parse_time(args.delay)

    global PIN
    PIN = not args.no_pin
    _pin(0)
    per = max(20, args.runs // args.sessions)
    blocks, interleaved = [], []
    for _ in range(args.sessions):
        blocks.append(loopback(per, args.bare_raw))
        interleaved.append(loopback(per, args.bare_raw, interleave=True))
    ratio = _report(blocks, f"in {BLOCKS} blocks of each", args, per)
    _report(interleaved, "interleaved one by one", args, per)
    if args.alone:
        each = [alone(per) for _ in range(args.alone)]
        raw_s, rt_s = (statistics.median(v) for v in zip(*each))
        print(f"loopback, 1 MiB, each alone: raw sendall {raw_s * 1e3:.3f} ms, runtime {rt_s * 1e3:.3f} ms "
              f"(medians over {args.alone} sessions of {per} runs; runtime / raw {rt_s / raw_s:.2f})")
    os.sched_setaffinity(0, CPUS)
    got, want = link(args.link_runs, rate, delay)
    print(f"link {args.rate} + {args.delay} each way, 1 MiB: transfer {got * 1e3:.1f} ms, "
          f"bytes/rate + RTT {want * 1e3:.1f} ms (medians of {args.link_runs})")
    if args.soak:
        soak(args.soak)
    print(f"loopback_ratio={ratio:.3f} link_ratio={got / want:.3f}")


if __name__ == "__main__":
    main()
