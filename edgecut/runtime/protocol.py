"""The wire protocol between a device and an edge server: the one place that knows the bytes.

A frame is a 4-byte big-endian length followed by exactly one msgpack map. No pickle anywhere.

Conversation (every message is a map with a "type"):

    server -> device  {type: "challenge", version, nonce: bin(32), auth: bool}
    device -> server  {type: "hello", version, model, manifest_sha256, auth: bin | nil}
    server -> device  {type: "welcome", version, model, manifest_sha256[, edge_s: {plan id: seconds}]}   or an error, then close
    device -> server  {type: "infer", id, plan, deadline_s: float | nil, tensors: [tensor, ...][, codec]}
    server -> device  {type: "result", id, outputs: [tensor, ...], edge_s, queue_s}
                      or {type: "error", id, error: {code, message}}
    device -> server  {type: "ping", id} -> {type: "pong", id}
    device -> server  {type: "probe", id, data: bin} -> {type: "probe_ack", id, n}

A tensor is {name, dtype, shape, pad: bin, data: bin}: `dtype` is a numpy name from `DTYPES`,
the data little-endian and C-ordered; `pad` (0-15 bytes, ignored) makes `data` start 16-byte
aligned within the frame, so the receiver's arrays are aligned views of its receive buffer.
`auth` is HMAC-SHA256(token, nonce | model | manifest_sha256) when the server has a token.
`deadline_s` is the time the device still allows (relative: the two clocks are not shared).
`codec` (absent: fp32) names how the plan's crossing tensors travel (`edgecut.codecs`); it must be
the plan's. With a lossless stage ("int8+zstd") each tensor's `data` is the compressed stream of
the array its dtype and shape describe; one that does not decompress to exactly that size is a
`bad_tensor` error reply, and the connection stays up.

Copies: the sender hands the kernel the frame header, the small msgpack pieces and memoryviews of
the arrays in one `sendmsg` (no join); the receiver `recv_into`s an uninitialised buffer of the
frame's size and decodes it with a small msgpack reader that returns bin values as memoryviews,
so `np.frombuffer` gives arrays without copying (msgpack-python's unpackb would copy every bin).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import sys
import threading
import time

import msgpack
import numpy as np

from edgecut import codecs
from edgecut.errors import ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 64 * 2**20
ALIGN = 16
MAX_DEPTH = 16
DTYPES = frozenset({"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                    "float16", "float32", "float64"})

# error codes of {error: {code, message}}
BAD_FRAME, TOO_LARGE, VERSION, MODEL, MANIFEST, AUTH = "bad_frame", "too_large", "version", "model", "manifest", "auth"
UNKNOWN_PLAN, BAD_TENSOR, BAD_REQUEST = "unknown_plan", "bad_tensor", "bad_request"
TIMEOUT, BUSY, SHUTTING_DOWN, INTERNAL = "timeout", "busy", "shutting_down", "internal"

_HEADER = struct.Struct(">I")
_IOV_MAX = 512   # buffers per sendmsg call (Linux allows 1024)
SPIN_S = 50e-6   # inside a frame, poll without sleeping while bytes arrive at least this often
_SMALL_FRAME = 4096   # frames up to this size are decoded by msgpack's C unpacker
_BIG = 4096  # bin values at least this long go to the kernel as their own buffer, never copied


class ConnectionClosed(ConnectionError):
    """The peer closed the connection cleanly, between two frames."""


class FrameTooLarge(ProtocolError):
    """A frame's declared length exceeds the receiver's maximum."""


class TensorDict(dict):
    """name -> np.ndarray (or Packed); encoded as a list of tensor maps (see the module docstring)."""


class Packed:
    """A tensor whose `data` went through a codec's lossless stage: `dtype` and `shape` of the
    array it decompresses to, `nbytes` sent."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape, data):
        self.dtype, self.shape, self.data = dtype, tuple(shape), data

    @property
    def nbytes(self) -> int:
        return self.data.nbytes if isinstance(self.data, memoryview) else len(self.data)


def pack_tensors(tensors: dict, codec: str) -> dict:
    """`tensors` as the plan's codec sends them: through its lossless stage, if it has one."""
    if not codecs.parse(codec).lossless:
        return tensors
    return {n: Packed(str(a.dtype), a.shape, codecs.pack(codec, a)) for n, a in tensors.items()}


def unpack_tensors(tensors: dict, codec: str) -> dict:
    """The arrays of `tensors` (Packed where the codec has a lossless stage). ProtocolError
    when a stream does not decode to its header's size."""
    return {n: codecs.unpack(codec, t.data, t.dtype, t.shape, n) if isinstance(t, Packed) else t
            for n, t in tensors.items()}


# --------------------------------------------------------------------------------------- encode
_LITTLE = sys.byteorder == "little"
_NAMES = {np.dtype(n).newbyteorder(o): n for n in DTYPES for o in "<>"}
_LE_DTYPES = {n: np.dtype(n).newbyteorder("<") for n in DTYPES}
_PAD_KEY, _DATA_KEY = b"\xa3pad", b"\xa4data"


class _Encoder:
    """Builds one frame as a list of buffers: msgpack made by msgpack-python's C packer, except
    that tensor data and bins of at least _BIG bytes go in as the caller's own memory."""

    def __init__(self):
        self.bufs: list = []
        self.small = bytearray()
        self.size = 0                      # bytes of the msgpack body so far
        self.pack = _packer()

    def raw(self, b) -> None:
        self.small += b
        self.size += len(b)

    def big(self, view: memoryview) -> None:
        if self.small:
            self.bufs.append(bytes(self.small))
            self.small = bytearray()
        self.bufs.append(view)
        self.size += view.nbytes

    def message(self, msg: dict) -> None:
        # the values the C packer cannot do as we want (tensors, big bins, containers, which may
        # hold either) go after the plain ones, in a map whose header counts all of them
        plain = {k: v for k, v in msg.items() if not isinstance(v, _SPECIAL)}
        packed = self.pack(plain)
        self.raw(_map_header(len(msg)) + packed[_header_len(len(plain)):])
        if len(plain) < len(msg):
            for k, v in msg.items():
                if isinstance(v, _SPECIAL):
                    self.raw(self.pack(k))
                    self.value(v, 1)

    def value(self, v, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise ProtocolError("message nested too deeply to encode")
        if isinstance(v, TensorDict):
            self.raw(_array_header(len(v)))
            for name, arr in v.items():
                self.tensor(str(name), arr)
        elif isinstance(v, dict):
            self.raw(_map_header(len(v)))
            for k, x in v.items():
                self.raw(self.pack(k))
                self.value(x, depth + 1)
        elif isinstance(v, (list, tuple)):
            self.raw(_array_header(len(v)))
            for x in v:
                self.value(x, depth + 1)
        elif isinstance(v, (bytes, bytearray, memoryview)) and len(v) >= _BIG:
            view = memoryview(v).cast("B")
            self.raw(b"\xc6" + _HEADER.pack(view.nbytes))
            self.big(view)
        else:
            self.raw(self.pack(v))

    def tensor(self, name: str, arr) -> None:
        if isinstance(arr, Packed):
            if arr.dtype not in DTYPES:
                raise ProtocolError(f"tensor {name!r} has dtype {arr.dtype}, which the protocol does not carry")
            self.raw(_tensor_head(self.pack, name, arr.dtype, arr.shape, arr.nbytes, self.size))
            view = memoryview(arr.data).cast("B")
            self.big(view) if view.nbytes >= _BIG else self.raw(view)
            return
        arr = np.asarray(arr)
        dt = arr.dtype
        dtype = _NAMES.get(dt) or dt.name          # dtype.name costs 3 us; the table 0.05
        if dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {dt}, which the protocol does not carry; "
                                f"use one of {sorted(DTYPES)}")
        if not _as_is(arr):
            arr = arr.astype(dt.newbyteorder("<"), order="C")        # only then a copy
        self.raw(_tensor_head(self.pack, name, dtype, arr.shape, arr.nbytes, self.size))
        view = memoryview(arr.reshape(-1).view(np.uint8))
        if arr.nbytes >= _BIG:
            self.big(view)
        else:
            self.raw(view)

    def finish(self) -> list:
        if self.small:
            self.bufs.append(bytes(self.small))
        if self.bufs and type(self.bufs[0]) is bytes:          # msgpack bytes first: one buffer with the header
            return [_HEADER.pack(self.size) + self.bufs[0], *self.bufs[1:]]
        return [_HEADER.pack(self.size), *self.bufs]


def _as_is(arr: np.ndarray) -> bool:
    """Whether the array's memory is already what the wire carries: C order, little-endian."""
    bo = arr.dtype.byteorder
    return arr.flags.c_contiguous and (bo in "<|" or (bo == "=" and _LITTLE))


def _tensor_head(pack, name: str, dtype: str, shape, nbytes: int, at: int) -> bytes:
    """A tensor map up to its data, for a map starting `at` bytes into the frame's body: {name,
    dtype, shape} by the C packer, its fixmap header 0x83 made 0x85 for pad and data, the pad
    sized so that the data starts ALIGN-aligned."""
    head = pack({"name": name, "dtype": dtype, "shape": [int(d) for d in shape]})
    # data starts after: "pad" key (4) + bin8 header (2) + pad + "data" key (5) + bin32 header (5)
    pad = -(at + len(head) + 4 + 2 + 5 + 5) % ALIGN
    return b"".join((b"\x85", head[1:], _PAD_KEY, b"\xc4", bytes((pad,)), bytes(pad), _DATA_KEY,
                     b"\xc6", _HEADER.pack(nbytes)))


_SPECIAL = (TensorDict, dict, list, tuple, bytes, bytearray, memoryview)
_local = threading.local()


def _packer():
    """This thread's msgpack packer (making one per frame cost more than packing a small frame)."""
    pack = getattr(_local, "pack", None)
    if pack is None:
        pack = _local.pack = msgpack.Packer(use_bin_type=True, default=_default).pack
    return pack


def _default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise ProtocolError(f"cannot encode a {type(obj).__name__} in a frame")


def _header_len(n: int) -> int:
    return 1 if n < 16 else (3 if n < 2**16 else 5)


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else (b"\xde" + struct.pack(">H", n) if n < 2**16 else b"\xdf" + struct.pack(">I", n))


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else (b"\xdc" + struct.pack(">H", n) if n < 2**16 else b"\xdd" + struct.pack(">I", n))


def encode(msg: dict) -> list:
    """The frame for `msg` as a list of buffers (header first) to hand to `sendmsg` as they are."""
    if not isinstance(msg, dict):
        raise ProtocolError("a frame holds one msgpack map")
    frame = _templated(msg)
    if frame is not None:
        return frame
    enc = _Encoder()
    enc.message(msg)
    return enc.finish()


# ------------------------------------------------------------------------------ frame templates
# The two messages of every request (infer, result) have the same bytes from one request to the
# next except for the id, the deadline or timings, and the tensors' data. For each kind of such
# message seen (its plan, whether it has a deadline, its tensors' names, dtypes and shapes), a
# template keeps those bytes, the id as uint64 and the numbers as float64 (msgpack allows any
# width), so a frame is a copy of the template with the numbers packed in: the per-request Python
# that the generic encoder runs, on caches the tensors just swept cold, was most of its cost.
_TEMPLATE_FIELDS = {      # kind -> ((key, how), ...) then the key of the tensor list, last
    "infer": ((("type", "kind"), ("id", "u64"), ("plan", "str"), ("deadline_s", "f64?")), "tensors"),
    "result": ((("type", "kind"), ("id", "u64"), ("edge_s", "f64"), ("queue_s", "f64")), "outputs"),
}
_TEMPLATE_KEYS = {kind: frozenset(k for k, _ in fields) | {tkey} for kind, (fields, tkey) in _TEMPLATE_FIELDS.items()}
_MAX_TEMPLATES = 256
_templates: dict = {}
_U64, _F64 = struct.Struct(">Q"), struct.Struct(">d")


class _Template:
    """A frame's bytes in `chunks`, split where a big tensor's data goes in as its own buffer.
    `numbers`: (message key, offset in chunk 0, Struct) of each number; `small`: (chunk, offset)
    of each small tensor's data, copied in; `big`: for each tensor, whether its data is a buffer."""

    __slots__ = ("chunks", "numbers", "small", "big", "copied")

    def __init__(self, fields, tkey: str, msg: dict, specs: list):
        pack = _packer()
        pieces, numbers, size = [_map_header(len(fields) + 1)], [], 1
        for key, how in fields:
            k = pack(key)
            if how in ("u64", "f64") or (how == "f64?" and msg[key] is not None):
                numbers.append((key, 4 + size + len(k) + 1, _U64 if how == "u64" else _F64))
                v = (b"\xcf" if how == "u64" else b"\xcb") + bytes(8)
            else:
                v = pack(msg[key] if how != "f64?" else None)
            pieces += [k, v]
            size += len(k) + len(v)
        tail = pack(tkey) + _array_header(len(specs))
        pieces.append(tail)
        size += len(tail)
        chunks, small, big, cur = [], [], [], b"".join(pieces)
        for name, dtype, shape, nbytes in specs:
            head = _tensor_head(pack, name, dtype, shape, nbytes, size)
            size += len(head) + nbytes
            cur += head
            big.append(nbytes >= _BIG)
            if big[-1]:
                chunks.append(cur)
                cur = b""
            else:
                small.append((len(chunks), len(cur) + (4 if not chunks else 0)))
                cur += bytes(nbytes)
        chunks.append(cur)
        chunks[0] = _HEADER.pack(size) + chunks[0]
        self.chunks = chunks
        self.numbers, self.small, self.big = numbers, small, big
        self.copied = {0} | {c for c, _ in small}       # chunks written per frame

    def frame(self, msg: dict, arrays: list) -> list:
        out = [bytearray(c) if i in self.copied else c for i, c in enumerate(self.chunks)]
        for key, at, st in self.numbers:
            st.pack_into(out[0], at, msg[key])
        bufs, small, chunk = [out[0]], iter(self.small), 0
        for arr, is_big in zip(arrays, self.big):
            view = memoryview(arr.reshape(-1).view(np.uint8))
            if is_big:
                chunk += 1
                bufs += [view, out[chunk]]
            else:
                c, at = next(small)
                out[c][at:at + view.nbytes] = view
        return [b for b in bufs if len(b)]


def _templated(msg: dict):
    """The frame for an infer or result message from a template (see above), or None when the
    message is not one that a template does exactly: then the generic encoder does it."""
    kind = msg.get("type")
    spec = _TEMPLATE_FIELDS.get(kind) if type(kind) is str else None
    if spec is None or msg.keys() != _TEMPLATE_KEYS[kind]:
        return None
    fields, tkey = spec
    tensors, rid = msg[tkey], msg["id"]
    if type(tensors) is not TensorDict or type(rid) is not int or not 0 <= rid < 2**64:
        return None
    key = [kind]
    for k, how in fields:
        v = msg[k]
        if how == "str":
            if type(v) is not str:
                return None
            key.append(v)
        elif how == "f64?":
            if v is not None and type(v) is not float:
                return None
            key.append(v is None)
        elif how == "f64" and type(v) is not float:
            return None
    arrays = []
    for name, arr in tensors.items():
        dt = getattr(arr, "dtype", None)
        if type(arr) is not np.ndarray or type(name) is not str or dt not in _NAMES or not _as_is(arr):
            return None
        key.append((name, dt.char, arr.shape))
        arrays.append(arr)
    key = tuple(key)
    tpl = _templates.get(key)
    if tpl is None:
        if len(_templates) >= _MAX_TEMPLATES:
            _templates.clear()
        tpl = _templates[key] = _Template(fields, tkey, msg,
                                          [(name, _NAMES[a.dtype], a.shape, a.nbytes) for name, a in tensors.items()])
    return tpl.frame(msg, arrays)


# --------------------------------------------------------------------------------------- decode
def _fmt(f: str):
    st = struct.Struct(f)
    return st.unpack_from, st.size


_FIXED = {0xca: _fmt(">f"), 0xcb: _fmt(">d"), 0xcc: _fmt(">B"), 0xcd: _fmt(">H"), 0xce: _fmt(">I"),
          0xcf: _fmt(">Q"), 0xd0: _fmt(">b"), 0xd1: _fmt(">h"), 0xd2: _fmt(">i"), 0xd3: _fmt(">q")}
_LEN = {0xc4: _fmt(">B"), 0xc5: _fmt(">H"), 0xc6: _fmt(">I"), 0xd9: _fmt(">B"), 0xda: _fmt(">H"),
        0xdb: _fmt(">I"), 0xdc: _fmt(">H"), 0xdd: _fmt(">I"), 0xde: _fmt(">H"), 0xdf: _fmt(">I")}
_BINS = frozenset((0xc4, 0xc5, 0xc6))


def decode(buf) -> object:
    """One msgpack object from `buf`; bin values come back as memoryviews into `buf` (no copy).
    Raises ProtocolError on anything malformed, truncated, too deep, or followed by extra bytes."""
    mv = memoryview(buf).cast("B")
    try:
        obj, pos = _decode(mv, 0, 0, None)
    except (struct.error, IndexError):
        raise ProtocolError("truncated msgpack data") from None
    if pos != len(mv):
        raise ProtocolError(f"{len(mv) - pos} stray bytes after the msgpack map")
    return obj


def decode_small(buf) -> object:
    """`decode` for a frame of at most _SMALL_FRAME bytes, by msgpack's C unpacker (4x faster
    than `decode`): bins come back as bytes. ProtocolError for anything malformed, truncated,
    holding an extension type, or followed by extra bytes; nesting is bounded by the unpacker's
    own stack and the frame's few bytes rather than MAX_DEPTH."""
    try:
        obj = msgpack.unpackb(buf, raw=False, ext_hook=_no_ext, max_bin_len=_SMALL_FRAME)
    except ProtocolError:
        raise
    except msgpack.ExtraData as e:
        raise ProtocolError(f"{len(e.extra)} stray bytes after the msgpack map") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:   # truncated, bad byte, bad key, ...
        raise ProtocolError(f"malformed msgpack data ({e})") from None
    return obj


def _no_ext(code, data):
    raise ProtocolError(f"unsupported msgpack extension type {code}")


def decode_early(body: memoryview, got: int):
    """The object of a frame whose first `got` bytes have arrived, if they already hold all of its
    msgpack structure (bins may end in the part still to come: their views fill in as it does);
    None otherwise. Nothing is raised: the frame is decoded again, strictly, once complete."""
    try:
        obj, pos = _decode(body[:got], 0, 0, body)
    except (ProtocolError, struct.error, IndexError):
        return None
    return obj if pos == len(body) else None


def _decode(mv: memoryview, pos: int, depth: int, full):
    b = mv[pos]
    pos += 1
    if b <= 0x7f:
        return b, pos
    if 0xa0 <= b <= 0xbf:                                    # fixstr, the commonest after ints
        end = pos + (b & 0x1f)
        if end > len(mv):
            raise ProtocolError("msgpack string/bin runs past the end of the frame")
        return _utf8(mv[pos:end]), end
    if b >= 0xe0:
        return b - 0x100, pos
    if b <= 0x9f or 0xdc <= b <= 0xdf:                     # containers
        if b <= 0x9f:
            n = b & 0x0f
        else:
            unpack, size = _LEN[b]
            n = unpack(mv, pos)[0]
            pos += size
        is_map = b <= 0x8f or b >= 0xde
        if depth >= MAX_DEPTH:
            raise ProtocolError("msgpack data nested too deeply")
        if n * (2 if is_map else 1) > len(mv) - pos:
            raise ProtocolError(f"msgpack container declares {n} items but the frame is too short")
        depth += 1
        if not is_map:
            out = []
            for _ in range(n):
                x, pos = _decode(mv, pos, depth, full)
                out.append(x)
            return out, pos
        d = {}
        for _ in range(n):
            k = mv[pos]
            if 0xa0 <= k <= 0xbf and pos + 1 + (k & 0x1f) <= len(mv):     # fixstr key
                end = pos + 1 + (k & 0x1f)
                k, pos = _utf8(mv[pos + 1:end]), end
            else:
                k, pos = _decode(mv, pos, depth, full)
                if isinstance(k, memoryview):
                    k = k.tobytes()
                elif isinstance(k, (list, dict)):
                    raise ProtocolError("msgpack map key is not a scalar")
            d[k], pos = _decode(mv, pos, depth, full)
        return d, pos
    if b in _FIXED:
        unpack, size = _FIXED[b]
        return unpack(mv, pos)[0], pos + size
    if b in _LEN:                                            # str8/16/32, bin8/16/32
        unpack, size = _LEN[b]
        n = unpack(mv, pos)[0]
        pos += size
        if pos + n > len(mv):
            if full is not None and b in _BINS and pos + n <= len(full):   # see decode_early
                return full[pos:pos + n], pos + n
            raise ProtocolError("msgpack string/bin runs past the end of the frame")
        chunk = mv[pos:pos + n]
        return (chunk if b in _BINS else _utf8(chunk)), pos + n
    if b == 0xc0:
        return None, pos
    if b in (0xc2, 0xc3):
        return b == 0xc3, pos
    raise ProtocolError(f"unsupported msgpack type byte 0x{b:02x}")


def _utf8(chunk: memoryview) -> str:
    try:
        return str(chunk, "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("msgpack string is not valid UTF-8") from None


def decode_tensors(entries, what: str = "tensors", packed: bool = False) -> dict:
    """[tensor map, ...] -> {name: np.ndarray}, arrays viewing the receive buffer. ProtocolError if bad.
    packed: the data went through a lossless stage; {name: Packed} (sizes checked by `unpack_tensors`)."""
    if not isinstance(entries, list):
        raise ProtocolError(f"{what} must be a list of tensor maps")
    out = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ProtocolError(f"each of {what} must be a map with a string 'name'")
        name, dtype, shape, data = e["name"], e.get("dtype"), e.get("shape"), e.get("data")
        if dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 32
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not isinstance(data, (memoryview, bytes)):
            raise ProtocolError(f"tensor {name!r}: data must be msgpack bin")
        dt = _LE_DTYPES[dtype]
        want = dt.itemsize
        for d in shape:
            want *= d
        got = len(data) if type(data) is bytes else data.nbytes
        if want != got and not packed:
            raise ProtocolError(f"tensor {name!r}: shape {shape} of {dtype} needs {want} bytes, got {got}")
        if name in out:
            raise ProtocolError(f"tensor {name!r} appears twice")
        out[name] = Packed(dtype, shape, data) if packed else np.frombuffer(data, dtype=dt).reshape(shape)
    return out


def _is_message(obj) -> bool:
    """A frame's object is a message: a map with a string 'type'."""
    return isinstance(obj, dict) and isinstance(obj.get("type"), str)


# ------------------------------------------------------------------------------------- channel
class Channel:
    """One framed connection over a blocking socket. Every call takes an absolute `deadline`
    (time.monotonic seconds, or None for no limit) and raises TimeoutError past it.

    `reuse_buffer=True` receives every frame into one buffer kept by the channel, so the arrays
    decoded from a frame are valid only until the next `recv` (the server, which is done with a
    request before it reads the next); the default gives each frame a fresh buffer."""

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME, *, reuse_buffer: bool = False):
        self.sock, self.max_frame, self.reuse_buffer = sock, max_frame, reuse_buffer
        self.bytes_sent = self.bytes_received = 0
        self._head = bytearray(4)
        self._buf = None

    def release_buffer(self) -> None:
        """Forget the reused receive buffer: the arrays of the last frame stay valid (something
        still reads them), and the next frame gets a buffer of its own."""
        self._buf = None

    def _timeout(self, deadline):
        if deadline is None:
            self.sock.settimeout(None)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            self.sock.settimeout(left)

    def send(self, msg: dict, deadline: float | None = None) -> int:
        bufs = encode(msg)
        if len(bufs) == 1:                                   # a small frame
            self._timeout(deadline)
            self.sock.sendall(bufs[0])
            self.bytes_sent += len(bufs[0])
            return len(bufs[0])
        bufs = [memoryview(b).cast("B") for b in bufs]
        total = sum(b.nbytes for b in bufs)
        i = 0
        while i < len(bufs):
            self._timeout(deadline)
            sent = self.sock.sendmsg(bufs[i:i + _IOV_MAX])
            while sent and i < len(bufs):
                if sent >= bufs[i].nbytes:
                    sent -= bufs[i].nbytes
                    i += 1
                else:
                    bufs[i], sent = bufs[i][sent:], 0
        self.bytes_sent += total
        return total

    def _fill(self, view: memoryview, deadline, at_boundary: bool, on_partial=None, spin_s: float = 0.0) -> None:
        """Read exactly len(view) bytes. Inside a frame (not `at_boundary`) the rest is on its way:
        poll the socket without sleeping while bytes keep coming (up to SPIN_S without progress),
        since a sleep and a wake-up per arriving chunk cost more than the copy on loopback and
        fast links; then block as usual. `on_partial(got)` is called once, when the first bytes
        are in and more are to come."""
        may_spin = not at_boundary and SPIN_S > 0
        got, idle_since, spin, nonblocking = 0, None, may_spin or spin_s > 0, False
        limit = spin_s if at_boundary else SPIN_S
        while got < len(view):
            if spin:
                if not nonblocking:    # (with a timeout, Python polls before recv, even with MSG_DONTWAIT)
                    self.sock.settimeout(0.0)
                    nonblocking = True
                try:
                    n = self.sock.recv_into(view[got:])
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is not None and now > deadline:
                        raise TimeoutError("deadline passed") from None
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since > limit:
                        spin = False
                    continue
                idle_since = None
                if on_partial is not None and n and got + n < len(view):
                    on_partial(got + n)
                    on_partial = None
            else:
                self._timeout(deadline)
                nonblocking = False
                n = self.sock.recv_into(view[got:])
                spin = may_spin                           # woken by new bytes: more may follow
            if n == 0:
                if at_boundary and got == 0:
                    raise ConnectionClosed("peer closed the connection")
                raise ProtocolError(f"truncated frame: connection closed after {got} of {len(view)} bytes")
            got += n

    def recv_frame(self, deadline: float | None = None, frame_timeout: float | None = None) -> memoryview:
        """The body of the next frame. `deadline` bounds the wait for its header; once the header
        is in, the rest must come within `frame_timeout` seconds (if given) instead."""
        return self._recv(deadline, frame_timeout, early=False)[0]

    def recv(self, deadline: float | None = None, frame_timeout: float | None = None, spin_s: float = 0.0) -> dict:
        """The next frame's map. While a big frame is still arriving, its msgpack structure is
        decoded from the part already in (`decode_early`), off the critical path; a small frame
        is read by msgpack's C unpacker (bins come back as bytes, copied: they are small).
        `spin_s`: poll for the frame's first bytes without sleeping this long before blocking."""
        return self.recv_prepared(None, deadline, frame_timeout, spin_s)[0]

    def recv_prepared(self, prepare, deadline: float | None = None, frame_timeout: float | None = None,
                      spin_s: float = 0.0) -> tuple:
        """(map, prepare(map)) of the next frame (see `recv`). For a big frame `prepare` runs as
        soon as the map's structure is in, while its bins are still arriving: it may check and
        view them but not read them. Whatever it raises is raised here."""
        body, found = self._recv(deadline, frame_timeout, True, spin_s, prepare)
        msg = found[0] if found else None
        if msg is None:
            msg = decode(body) if len(body) > _SMALL_FRAME else decode_small(body)
        if not _is_message(msg):
            raise ProtocolError("a frame must hold a msgpack map with a string 'type'")
        if prepare is None:
            return msg, None
        return msg, (found[1] if len(found) > 1 else prepare(msg))

    def _recv(self, deadline, frame_timeout, early: bool, spin_s: float = 0.0, prepare=None):
        self._fill(memoryview(self._head), deadline, at_boundary=True, spin_s=spin_s)
        (n,) = _HEADER.unpack(self._head)
        if n > self.max_frame:
            raise FrameTooLarge(f"frame of {n} bytes exceeds the maximum of {self.max_frame} bytes")
        if n == 0:
            raise ProtocolError("empty frame")
        if self.reuse_buffer:     # no allocation nor page faults per frame; see release_buffer
            if self._buf is None or len(self._buf) < n:
                self._buf = np.empty(max(n, 64 * 1024), np.uint8)
            body = memoryview(self._buf)[:n]
        else:
            body = memoryview(np.empty(n, np.uint8))
        found = []        # [early map, prepare(early map)], as far as they got

        def on_partial(got: int) -> None:
            msg = decode_early(body, got)
            if msg is not None:
                found.append(msg)
                if prepare is not None and _is_message(msg):
                    found.append(prepare(msg))

        self._fill(body, time.monotonic() + frame_timeout if frame_timeout is not None else deadline,
                   at_boundary=False, on_partial=on_partial if early else None)
        self.bytes_received += n + 4
        return body, found

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------ messages
def new_nonce() -> bytes:
    return os.urandom(32)


def auth_digest(token: bytes, nonce: bytes, model: str, manifest_sha256: str) -> bytes:
    return hmac.new(token, b"|".join([bytes(nonce), model.encode(), manifest_sha256.encode()]),
                    hashlib.sha256).digest()


def check_auth(token: bytes, nonce: bytes, model: str, manifest_sha256: str, digest) -> bool:
    if not isinstance(digest, (bytes, memoryview)):
        return False
    return hmac.compare_digest(auth_digest(token, nonce, model, manifest_sha256), bytes(digest))


def challenge(nonce: bytes, auth: bool) -> dict:
    return {"type": "challenge", "version": PROTOCOL_VERSION, "nonce": nonce, "auth": auth}


def hello(model: str, manifest_sha256: str, auth: bytes | None) -> dict:
    return {"type": "hello", "version": PROTOCOL_VERSION, "model": model, "manifest_sha256": manifest_sha256,
            "auth": auth}


def welcome(model: str, manifest_sha256: str, edge_s: dict | None = None) -> dict:
    """The server's answer to a good hello. `edge_s` (optional; older devices ignore it): the
    seconds each plan's edge part takes on this server, {plan id: seconds}, from its calibration."""
    msg = {"type": "welcome", "version": PROTOCOL_VERSION, "model": model, "manifest_sha256": manifest_sha256}
    if edge_s:
        msg["edge_s"] = {str(k): float(v) for k, v in edge_s.items()}
    return msg


def infer(req_id: int, plan_id: str, tensors: dict, deadline_s: float | None, codec: str = "fp32") -> dict:
    msg = {"type": "infer", "id": req_id, "plan": plan_id, "deadline_s": deadline_s, "tensors": TensorDict(tensors)}
    if codec != "fp32":
        msg["codec"] = codec
    return msg


def result(req_id: int, outputs: dict, edge_s: float, queue_s: float) -> dict:
    return {"type": "result", "id": req_id, "outputs": TensorDict(outputs), "edge_s": float(edge_s),
            "queue_s": float(queue_s)}


def error(code: str, message: str, req_id=None) -> dict:
    return {"type": "error", "id": req_id, "error": {"code": code, "message": message}}


def error_of(msg: dict) -> tuple[str, str]:
    """(code, message) of an error reply, tolerant of a malformed one."""
    e = msg.get("error") if isinstance(msg.get("error"), dict) else {}
    return str(e.get("code", INTERNAL)), str(e.get("message", "error reply without a message"))


def manifest_identity(part) -> tuple[str, str]:
    """(model name, manifest sha256) that both sides of one artifact share, from a loaded part."""
    sha = getattr(part, "manifest_sha256", None)
    man = getattr(part, "manifest", None)
    if sha is None and man is not None:
        sha = getattr(man, "sha256", None)
    if sha is None:
        path = getattr(part, "path", None)
        if path is not None and os.path.exists(os.path.join(str(path), "manifest.msgpack")):
            with open(os.path.join(str(path), "manifest.msgpack"), "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
        elif man is not None and hasattr(man, "to_dict"):
            sha = hashlib.sha256(msgpack.packb(man.to_dict(), use_bin_type=True)).hexdigest()
    model = getattr(man, "model", None) or getattr(man, "model_name", None) or getattr(part, "model", None)
    if not sha or not model:
        raise ProtocolError("cannot tell the artifact's model name and manifest hash from the loaded part")
    return str(model), str(sha)


def read_token(path) -> bytes | None:
    """The shared secret in `path` (surrounding whitespace dropped), or None when `path` is None."""
    from edgecut.errors import UsageError

    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read token file {path!r}: {e.strerror}") from None
    if len(token) < 16:
        raise UsageError(f"token file {path!r} holds {len(token)} bytes; use at least 16 random bytes, "
                         f"e.g. `head -c 32 /dev/urandom | base64 > {path}`")
    return token
