"""Hostile frames (hypothesis, tests/runtime/hostile.py) against a live server: no crash, no fd
or thread left behind, and a well-behaved device beside them keeps getting right answers."""
from __future__ import annotations

import os
import threading
import time

from hostile import run_session, sessions
from hypothesis import HealthCheck, given, settings
from numpy_part import NumpyPart
from test_faults import check_bystander


def _counts():
    return len(os.listdir("/proc/self/fd")), threading.active_count()


def _settle(baseline, timeout=10.0):
    end = time.monotonic() + timeout
    while _counts() > baseline and time.monotonic() < end:
        time.sleep(0.05)
    return _counts()


def fuzz(server, n_examples: int, token: bytes | None = None) -> int:
    """Run `n_examples` hypothesis sessions against `server`; the frames sent."""
    part, sent = NumpyPart("edge"), [0]

    @settings(max_examples=n_examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(sessions)
    def one(session):
        sent[0] += run_session(server.address, part, session, read_s=0.01, token=token)

    one()
    return sent[0]


def test_hostile_frames_against_a_live_server(make_server, bystander):
    server = make_server(max_frame=2**20, frame_timeout=0.5, handshake_timeout=1.0)
    b = bystander(server.address)
    time.sleep(0.2)
    baseline = _counts()
    sent = fuzz(server, 150)
    assert sent >= 150
    check_bystander(b, server)
    assert _settle(baseline) <= baseline, "file descriptors or threads left behind"
    assert server.stats["connections"] >= 150
