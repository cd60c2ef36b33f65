"""The edge tier: the same front, edge parts on Ray Serve replicas (a real local Ray cluster)."""
from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import handshake, x_for
from numpy_part import NumpyPart

from edgecut.runtime import protocol as P
from edgecut.runtime.client import DeviceRuntime
from edgecut.runtime.server import EdgeServer

TOKEN = b"0123456789abcdef-tier"


def tier(ray_cluster, parts, **kw):
    from edgecut.runtime.tier import RayExecutor

    opts = dict(min_replicas=1, max_replicas=2, replica_cpus=0.25, batch_wait_s=0.005)
    opts.update(kw.pop("tier", {}))
    return EdgeServer(parts, "127.0.0.1", 0, calibrate=False, executor=lambda p, a: RayExecutor(p, a, **opts),
                      **kw).start()


@pytest.fixture(scope="module")
def two_models(ray_cluster):
    from edgecut.runtime.metrics import Metrics

    a, b = NumpyPart("edge"), NumpyPart("edge", dims=(64, 32, 16, 4), seed=1, model="numpy-small")
    metrics = Metrics()
    srv = tier(ray_cluster, [a, b], token=TOKEN, metrics=metrics)
    port = metrics.serve(0)
    yield srv, port
    srv.shutdown(2.0)
    metrics.close()


def _device(srv, **kw):
    dev = NumpyPart("device", **kw)
    return dev, DeviceRuntime(dev, edge=srv.address, token=TOKEN, probe_interval=None, initial_bandwidth=1e9)


def test_two_models_right_answers_and_unknown_model(two_models):
    srv, _ = two_models
    assert 0 < srv.models["numpy-mlp"].executor.overhead_s < 1.0    # measured hop, added to welcome times
    for kw in ({}, dict(dims=(64, 32, 16, 4), seed=1, model="numpy-small")):
        dev, rt = _device(srv, **kw)
        try:
            for i in range(20):
                x = x_for(dev, i)
                r = rt.infer(x)
                assert r.where == "edge", r.reason
                assert np.allclose(r.logits, dev.reference(x), atol=1e-5)
        finally:
            rt.close()
    ch = handshake(srv.address, NumpyPart("edge", model="numpy-other"), token=TOKEN)
    reply = ch.recv(time.monotonic() + 5)
    assert reply["type"] == "error" and P.error_of(reply)[0] == P.MODEL
    assert "'numpy-mlp', 'numpy-small'" in P.error_of(reply)[1]
    ch.close()


def test_devices_batched_together_and_metrics(two_models):
    srv, port = two_models
    part, errors, n = NumpyPart("edge"), [], 40

    def device(seed):
        ch = handshake(srv.address, part, token=TOKEN)
        assert ch.recv(time.monotonic() + 5)["type"] == "welcome"
        for i in range(n):
            x = np.random.default_rng(seed * 1000 + i).standard_normal((1, 64), dtype=np.float32)
            ch.send(P.infer(i, "e1/after:l2", {"l2": x}, 2.0))
            r = ch.recv(time.monotonic() + 5)
            ref = x @ part.w[2]
            if r["type"] != "result" or not np.allclose(P.decode_tensors(r["outputs"])["logits"], ref, atol=1e-5):
                errors.append(r)
        ch.close()

    threads = [threading.Thread(target=device, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    count = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    assert count['edgecut_requests_total{model="numpy-mlp",plan="e1/after:l2"}'] >= 8 * n
    batch_n = count['edgecut_batch_size_count{model="numpy-mlp"}']
    assert count['edgecut_batch_size_sum{model="numpy-mlp"}'] > batch_n * 1.2    # requests shared replica calls
    assert 'edgecut_latency_seconds_bucket{le="0.05",model="numpy-mlp",plan="e1/after:l2"}' in count


def test_hostile_frames_against_the_tier(two_models):
    from test_fuzz import fuzz

    srv, _ = two_models
    dev, rt = _device(srv)
    try:
        assert fuzz(srv, 60, token=TOKEN) >= 60
        for i in range(5):              # the tier still answers, right
            x = x_for(dev, i)
            r = rt.infer(x)
            assert r.where == "edge" and np.allclose(r.logits, dev.reference(x), atol=1e-5), r.reason
    finally:
        rt.close()


def _closed_after(host: str, port: int, frames: list, raw: bytes = b"") -> list:
    """The types of what a replica's data port answers to `frames` (and `raw` bytes) before it
    closes the connection (it must close it within 5 s)."""
    import socket

    ch = P.Channel(socket.create_connection((host, port), timeout=5))
    for f in frames:
        ch.send(f)
    if raw:
        ch.sock.sendall(raw)
    got = []
    try:
        while True:
            got.append(ch.recv(time.monotonic() + 5)["type"])
    except (ConnectionError, P.ProtocolError):
        return got
    finally:
        ch.close()


def test_data_port_latency_path_hostile_frames_and_fallback(two_models):
    """A lone request goes over a replica's data port; the port closes a connection without its
    token or with a frame it cannot read, and keeps serving; a port the front cannot reach makes
    it call that replica through Ray instead."""
    import socket

    srv, _ = two_models
    ex = srv.models["numpy-mlp"].executor
    dev, rt = _device(srv)
    try:
        def right(i):
            x = x_for(dev, i)
            r = rt.infer(x)
            assert r.where == "edge" and np.allclose(r.logits, dev.reference(x), atol=1e-5), r.reason

        right(0)
        assert ex.data_port and ex._idle, "the request's connection is back in the front's pool"
        name = next(iter(ex._idle))
        host, port, token = ex._ports[name]
        x = {"x": np.ones((1, 256), np.float32)}
        assert _closed_after(host, port, [{"type": "run", "plan": "e1/input", "budgets": [1.0],
                                           "tensors": [P.TensorDict(x)]}]) == []          # no token
        assert _closed_after(host, port, [{"type": "open", "token": b"0" * 32}]) == []
        assert _closed_after(host, port, [], raw=b"\x00\x00\x00\x05hello") == []
        opened = {"type": "open", "token": token}
        assert _closed_after(host, port, [opened, {"type": "run", "plan": "e1/input", "budgets": [1.0],
                                                   "tensors": "x"}]) == ["opened"]
        assert _closed_after(host, port, [opened, {"type": "ping"}, {"type": "infer"}]) == ["opened", "pong"]
        for i in range(1, 4):
            right(i)

        spare = socket.create_server(("127.0.0.1", 0))
        nowhere = ("127.0.0.1", spare.getsockname()[1], token)
        spare.close()
        with ex._lock:
            ports, ex._ports = ex._ports, {n: nowhere for n in ex._ports}
            idle, ex._idle = [c for cs in ex._idle.values() for c in cs], {}
        for c in idle:
            c.close()
        try:
            right(4)
            assert not ex._ports, "an unreachable port is dropped; the request went through Ray"
        finally:
            with ex._lock:
                ex._ports = ports
    finally:
        rt.close()


def _kill_busy(ray, ex):
    """Kill the replica computing the one request in flight."""
    time.sleep(0.25)                     # the request is computing on a replica now
    busy = [n for n, k in ex._inflight.items() if k]
    assert len(busy) == 1
    ray.kill(ray.get_actor(busy[0], namespace="serve"), no_restart=True)
    return time.monotonic()


@pytest.fixture(params=[True, False], ids=["data-port", "ray-call"])
def slow_tier(ray_cluster, request):
    slow = NumpyPart("edge", edge_delay=0.5, model="numpy-slow")
    srv = tier(ray_cluster, slow, tier=dict(min_replicas=2, max_replicas=2, batching=False, data_port=request.param))
    ex = srv.models["numpy-slow"].executor
    assert len(ex.replica_names()) == 2
    ch = handshake(srv.address, slow)
    assert ch.recv(time.monotonic() + 5)["type"] == "welcome"
    yield slow, ex, ch
    ch.close()
    srv.shutdown(2.0)


def test_replica_killed_mid_request_retried_then_timed_out(ray_cluster, slow_tier):
    slow, ex, ch = slow_tier
    x = np.ones((1, 256), np.float32)
    ch.send(P.infer(1, "e1/input", {"x": x}, 10.0))
    t0 = _kill_busy(ray_cluster, ex)
    r = ch.recv(time.monotonic() + 15)
    assert r["type"] == "result", r                 # retried on the other replica at once
    assert time.monotonic() - t0 < 2.0
    assert np.allclose(P.decode_tensors(r["outputs"])["logits"], slow.reference(x), atol=1e-5)
    ch.send(P.infer(2, "e1/input", {"x": x}, 0.8))  # now kill the other one too: nothing to retry on
    t0 = _kill_busy(ray_cluster, ex)
    r = ch.recv(time.monotonic() + 15)
    assert r["type"] == "error" and P.error_of(r)[0] == P.TIMEOUT, r
    assert time.monotonic() - t0 < 0.8              # in time: the device still has its local exit


@pytest.mark.slow
def test_killed_replicas_are_restarted_and_serve_again(ray_cluster, slow_tier):
    slow, ex, ch = slow_tier
    x = np.ones((1, 256), np.float32)
    for rid in range(2):
        ch.send(P.infer(rid, "e1/input", {"x": x}, 0.4))
        _kill_busy(ray_cluster, ex)
        ch.recv(time.monotonic() + 15)
    end = time.monotonic() + 60
    while len(ex.replica_names()) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    assert len(ex.replica_names()) == 2
    ch.send(P.infer(9, "e1/input", {"x": x}, 10.0))
    r = ch.recv(time.monotonic() + 15)
    assert r["type"] == "result", r


def test_replica_bounds_parse():
    from edgecut.cli.serve import parse_bounds
    from edgecut.errors import UsageError

    assert parse_bounds("1:4", "--replicas") == (1, 4) and parse_bounds("3", "--replicas") == (3, 3)
    for bad in ("0:2", "3:1", "a:b", ""):
        with pytest.raises(UsageError, match="MIN:MAX"):
            parse_bounds(bad, "--replicas")


@pytest.mark.slow
def test_cli_serve_ray_real_artifact(exit_artifact, tmp_path):
    """`edgecut serve ART --ray` (its own local cluster) answers a device from a TVM replica."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    path, x = exit_artifact
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    serve = subprocess.Popen([sys.executable, "-m", "edgecut", "serve", str(path), "--ray", "--port", "0",
                              "--no-calibrate", "--replicas", "1:1", "--replica-cpus", "0.5", "--metrics-port",
                              str(mport)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_ADDRESS": ""})
    try:
        line = serve.stdout.readline()
        assert line.startswith("edgecut serve:"), serve.stderr.read()[-3000:]
        host, port = line.split()[-1].rsplit(":", 1)
        from edgecut.codegen.load import load

        device = load(path, side="device")
        with DeviceRuntime(device, edge=(host, int(port)), probe_interval=None, initial_bandwidth=1e9,
                           calibrate=False) as rt:
            r = rt.infer(x)
            assert r.where == "edge", r.reason
        with EdgeServer(path, "127.0.0.1", 0, calibrate=False) as local, \
                DeviceRuntime(device, edge=local.address, probe_interval=None, initial_bandwidth=1e9,
                              calibrate=False) as rt2:
            r2 = rt2.infer(x)
        assert r2.plan_id == r.plan_id and np.abs(r.logits - r2.logits).max() <= 1e-5
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert "edgecut_requests_total{" in text
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, serve.stderr.read()[-3000:]


@pytest.mark.slow
def test_autoscales_up_under_load(ray_cluster):
    """Serve scales 1 -> 2 replicas on the ongoing requests the replicas report (the front calls
    them directly, not through a handle). 7.5 s here, loaded machine."""
    from edgecut.runtime.tier import RayExecutor

    ex = RayExecutor(NumpyPart("edge", edge_delay=0.05, model="numpy-auto"), None, min_replicas=1, max_replicas=2,
                     batching=False, replica_cpus=0.25)
    stop, x = threading.Event(), np.ones((1, 256), np.float32)

    def load():
        while not stop.is_set():
            ex.infer("e1/input", {"x": x}, time.monotonic(), time.monotonic() + 5)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    try:
        assert len(ex.replica_names()) == 1
        for t in threads:
            t.start()
        end = time.monotonic() + 60
        while len(ex._actors) < 2 and time.monotonic() < end:
            time.sleep(0.5)
        assert len(ex._actors) == 2
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        ex.close()
