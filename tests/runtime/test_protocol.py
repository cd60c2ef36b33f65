"""The frame codec and the Channel, over real socket pairs and hostile bytes."""
from __future__ import annotations

import socket
import threading

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecut.errors import ProtocolError
from edgecut.runtime import protocol as P


def body(msg) -> bytes:
    frame = b"".join(bytes(b) for b in P.encode(msg))
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    return frame[4:]


@pytest.mark.parametrize("dtype", sorted(P.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 5), (1, 3000)])
def test_tensors_roundtrip_and_standard_msgpack(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    msg = P.infer(3, "e1/input", {"a": a, "b": np.ones(4, np.float32)}, 0.25)
    raw = body(msg)
    std = msgpack.unpackb(raw, raw=False)          # any msgpack reader can read our frames
    assert std["tensors"][0]["dtype"] == dtype and std["tensors"][0]["shape"] == list(shape)
    assert std["tensors"][0]["data"] == a.tobytes()
    buf = np.frombuffer(bytearray(raw), np.uint8)
    out = P.decode_tensors(P.decode(buf)["tensors"])
    assert out["a"].dtype == a.dtype and out["a"].shape == a.shape and np.array_equal(out["a"], a)
    if a.nbytes:
        assert np.shares_memory(out["a"], buf)        # a view of the receive buffer, no copy
        assert out["a"].ctypes.data % P.ALIGN == 0    # and aligned


def test_noncontiguous_and_bigendian_arrays_are_sent_as_little_endian_c_order():
    a = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    out = P.decode_tensors(P.decode(body(P.infer(1, "p", {"a": a}, None)))["tensors"])
    assert out["a"].dtype == np.dtype("<f4") and np.array_equal(out["a"], a)


def test_object_dtype_is_refused():
    with pytest.raises(ProtocolError, match="dtype"):
        P.encode(P.infer(1, "p", {"a": np.array([object()])}, None))


scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary()
objects = st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(), c, max_size=5),
                       max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(objects)
def test_decode_agrees_with_msgpack(obj):
    assert P.decode(msgpack.packb(obj, use_bin_type=True)) == obj


@pytest.mark.parametrize("decoder", [P.decode, P.decode_small], ids=["decode", "decode_small"])
@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64))
def test_hostile_bytes_raise_only_protocol_error(decoder, data):
    try:
        decoder(data)
    except ProtocolError:
        pass


def test_hostile_structures():
    for bad in (b"\xdd\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff\x00", b"\x91" * 40 + b"\xc0",
                b"\xd9\x02\xff\xfe", b"\xc1", b"\x81\x91\xc0\xc0", b"\xc0\xc0"):
        with pytest.raises(ProtocolError):
            P.decode(bad)
    entries = [{"name": "a", "dtype": "float32", "shape": [2, 2], "data": memoryview(b"\0" * 12)},
               {"name": "a", "dtype": "object", "shape": [1], "data": memoryview(b"\0" * 8)},
               {"name": "a", "dtype": "float32", "shape": [-1], "data": memoryview(b"")},
               {"name": "a", "dtype": "float32", "shape": [1], "data": "\0" * 4},      # a str, not a bin
               {"name": "a", "dtype": "float32", "shape": [2], "data": b"\0" * 4}]
    for e in entries:
        with pytest.raises(ProtocolError):
            P.decode_tensors([e])


def test_channel_big_frame_partial_sends_and_limits():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    big = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)   # 4 MiB
    sender = threading.Thread(target=lambda: P.Channel(a).send(P.infer(9, "p", {"t": big}, None)))
    sender.start()
    msg = P.Channel(b, max_frame=8 * 2**20).recv()
    sender.join()
    assert msg["id"] == 9 and np.array_equal(P.decode_tensors(msg["tensors"])["t"], big)

    a.sendall(P.encode(P.infer(10, "p", {"t": big}, None))[0])      # the header alone says 4 MiB
    with pytest.raises(P.FrameTooLarge):
        P.Channel(b, max_frame=2**20).recv()
    a.close(), b.close()


def test_channel_truncated_and_closed_and_timeout():
    a, b = socket.socketpair()
    a.sendall(b"\x00\x00\x01\x00" + b"\x80" * 10)
    a.close()
    with pytest.raises(ProtocolError, match="truncated"):
        P.Channel(b).recv()
    a, b = socket.socketpair()
    a.close()
    with pytest.raises(P.ConnectionClosed):
        P.Channel(b).recv()
    a, b = socket.socketpair()
    a.sendall(b"\x00\x00\x01\x00" + b"\x80" * 10)
    with pytest.raises(TimeoutError):
        P.Channel(b).recv(frame_timeout=0.1)


def test_auth_digest():
    d = P.auth_digest(b"k", b"n" * 32, "m", "s")
    assert P.check_auth(b"k", b"n" * 32, "m", "s", d)
    assert not P.check_auth(b"other", b"n" * 32, "m", "s", d)
    assert not P.check_auth(b"k", b"x" * 32, "m", "s", d)
    assert not P.check_auth(b"k", b"n" * 32, "m", "s", None)


@settings(max_examples=300, deadline=None)
@given(objects)
def test_small_frames_decode_like_big_ones(obj):
    packed = msgpack.packb({"type": "x", "v": obj}, use_bin_type=True)
    if len(packed) <= P._SMALL_FRAME:
        fast = P.decode_small(packed)
        assert fast == {k: (bytes(v) if isinstance(v, memoryview) else v) for k, v in P.decode(packed).items()}


def test_early_decode_of_a_partial_frame_is_the_whole_decode():
    """decode_early sees the structure of a frame before its data has arrived, or says None."""
    a, b = np.arange(50_000, dtype=np.float32), np.arange(7, dtype=np.int64)
    raw = body(P.infer(5, "e1/x", {"a": a, "b": b}, 0.5))
    full = P.decode(raw)
    seen = None
    for got in (1, 10, 60, 100, 200, 400, 1000, 100_000, len(raw) - 1):
        buf = np.zeros(len(raw), np.uint8)
        buf[:got] = np.frombuffer(raw[:got], np.uint8)          # the rest has not arrived yet
        early = P.decode_early(memoryview(buf), got)
        if early is None:
            assert seen is None                                 # once seen, it stays seen
            continue
        seen = got
        buf[got:] = np.frombuffer(raw[got:], np.uint8)          # ... and now it has
        out = P.decode_tensors(early["tensors"])
        assert early["id"] == 5 and np.array_equal(out["a"], a) and np.array_equal(out["b"], b)
    # b's tensor map follows a's 200 kB of data: only a prefix holding all of it decodes early
    assert seen == len(raw) - 1 and full["id"] == 5


def test_channel_reads_a_frame_that_arrives_in_slow_pieces():
    """The receiver spins, then sleeps, between pieces; the early decode meets the late bytes."""
    a, b = socket.socketpair()
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32)
    frame = b"".join(bytes(memoryview(p).cast("B")) for p in P.encode(P.infer(8, "p", {"x": x}, None)))

    def trickle():
        for i in range(0, len(frame), 65536):
            a.sendall(frame[i:i + 65536])
            threading.Event().wait(0.01)

    t = threading.Thread(target=trickle)
    t.start()
    msg = P.Channel(b, reuse_buffer=True).recv(frame_timeout=5)
    t.join()
    assert msg["id"] == 8 and np.array_equal(P.decode_tensors(msg["tensors"])["x"], x)
    a.close(), b.close()
