"""Each bad input the issue lists, over real sockets: an error reply or a clean close, and the
server keeps serving a well-behaved device (the bystander) all along."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from conftest import handshake, x_for
from numpy_part import NumpyPart

from edgecut.errors import UsageError
from edgecut.runtime import protocol as P
from edgecut.runtime.client import DeviceRuntime
from edgecut.runtime.server import EdgeServer

pytestmark = pytest.mark.timeout(120)


def welcome(ch):
    msg = ch.recv(deadline=time.monotonic() + 5)
    assert msg["type"] == "welcome", msg
    return ch


def error_then_close(ch, code):
    msg = ch.recv(deadline=time.monotonic() + 5)
    assert msg["type"] == "error" and msg["error"]["code"] == code, msg
    assert msg["error"]["message"]
    with pytest.raises((P.ConnectionClosed, ConnectionResetError)):
        ch.recv(deadline=time.monotonic() + 5)


def good_request(ch, part, rid=1):
    x = x_for(part, rid)
    ch.send(P.infer(rid, "e1/input", {"x": x}, 5.0))
    msg = ch.recv(deadline=time.monotonic() + 5)
    assert msg["type"] == "result" and msg["id"] == rid, msg
    assert np.allclose(P.decode_tensors(msg["outputs"])["logits"], part.reference(x), atol=1e-5)


def check_bystander(b, server):
    n = b.results
    deadline = time.monotonic() + 5
    while b.results < n + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.results >= n + 3 and not b.bad, b.bad
    assert server._listener is not None and server._accept_thread.is_alive()


@pytest.fixture
def setup(make_server, bystander):
    server = make_server(max_frame=2**20, frame_timeout=0.5)
    return server, bystander(server.address), NumpyPart("device")


def test_garbage_bytes(setup):
    server, b, part = setup
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",
                    b"\x00\x00\x00\x03\x93\x01\x02"):   # a bad type byte; a list instead of a map
        ch = handshake(server.address, part)
        welcome(ch)
        ch.sock.sendall(garbage)
        error_then_close(ch, P.TOO_LARGE if garbage.startswith(b"GET") else P.BAD_FRAME)
    # garbage instead of a hello
    sock = socket.create_connection(server.address, timeout=5)
    sock.sendall(bytes(range(255, -1, -1)) * 4)
    ch = P.Channel(sock)
    assert ch.recv()["type"] == "challenge"
    error_then_close(ch, P.TOO_LARGE)
    check_bystander(b, server)


def test_truncated_frame(setup):
    server, b, part = setup
    ch = welcome(handshake(server.address, part))
    ch.sock.sendall(b"\x00\x00\x10\x00" + b"\x80" * 100)       # 4096 announced, 100 sent, then silence
    t = time.monotonic()
    with pytest.raises((P.ConnectionClosed, ConnectionResetError)):
        ch.recv(deadline=time.monotonic() + 5)
    assert time.monotonic() - t < 4                             # closed by the server's frame timeout
    ch = welcome(handshake(server.address, part))
    ch.sock.sendall(b"\x00\x00\x10\x00" + b"\x80" * 100)
    ch.sock.close()                                             # truncated by the device closing
    check_bystander(b, server)


def test_oversize_frame(setup):
    server, b, part = setup
    ch = welcome(handshake(server.address, part))
    big = np.zeros(2**19, np.float32)                           # 2 MiB > the 1 MiB maximum
    ch.sock.sendall(b"".join(bytes(x) for x in P.encode(P.infer(1, "e1/input", {"x": big}, None)))[:65536])
    error_then_close(ch, P.TOO_LARGE)
    check_bystander(b, server)


def test_wrong_dtype_or_shape_keeps_the_connection(setup):
    server, b, part = setup
    ch = welcome(handshake(server.address, part))
    bad = [{"x": np.zeros((1, 256), np.float64)}, {"x": np.zeros((1, 100), np.float32)},
           {"y": np.zeros((1, 256), np.float32)}]
    for i, tensors in enumerate(bad):
        ch.send(P.infer(i, "e1/input", tensors, None))
        msg = ch.recv(deadline=time.monotonic() + 5)
        assert msg["type"] == "error" and msg["id"] == i and msg["error"]["code"] == P.BAD_TENSOR, msg
    # data that does not match its own shape: caught by the protocol, same reply
    frame = P.infer(7, "e1/input", {"x": np.zeros((1, 256), np.float32)}, None)
    raw = bytearray(b"".join(bytes(x) for x in P.encode(frame)))
    i = raw.index(b"\x92\x01\xcd\x01\x00")                      # shape [1, 256] -> [1, 255]
    raw[i + 3:i + 5] = (255).to_bytes(2, "big")
    ch.sock.sendall(raw)
    msg = ch.recv(deadline=time.monotonic() + 5)
    assert msg["error"]["code"] == P.BAD_TENSOR and "needs 1020 bytes" in msg["error"]["message"]
    good_request(ch, part, 8)                                   # the same connection still works
    check_bystander(b, server)


def test_unknown_plan_id(setup):
    server, b, part = setup
    ch = welcome(handshake(server.address, part))
    ch.send(P.infer(1, "e9/nowhere", {"x": x_for(part, 0)}, None))
    msg = ch.recv(deadline=time.monotonic() + 5)
    assert msg["error"]["code"] == P.UNKNOWN_PLAN and "e1/input" in msg["error"]["message"]
    ch.send(P.infer(2, "e1/device", {"x": x_for(part, 0)}, None))
    assert ch.recv(deadline=time.monotonic() + 5)["error"]["code"] == P.UNKNOWN_PLAN
    ch.send({"type": "dance", "id": 3})
    assert ch.recv(deadline=time.monotonic() + 5)["error"]["code"] == P.BAD_REQUEST
    good_request(ch, part, 4)
    check_bystander(b, server)


def test_wrong_manifest_hash_and_model(setup):
    server, b, part = setup
    error_then_close(handshake(server.address, part, sha="0" * 64), P.MANIFEST)
    error_then_close(handshake(server.address, part, model="resnet"), P.MODEL)
    # a device with another build answers locally and says why
    other = NumpyPart("device", seed=1)
    with DeviceRuntime(other, edge=server.address, probe_interval=None, initial_bandwidth=1e9) as rt:
        x = x_for(other, 0)
        r = rt.infer(x)
        assert r.where == "fallback" and "manifest" in r.reason
        assert np.allclose(r.logits, other.reference(x), atol=1e-5)
    check_bystander(b, server)


def test_tokens(make_server):
    part = NumpyPart("device")
    server = make_server(token=b"s3cret")
    error_then_close(handshake(server.address, part, token=b"wrong"), P.AUTH)
    error_then_close(handshake(server.address, part), P.AUTH)        # no token at all
    welcome(handshake(server.address, part, token=b"s3cret"))
    for token, where in ((None, "fallback"), (b"wrong", "fallback"), (b"s3cret", "edge")):
        with DeviceRuntime(part, edge=server.address, token=token, probe_interval=None, initial_bandwidth=1e9) as rt:
            r = rt.infer(x_for(part, 0))
            assert r.where == where, r.reason
            if where == "fallback":
                assert "token" in r.reason


def test_non_loopback_bind_needs_a_token():
    with pytest.raises(UsageError, match="--token-file"):
        EdgeServer(NumpyPart("edge"), "0.0.0.0", 0)
    EdgeServer(NumpyPart("edge"), "0.0.0.0", 0, insecure=True)           # allowed, not started
    EdgeServer(NumpyPart("edge"), "0.0.0.0", 0, token=b"t")
    EdgeServer(NumpyPart("edge"), "localhost", 0)


def test_busy_queue_and_request_timeout(make_server):
    part = NumpyPart("device")
    server = make_server(NumpyPart("edge", edge_delay=0.4), workers=1, max_queue=0, request_timeout=0.2)
    a, c = welcome(handshake(server.address, part)), welcome(handshake(server.address, part))
    a.send(P.infer(1, "e1/input", {"x": x_for(part, 1)}, None))
    time.sleep(0.05)
    c.send(P.infer(2, "e1/input", {"x": x_for(part, 2)}, None))
    assert c.recv(deadline=time.monotonic() + 5)["error"]["code"] == P.BUSY
    assert a.recv(deadline=time.monotonic() + 5)["error"]["code"] == P.TIMEOUT
