"""The network model: `Link(bandwidth, rtt, overhead)` helpers and the runtime's measured
per-message overhead.

The overhead is what one infer request/result costs beyond the link's bandwidth and round trip:
encoding the msgpack frame, syscalls, decoding the tensors on the other side, the reply. It is
measured with the runtime's own wire code (`edgecut.runtime.protocol.Channel`, `infer`, `result`)
over a real loopback TCP socket: the median round trip of a request carrying a tiny tensor. The
fitted loopback seconds-per-byte is reported too (it says how fast the runtime moves bytes when
the network is not the limit).
"""
from __future__ import annotations

import socket
import threading
import time

import numpy as np

from edgecut.types import Link
from edgecut.units import parse_bandwidth, parse_time

SIZES = (16, 16_384, 262_144, 1_048_576)   # payload bytes of the timed requests


def _edge(listener: socket.socket) -> None:
    from edgecut.runtime import protocol as P

    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ch = P.Channel(conn)
    out = {"logits": np.zeros((1, 10), np.float32)}
    try:
        while True:
            msg = ch.recv()
            if msg["type"] != "infer":
                return
            P.decode_tensors(msg["tensors"])
            ch.send(P.result(msg["id"], out, 0.0, 0.0))
    except (ConnectionError, OSError):
        return
    finally:
        ch.close()


def measure_message_overhead(sizes=SIZES, repeats: int = 30) -> dict:
    """Round trips of infer/result frames over loopback TCP with the runtime's protocol code.
    Returns {"overhead_s" (smallest payload's median round trip), "s_per_byte", "points"}."""
    from edgecut.runtime import protocol as P

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = threading.Thread(target=_edge, args=(listener,), daemon=True)
    server.start()
    points = []
    try:
        sock = socket.create_connection(listener.getsockname(), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ch = P.Channel(sock)
        for size in sizes:
            x = np.random.default_rng(size).standard_normal(max(size // 4, 1)).astype(np.float32)
            times = []
            for i in range(repeats + 3):
                t0 = time.perf_counter()
                ch.send(P.infer(i, "e0/input", {"x": x}, None))
                ch.recv()
                times.append(time.perf_counter() - t0)
            points.append((int(x.nbytes), float(np.median(times[3:]))))
        ch.send({"type": "ping", "id": -1})
        ch.close()
    finally:
        server.join(timeout=5)
        listener.close()
    x, y = np.array(points, dtype=float).T
    slope = np.polyfit(x, y, 1)[0]
    return {"overhead_s": float(y[0]), "s_per_byte": float(max(slope, 0.0)),
            "points": [[int(a), float(b)] for a, b in points]}


def link(bandwidth, rtt=0.0, overhead: float | None = None, profile=None) -> Link:
    """A `Link` from human units ('8mbit', '20ms'); the overhead defaults to the profile's measured
    per-message overhead (0 without a profile)."""
    if overhead is None:
        overhead = profile.message_overhead_s if profile is not None else 0.0
    return Link(parse_bandwidth(bandwidth), parse_time(rtt), float(overhead))


def transfer_seconds(lnk: Link, nbytes: int, reply_bytes: int = 0) -> float:
    """Seconds to ship `nbytes` to the edge (and `reply_bytes` back) over `lnk`."""
    return lnk.transfer_seconds(nbytes, reply_bytes)
