"""Hostile sessions for fuzzing a live edge server (tests/runtime/test_fuzz.py, bench/serve.py).

A session is (handshake first?, frames): raw frames as bytes, each a 4-byte big-endian length and
a body. Bodies are drawn by hypothesis from: random bytes; lengths that lie (longer or shorter
than the body, or huge); msgpack of random structure; and near-valid messages (infer, ping,
probe, hello) whose fields, plan ids and tensor entries (dtype, shape, data length) are wrong in
the ways a buggy or malicious device would get them wrong.
"""
from __future__ import annotations

import socket
import struct
import time

import msgpack
from hypothesis import strategies as st

from edgecut.runtime import protocol as P

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=20),
                     st.binary(max_size=64))
_values = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                       max_leaves=12)
_dtypes = st.one_of(st.sampled_from(sorted(P.DTYPES)), st.text(max_size=8), st.integers(-2**63, 2**64 - 1))
_shapes = st.one_of(st.lists(st.integers(-2, 300), max_size=5), st.lists(st.integers(0, 2**41), max_size=3), _values)
_tensor = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["x", "l1", "l2"]), _scalars),
                                 "dtype": _dtypes, "shape": _shapes,
                                 "data": st.one_of(st.binary(max_size=1100), _scalars)})


@st.composite
def _message(draw) -> dict:
    kind = draw(st.sampled_from(["infer", "infer", "infer", "ping", "probe", "hello", "welcome", "x"]))
    msg = {"type": kind, "id": draw(st.one_of(st.integers(-5, 2**64 - 1), _scalars))}
    if kind == "infer":
        msg["plan"] = draw(st.one_of(st.sampled_from(["e1/input", "e1/after:l1", "e1/after:l2", "e1/device"]),
                                     _scalars))
        msg["deadline_s"] = draw(st.one_of(st.none(), st.floats(-1, 2), st.sampled_from([0, 1e-9, 1e300]), _scalars))
        msg["tensors"] = draw(st.one_of(st.lists(_tensor, max_size=3), _values))
    elif kind == "probe":
        msg["data"] = draw(st.one_of(st.binary(max_size=2000), _scalars))
    extra = draw(st.dictionaries(st.text(max_size=6), _values, max_size=2))
    return {**extra, **msg}


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@st.composite
def frame(draw) -> bytes:
    how = draw(st.sampled_from(["message"] * 5 + ["value", "bytes", "lying"]))
    if how == "message":
        body = _pack(draw(_message()))
    elif how == "value":
        body = _pack(draw(_values))
    else:
        body = draw(st.binary(max_size=300))
    n = len(body)
    if how == "lying":
        n = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, n + 1, max(0, n - 1), 2**31])))
    return struct.pack(">I", n) + body


sessions = st.tuples(st.booleans(), st.lists(frame(), min_size=1, max_size=8))


def run_session(addr, part, session, read_s: float = 0.05, token: bytes | None = None) -> int:
    """Send one session to the server at `addr`; read whatever comes back briefly; close. The
    number of frames sent. `part`: whose model name and manifest hash a handshake uses."""
    shake, frames = session
    sock = socket.create_connection(addr, timeout=2)
    try:
        if shake:
            ch = P.Channel(sock)
            nonce = bytes(ch.recv(time.monotonic() + 2)["nonce"])
            model, sha = P.manifest_identity(part)
            ch.send(P.hello(model, sha, P.auth_digest(token, nonce, model, sha) if token else None))
        sock.sendall(b"".join(frames))
        sock.settimeout(read_s)
        try:
            while sock.recv(65536):
                pass
        except OSError:         # timeout or reset: the server decides when to hang up
            pass
    except OSError:
        pass
    finally:
        sock.close()
    return len(frames)
