"""Fixtures for the runtime tests: real servers on 127.0.0.1 (port 0), real sockets."""
from __future__ import annotations

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
