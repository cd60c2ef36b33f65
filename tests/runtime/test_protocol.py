"""The frame codec and the Channel, over real socket pairs and hostile bytes."""
from __future__ import annotations

import socket
import threading
import time

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

    a.sendall(P.encode(P.infer(10, "p", {"t": big}, None))[0])      # up to the data: its header says 4 MiB
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


def _generic_body(msg) -> bytes:
    enc = P._Encoder()
    enc.message(msg)
    frame = b"".join(bytes(memoryview(b).cast("B")) for b in enc.finish())
    return frame[4:]


def _same(a: dict, b: dict) -> None:
    key = "tensors" if "tensors" in a else "outputs"
    assert {k: v for k, v in a.items() if k != key} == {k: v for k, v in b.items() if k != key}
    ta, tb = P.decode_tensors(a[key]), P.decode_tensors(b[key])
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape
        assert np.array_equal(ta[name], tb[name])


def test_templated_frames_read_as_the_generic_encoders_and_keep_no_stale_bytes():
    """infer and result frames come from per-kind templates (fixed-width id and numbers): any
    msgpack reader reads them as the generic encoder's frame, tensors aligned; a second frame of
    the same kind reuses the template and carries its own values, small data included."""
    rng = np.random.default_rng(3)

    def msgs(i):
        return [P.infer(i, "e1/input", {"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}, None),
                P.infer(i + 1, "e2/after:l1", {"a": np.arange(5 + 0 * i, dtype=np.int64), "big": rng.standard_normal(
                    (3, 3000)).astype(np.float32), "flag": np.array(i % 2 == 0), "e": np.zeros((2, 0), np.float16),
                    "u": rng.integers(0, 255, 100, dtype=np.uint8)}, 0.125 * i),
                P.result(2**64 - 1 - i, {"logits": rng.standard_normal((1, 10)).astype(np.float32)}, 0.5 * i, 1e-3),
                P.result(i, {}, 1.0, 2.0)]

    for i in (1, 2):
        before = len(P._templates)
        for msg in msgs(i):
            assert P._templated(msg) is not None
            raw = body(msg)
            buf = np.frombuffer(bytearray(raw), np.uint8)
            got = P.decode(buf)
            _same(got, P.decode(_generic_body(msg)))
            _same(msgpack.unpackb(raw, raw=False), P.decode(_generic_body(msg)))
            for t in P.decode_tensors(got.get("tensors", got.get("outputs"))).values():
                assert t.nbytes == 0 or t.ctypes.data % P.ALIGN == 0
        if i == 2:
            assert len(P._templates) == before          # the same kinds: no new template


@pytest.mark.parametrize("msg", [
    {**P.infer(1, "p", {"a": np.ones(3, np.float32)}, None), "extra": 1},            # a key more
    P.infer(1, "p", {"a": np.ones(3, np.float32)}, 2),                               # int deadline
    P.infer(-1, "p", {"a": np.ones(3, np.float32)}, None),                           # negative id
    P.infer(True, "p", {"a": np.ones(3, np.float32)}, None),                         # bool id
    P.infer(1, "p", {"a": [1.0, 2.0]}, None),                                        # not an array
    P.infer(1, "p", {"a": np.arange(6, dtype=">f4")}, None),                         # big-endian
    P.infer(1, "p", {"a": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]}, None),  # strided
    {"type": "result", "id": 1, "outputs": P.TensorDict(a=np.ones(2, np.float32)), "edge_s": np.float64(0.5),
     "queue_s": 0.0},                                                                # edge_s not a float
    {"type": "result", "id": 1, "outputs": [], "edge_s": 0.0, "queue_s": 0.0},       # a list, not TensorDict
], ids=["extra-key", "int-deadline", "negative-id", "bool-id", "list", "big-endian", "strided", "np-float", "list-outputs"])
def test_messages_a_template_does_not_do_exactly_go_to_the_generic_encoder(msg):
    assert P._templated(msg) is None
    got, want = P.decode(body(msg)), msgpack.unpackb(_generic_body(msg), raw=False)
    assert {k: v for k, v in got.items() if k not in ("tensors", "outputs")} == \
           {k: v for k, v in want.items() if k not in ("tensors", "outputs")}


def test_prepare_runs_while_a_big_frame_arrives_and_after_a_small_one():
    a, b = socket.socketpair()
    x = np.random.default_rng(2).standard_normal(100_000).astype(np.float32)
    frame = b"".join(bytes(memoryview(p).cast("B")) for p in P.encode(P.infer(8, "p", {"x": x}, None)))
    sent_all = threading.Event()
    calls = []

    def prepare(msg):
        calls.append(sent_all.is_set())
        return ("checked", msg["id"], P.decode_tensors(msg["tensors"])["x"].shape)

    def trickle():
        for i in range(0, len(frame), 65536):
            a.sendall(frame[i:i + 65536])
            threading.Event().wait(0.01)
        sent_all.set()

    t = threading.Thread(target=trickle)
    t.start()
    msg, prepared = P.Channel(b).recv_prepared(prepare, frame_timeout=5)
    t.join()
    assert prepared == ("checked", 8, (100_000,)) and calls == [False]    # once, before the data was all in
    assert np.array_equal(P.decode_tensors(msg["tensors"])["x"], x)

    ch = P.Channel(a)
    ch.send({"type": "ping", "id": 3})
    assert P.Channel(b).recv_prepared(lambda m: m["id"] * 2) == ({"type": "ping", "id": 3}, 6)
    ch.send({"type": "ping", "id": 4})
    with pytest.raises(ZeroDivisionError):
        P.Channel(b).recv_prepared(lambda m: 1 / 0)
    a.close(), b.close()


def test_spinning_for_a_frame_still_blocks_times_out_and_sees_a_close():
    a, b = socket.socketpair()
    later = threading.Timer(0.05, lambda: P.Channel(a).send({"type": "ping", "id": 1}))
    later.start()
    assert P.Channel(b).recv(spin_s=0.005)["id"] == 1       # spun 5 ms, then slept until it came
    later.join()
    with pytest.raises(TimeoutError):
        P.Channel(b).recv(deadline=time.monotonic() + 0.02, spin_s=1.0)
    a.close()
    with pytest.raises(P.ConnectionClosed):
        P.Channel(b).recv(spin_s=1.0)
    b.close()
