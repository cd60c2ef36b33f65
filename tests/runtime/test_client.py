"""The device client: plans, early exits, deadlines, and answering locally when the edge fails."""
from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import x_for
from numpy_part import NumpyPart, make_table

from edgecut.runtime.client import DeviceRuntime
from edgecut.types import Cut, Plan, PlanTable

pytestmark = pytest.mark.timeout(120)
HERE = Path(__file__).parent


@pytest.fixture
def edge_process():
    procs = []

    def start(delay=0.0):
        p = subprocess.Popen([sys.executable, str(HERE / "serve_numpy.py"), "--delay", str(delay)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        assert line.startswith("PORT"), p.stderr.read()
        procs.append(p)
        return p, ("127.0.0.1", int(line.split()[1]))

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_edge_answers_with_timing_breakdown(make_server):
    server, part = make_server(), NumpyPart("device")
    with DeviceRuntime(part, edge=server.address, probe_interval=None) as rt:
        x = x_for(part, 0)
        r = rt.infer(x)
        assert r.where == "edge" and r.plan_id == "e1/input"       # loopback is fast: the top plan
        assert np.allclose(r.logits, part.reference(x), atol=1e-5)
        assert r.device_s >= 0 and r.transfer_s > 0 and r.edge_s > 0
        assert r.total_s >= r.device_s + r.transfer_s + r.edge_s - 1e-6
        assert rt.estimator.bandwidth > 20e6 and rt.estimator.rtt is not None


def test_unreachable_edge_answers_locally_and_fast():
    part = NumpyPart("device")
    with DeviceRuntime(part, edge=("127.0.0.1", free_port()), probe_interval=None, initial_bandwidth=1e9) as rt:
        for i in range(3):
            t = time.monotonic()
            x = x_for(part, i)
            r = rt.infer(x)
            assert r.where == "fallback" and "unreachable" in r.reason and r.plan_id == "e1/device"
            assert np.allclose(r.logits, part.reference(x), atol=1e-5)
            assert time.monotonic() - t < 2.5


def test_slow_edge_times_out_within_the_deadline(make_server):
    table = make_table((256, 128, 64, 10), deadline=0.3)       # the table's deadline: no re-planning
    server, part = make_server(NumpyPart("edge", table=table, edge_delay=1.0)), NumpyPart("device", table=table)
    with DeviceRuntime(part, edge=server.address, probe_interval=None, initial_bandwidth=1e9) as rt:
        t = time.monotonic()
        r = rt.infer(x_for(part, 0), deadline=0.3)
        assert time.monotonic() - t < 0.9
        assert r.where == "fallback" and "timed out" in r.reason


def test_edge_killed_mid_request(edge_process):
    proc, addr = edge_process(delay=3.0)
    part = NumpyPart("device")
    with DeviceRuntime(part, edge=addr, probe_interval=None, initial_bandwidth=1e9) as rt:
        x, out = x_for(part, 5), {}
        t = threading.Thread(target=lambda: out.setdefault("r", rt.infer(x)))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.5)
        proc.kill()
        t.join(10)
        r = out["r"]
        assert time.monotonic() - t0 < 2.5                      # did not wait for the 3 s edge
        assert r.where == "fallback" and "edge lost" in r.reason, r.reason
        assert np.allclose(r.logits, part.reference(x), atol=1e-5)
        r2 = rt.infer(x)                                        # and stays usable, locally
        assert r2.where == "fallback"


def test_sigterm_drains_in_flight_then_exits(edge_process):
    proc, addr = edge_process(delay=1.0)
    part = NumpyPart("device")
    with DeviceRuntime(part, edge=addr, probe_interval=None, initial_bandwidth=1e9) as rt:
        x, out = x_for(part, 1), {}
        t = threading.Thread(target=lambda: out.setdefault("r", rt.infer(x)))
        t.start()
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        t.join(10)
        assert out["r"].where == "edge", out["r"].reason         # the request in flight was answered
        assert proc.wait(10) == 0
        log = proc.stderr.read()
        assert "draining" in log and "1 requests" in log
        with pytest.raises(OSError):
            socket.create_connection(addr, timeout=1).close()


def test_early_exit_when_confident(make_server):
    server = make_server()
    part = NumpyPart("device", exit_threshold=100.0)             # every sample is "confident"
    with DeviceRuntime(part, edge=server.address, probe_interval=None, initial_bandwidth=5e6) as rt:
        r = rt.infer(x_for(part, 0))                            # 5 Mbit/s -> after:l2, past exit 0
        assert r.where == "device" and r.exit_id == 0 and "early exit" in r.reason
        assert r.plan_id == "e1/after:l2"
        r = rt.infer(x_for(part, 0), early_exit=False)
        assert r.where == "edge" and r.exit_id == 1, r.reason


def test_device_only_plan_without_edge():
    part = NumpyPart("device")
    with DeviceRuntime(part, edge=None) as rt:
        r = rt.infer(x_for(part, 0))
        assert r.where == "device" and r.plan_id == "e1/device" and r.transfer_s == 0


def _plan(exit_id, cut, crossing_bytes, device_s, edge_s, acc):
    crossing = () if cut == "device" else ("x",)
    return Plan(exit_id, Cut(cut, frozenset({"x"}), crossing, crossing_bytes), device_s, 0.0, edge_s, acc)


def test_per_request_deadline_replans_over_the_table():
    full_local = _plan(1, "device", 0, 0.5, 0.0, 0.9)
    offload = _plan(1, "input", 1000, 0.0, 0.01, 0.9)
    small_local = _plan(0, "device", 0, 0.05, 0.0, 0.6)
    table = PlanTable((0.0, 1e5, 1e7), (full_local, small_local, offload), deadline=1.0)
    part = NumpyPart("device", table=table)
    with DeviceRuntime(part, edge=("127.0.0.1", 1), probe_interval=None, initial_bandwidth=1e6) as rt:
        assert rt.choose_plan().id == "e0/device"                       # the table at 1 Mbit/s
        assert rt.choose_plan(1.0).id == "e0/device"                    # the table's own deadline
        assert rt.choose_plan(0.1).id == "e1/input"                     # 8 ms transfer fits 0.1 s
        assert rt.choose_plan(0.01).id == "e1/input"                    # nothing fits: the fastest
        assert rt.choose_plan(math.inf).id in ("e1/input", "e1/device")  # both most accurate
        rt.estimator = type(rt.estimator)(initial_bandwidth=1e4)
        assert rt.choose_plan(0.1).id == "e0/device"                    # 0.8 s transfer: stay local
        assert rt._local_plan(time.monotonic() + 0.1) == "e0/device"    # the best exit that fits
        assert rt._local_plan(time.monotonic() + 5) == "e1/device"


def test_plan_table_helper_is_consistent():
    t = make_table((256, 128, 64, 10))
    assert [p.id for p in t.plans] == ["e1/device", "e1/after:l2", "e1/input"]
    assert t.lookup(5e6).id == "e1/after:l2"


def test_runtime_imports_without_torch():
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError(name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import edgecut.runtime.client, edgecut.runtime.server, edgecut.runtime.linkemu\n"
            "import edgecut.cli.serve, edgecut.cli.run, edgecut.cli.link\n"
            "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("delay", [0.0, 0.005])
def test_connection_polls_for_a_reply_only_when_replies_come_fast(make_server, delay):
    """A reply that came within REPLY_SPIN_S makes the next wait poll without sleeping (a wake-up
    costs tens of us on loopback); a slower edge is waited for asleep, from the first request on."""
    from edgecut.runtime import client as C
    from edgecut.runtime import protocol as P

    server, part = make_server(NumpyPart("edge", edge_delay=delay)), NumpyPart("device")
    conn = C.EdgeConnection(*server.address, *P.manifest_identity(part), deadline=time.monotonic() + 5)
    spins, waits, recv = [], [], conn.ch.recv
    conn.ch.recv = lambda *a, **kw: spins.append(kw.get("spin_s", 0.0)) or recv(*a, **kw)
    for i in range(20):
        x = x_for(part, i)
        reply, _, _ = conn.request(P.infer(i, "e1/input", {"x": x}, None), time.monotonic() + 5)
        assert np.allclose(P.decode_tensors(reply["outputs"])["logits"], part.reference(x), atol=1e-5)
        waits.append(conn._last_wait)
    conn.close()
    assert spins[0] == 0.0                                        # nothing known yet: sleep
    assert spins[1:] == [C.REPLY_SPIN_S if w <= C.REPLY_SPIN_S else 0.0 for w in waits[:-1]]
    assert (min(waits) > C.REPLY_SPIN_S) == (delay > C.REPLY_SPIN_S)
