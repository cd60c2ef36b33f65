"""The link emulator over real loopback sockets, and the device re-planning when it slows down."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import x_for
from numpy_part import NumpyPart, make_table

from edgecut.runtime.client import DeviceRuntime
from edgecut.runtime.linkemu import LinkEmulator

pytestmark = pytest.mark.timeout(120)


def sink_server():
    """Accepts one connection, reads until a 1-byte end marker length is reached, answers b'!'."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with conn:
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    return
                n, got = int.from_bytes(head, "big"), 0
                while got < n:
                    got += len(conn.recv(min(1 << 20, n - got)))
                conn.sendall(b"!")

    threading.Thread(target=serve, daemon=True).start()
    return srv


def timed_transfer(addr, n) -> float:
    with socket.create_connection(addr) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(n.to_bytes(8, "big") + b"\0")            # warm the connection (and the bucket)
        t = time.monotonic()
        s.sendall(bytes(n - 1))
        assert s.recv(1) == b"!"
        return time.monotonic() - t


def test_rate_and_delay_are_honoured():
    srv = sink_server()
    with LinkEmulator(to=srv.getsockname(), rate=8e6, delay=0.02) as link:
        n = 200_000
        took = timed_transfer(link.address, n)
        ideal = n * 8 / 8e6 + 0.04
        assert took >= ideal - 0.01                          # never faster than the link allows
        assert took <= 3 * ideal                             # and not wildly slower (2 shared cores)
    srv.close()


def test_unshaped_link_relays_both_ways_and_closes():
    srv = sink_server()
    with LinkEmulator(to=srv.getsockname()) as link:
        assert timed_transfer(link.address, 1 << 20) < 5
        assert link.up.bytes >= 1 << 20 and link.down.bytes == 1
    srv.close()


def test_bandwidth_drop_moves_the_device_to_the_tables_plan(make_server):
    # x is 128 KiB (edge-only plan), l2 is 4 KiB (mid plan); below 0.5 Mbit/s: device only
    dims = (32768, 16, 1024, 10)
    table = make_table(dims, bounds=(0.0, 0.5e6, 10e6))
    server = make_server(NumpyPart("edge", dims, table))
    part = NumpyPart("device", dims, table)
    with LinkEmulator(to=server.address, rate=400e6, delay=0.002) as link, \
            DeviceRuntime(part, edge=link.address, probe_interval=None) as rt:
        for i in range(4):
            x = x_for(part, i)
            r = rt.infer(x)
            assert r.where == "edge" and np.allclose(r.logits, part.reference(x), atol=1e-4)
        fast = rt.plan_history[-1]
        assert fast == table.lookup(400e6).id == "e1/input", (rt.plan_history, rt.estimator)
        link.set_rate(up=2e6, down=2e6)
        for i in range(6):
            x = x_for(part, 10 + i)
            r = rt.infer(x)
            assert np.allclose(r.logits, part.reference(x), atol=1e-4)
        assert rt.plan_history[-1] == table.lookup(2e6).id == "e1/after:l2", (rt.plan_history, rt.estimator)
        assert 0.5e6 < rt.estimator.bandwidth < 4e6
        # the moment the estimate fell, the very next request used the new plan
        switched = rt.plan_history.index("e1/after:l2", 4)
        assert switched <= 4 + 3, rt.plan_history


def test_idle_probe_notices_a_faster_link(make_server):
    dims = (32768, 16, 1024, 10)
    table = make_table(dims, bounds=(0.0, 0.5e6, 10e6))
    server = make_server(NumpyPart("edge", dims, table))
    part = NumpyPart("device", dims, table)
    with LinkEmulator(to=server.address, rate=2e6, delay=0.002) as link, \
            DeviceRuntime(part, edge=link.address, probe_interval=0.3) as rt:
        rt.infer(x_for(part, 0))
        assert rt.plan_history[-1] == "e1/after:l2"
        link.set_rate(up=400e6, down=400e6)
        deadline = time.monotonic() + 10
        while rt.estimator.bandwidth < 10e6 and time.monotonic() < deadline:
            time.sleep(0.1)                                  # only the idle prober measures now
        rt.infer(x_for(part, 1))
        assert rt.plan_history[-1] == "e1/input", (rt.plan_history, rt.estimator)


def test_one_probe_finds_a_much_faster_link(make_server):
    # the estimate says 10 Mbit/s, the link carries 100 Mbit/s with a 20 ms RTT (a bandwidth-delay
    # product of 250 kB): one probe (a few uploads, each sized from the last one's rate) finds it
    dims = (32768, 16, 1024, 10)
    table = make_table(dims, bounds=(0.0, 0.5e6, 10e6))
    server = make_server(NumpyPart("edge", dims, table))
    with LinkEmulator(to=server.address, rate=100e6, delay=0.010) as link, \
            DeviceRuntime(NumpyPart("device", dims, table), edge=link.address, probe_interval=None,
                          initial_bandwidth=10e6) as rt:
        bw = rt.probe()
        assert 75e6 < bw < 125e6, rt.estimator
        assert 2 <= rt.estimator.samples <= 4, rt.estimator   # uploads until two agreed


def test_link_cli(make_server):
    server = make_server()
    proc = subprocess.Popen([sys.executable, "-m", "edgecut", "link", "--listen", "127.0.0.1:0", "--to",
                             f"127.0.0.1:{server.address[1]}", "--rate", "50mbit", "--delay", "5ms"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("edgecut link:") and "50 Mbit/s" in line, proc.stderr.read()
        port = int(line.split()[2].rsplit(":", 1)[1])
        part = NumpyPart("device")
        with DeviceRuntime(part, edge=("127.0.0.1", port), probe_interval=None, initial_bandwidth=1e9) as rt:
            r = rt.infer(x_for(part, 0))
            assert r.where == "edge" and r.transfer_s >= 0.01          # two 5 ms one-way delays
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
