"""Fixtures for the runtime tests: real servers on 127.0.0.1 (port 0), real sockets."""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from numpy_part import NumpyPart  # noqa: E402

from edgecut.runtime import protocol as P  # noqa: E402
from edgecut.runtime.server import EdgeServer  # noqa: E402


def build_exit_artifact(out, **kw):
    """tiny_chain with an exit after pool1, built through TVM: e0/device (exit 0, accuracy 0.6,
    all on the device), e1/mid (cut after conv2) and e1/input (everything on the edge), both
    exit 1 (accuracy 0.9). `kw`: more build_artifact options. Returns (path, input array)."""
    from dataclasses import replace

    import torch

    import edgecut
    from edgecut import zoo
    from edgecut.codegen.artifact import build_artifact
    from edgecut.frontend import meta
    from edgecut.passes.insert_exits import insert_exits
    from edgecut.types import Plan, PlanTable

    spec = importlib.util.spec_from_file_location("codegen_helpers", Path(__file__).parents[1] / "codegen" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    make_cut = helpers.make_cut

    torch.manual_seed(0)
    model, x = zoo.get("tiny_chain").eval(), torch.randn(1, 3, 16, 16)
    gm = insert_exits(edgecut.trace(model, x), ["pool1"])
    exits = gm.meta[meta.EXITS]
    nodes = {n.name: n for n in gm.graph.nodes}
    cuts = [(0, make_cut(gm, [exits[0]["output"]], "device", 0)), (1, make_cut(gm, ["conv2"], "mid", 1)),
            (1, make_cut(gm, [], "input", 1))]
    acc = {0: 0.6, 1: 0.9}
    plans = tuple(Plan(e, replace(c, crossing_bytes=sum(int(nodes[n].meta[meta.OUT_BYTES]) for n in c.crossing)),
                       0.001, 0.0, 0.001 if c.crossing else 0.0, acc[e]) for e, c in cuts)
    build_artifact(gm, PlanTable((0.0, 1e6, 1e8), plans, 0.05), "local", "local", out, (x,), onnx=False,
                   progress=False, **kw)
    return Path(out), x.numpy()


@pytest.fixture(scope="session")
def exit_artifact(tmp_path_factory):
    """A built artifact (see build_exit_artifact), shared: copy it before writing beside it."""
    return build_exit_artifact(tmp_path_factory.mktemp("exit_artifact") / "art")


@pytest.fixture
def art(exit_artifact, tmp_path):
    """A private copy of the exit artifact, without calibrations (they are written beside it)."""
    path, x = exit_artifact
    dst = tmp_path / "art"
    shutil.copytree(path, dst, ignore=shutil.ignore_patterns("calibration-*"))
    return dst, x


@pytest.fixture
def make_server():
    servers = []

    def make(part=None, **kw):
        s = EdgeServer(part or NumpyPart("edge"), "127.0.0.1", 0, **kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.shutdown(drain_timeout=2.0)


def handshake(addr, part, token=None, sha=None, model=None) -> P.Channel:
    """A raw protocol connection, handshaken by hand (for hostile tests)."""
    sock = socket.create_connection(addr, timeout=5)
    ch = P.Channel(sock)
    chal = ch.recv()
    assert chal["type"] == "challenge"
    m, s = P.manifest_identity(part)
    m, s = model or m, sha or s
    digest = P.auth_digest(token, bytes(chal["nonce"]), m, s) if token else None
    ch.send(P.hello(m, s, digest))
    return ch


def x_for(part, seed):
    return np.random.default_rng(seed).standard_normal((1, part.dims[0]), dtype=np.float32)


class Bystander:
    """A well-behaved device that keeps asking the server while others misbehave."""

    def __init__(self, addr):
        from edgecut.runtime.client import DeviceRuntime

        self.part = NumpyPart("device")
        self.rt = DeviceRuntime(self.part, edge=addr, probe_interval=None, initial_bandwidth=1e9)
        self.results, self.bad = 0, []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        i = 0
        while not self._stop.is_set():
            x = x_for(self.part, i)
            r = self.rt.infer(x)
            if r.where != "edge" or not np.allclose(r.logits, self.part.reference(x), atol=1e-5):
                self.bad.append((r.where, r.reason))
            self.results += 1
            i += 1
            self._stop.wait(0.005)

    def stop(self):
        self._stop.set()
        self.thread.join(10)
        self.rt.close()


@pytest.fixture
def bystander():
    made = []

    def make(addr):
        b = Bystander(addr)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no dashboard) for the whole test session; the numpy part
    travels to the replicas by value (the workers cannot import this directory)."""
    pytest.importorskip("ray.serve", reason="the edge tier tests need ray[serve]: pip install 'edgecut[tier]'")
    import numpy_part
    import ray
    from ray import serve

    from edgecut.runtime.tier import start_ray

    start_ray(num_cpus=2)
    ray.cloudpickle.register_pickle_by_value(numpy_part)
    yield ray
    serve.shutdown()
    ray.shutdown()
