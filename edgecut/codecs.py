"""Codecs for the tensors that cross the link. Torch-free: the device imports this.

A codec name is a base, optionally followed by a lossless stage: `fp32` (as computed), `fp16`,
`int8` (affine: q = clip(round(x * inv_scale + zero_point), -128, 127), x ~ (q - zero_point) *
scale, per channel for tensors with a channel axis, per tensor otherwise), and `+zstd` / `+lz4`
over the coded bytes ("int8+zstd"). The base step is compiled into the segments (the device
segment ending at the cut quantizes, the edge segment starting there dequantizes:
`codegen.codec_ops`); only the lossless stage runs here, over the bytes, in `pack` / `unpack`.
The numpy `encode` / `decode` below are the reference the compiled steps are checked against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgecut.errors import ProtocolError, UsageError

BASES = ("fp32", "fp16", "int8")
LOSSLESS = ("zstd", "lz4")
WIRE_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
ZSTD_LEVEL = 1          # the device pays the encode: the fastest level (ReLU zeros compress at any level)
SEP = "__"              # a coded tensor's name: "<node>__<base>" (node names never end so)


@dataclass(frozen=True)
class Codec:
    """A parsed codec name: `base` (fp32, fp16, int8) and `lossless` ("" or zstd / lz4)."""

    base: str
    lossless: str = ""

    @property
    def name(self) -> str:
        return self.base + (f"+{self.lossless}" if self.lossless else "")

    @property
    def lossy(self) -> bool:
        return self.base != "fp32"

    @property
    def coded(self) -> bool:
        """Whether the compiled segments change (a base other than fp32)."""
        return self.base != "fp32"


def known() -> tuple:
    """Every codec name, e.g. ('fp32', 'fp32+zstd', 'fp32+lz4', 'fp16', ...)."""
    return tuple(b + s for b in BASES for s in ("", *(f"+{x}" for x in LOSSLESS)))


def parse(name) -> Codec:
    """The Codec of `name`; UsageError listing the known names for anything else."""
    if isinstance(name, Codec):
        return name
    base, _, lossless = str(name).strip().partition("+")
    if not isinstance(name, str) or base not in BASES or (lossless and lossless not in LOSSLESS):
        raise UsageError(f"unknown codec {name!r}: use one of {', '.join(known())}")
    return Codec(base, lossless)


def parse_all(names) -> tuple:
    """The codec names of `names` (a name or a sequence), parsed, each once, fp32 first."""
    names = (names,) if isinstance(names, str) else tuple(names or ())
    out = {parse(n).name: None for n in ("fp32", *names)}
    return tuple(out)


def coded_name(node: str, base: str) -> str:
    """The name of `node`'s tensor coded with `base` (the node's own name for fp32)."""
    return node if base == "fp32" else f"{node}{SEP}{base}"


def split_name(name: str) -> tuple:
    """(node, base) of a tensor name made by `coded_name`."""
    node, sep, base = name.rpartition(SEP)
    return (node, base) if sep and base in BASES and base != "fp32" else (name, "fp32")


# --- int8 scales -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Affine:
    """int8 parameters of one tensor: `scale`, `inv_scale`, `zero_point` (float32 arrays that
    broadcast against the tensor: [1, C, 1, ...] per channel, [] per tensor)."""

    scale: np.ndarray
    inv_scale: np.ndarray
    zero_point: np.ndarray

    def to_dict(self) -> dict:
        return {"shape": list(self.scale.shape), "scale": self.scale.ravel().tolist(),
                "zero_point": self.zero_point.ravel().tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Affine":
        shape = tuple(d["shape"])
        scale = np.asarray(d["scale"], np.float32).reshape(shape)
        return cls(scale, (np.float32(1) / scale).astype(np.float32), np.asarray(d["zero_point"], np.float32).reshape(shape))


def calibrate_int8(samples, shape, where: str = "tensor") -> Affine:
    """int8 parameters from `samples` (N x C x ...: the values a crossing tensor of `shape`
    (1 x C x ..., batch first) took on the training data). Per channel (axis 1) when the tensor
    has channels, else per tensor; the range always holds 0, so ReLU zeros stay exact zeros
    (and compress)."""
    samples = np.asarray(samples, np.float32)
    shape = tuple(int(d) for d in shape)
    if samples.ndim != len(shape) or tuple(samples.shape[1:]) != shape[1:]:
        raise UsageError(f"calibration data for {where}: got samples of shape {list(samples.shape)}, expected "
                         f"N x {list(shape[1:])} (the tensor is {list(shape)}); pass values of this tensor")
    if samples.shape[0] == 0 or not np.all(np.isfinite(samples)):
        raise UsageError(f"calibration data for {where}: need at least one sample and finite values")
    per_channel = len(shape) >= 2 and shape[1] > 1
    axes = tuple(a for a in range(samples.ndim) if not (per_channel and a == 1))
    lo = np.minimum(samples.min(axis=axes, keepdims=True), 0.0)
    hi = np.maximum(samples.max(axis=axes, keepdims=True), 0.0)
    if not per_channel:
        lo, hi = lo.reshape(()), hi.reshape(())
    scale = ((hi - lo) / 255.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zero_point = np.clip(np.round(-128.0 - lo / scale), -128, 127).astype(np.float32)
    return Affine(scale, (np.float32(1) / scale).astype(np.float32), zero_point)


# --- reference encode / decode (numpy) ----------------------------------------------------------
def encode(codec, x: np.ndarray, affine: Affine | None = None) -> np.ndarray:
    """The base step of `codec` on `x` (float32), as the compiled segment computes it."""
    c = parse(codec)
    x = np.asarray(x, np.float32)
    if c.base == "fp32":
        return x
    if c.base == "fp16":
        return x.astype(np.float16)
    if affine is None:
        raise UsageError("int8 needs calibrated scales (calibrate_int8)")
    return np.clip(np.round(x * affine.inv_scale + affine.zero_point), -128, 127).astype(np.int8)


def decode(codec, q: np.ndarray, affine: Affine | None = None) -> np.ndarray:
    """The inverse base step: float32 values the edge segment computes with."""
    c = parse(codec)
    if c.base != "int8":
        return np.asarray(q).astype(np.float32)
    if affine is None:
        raise UsageError("int8 needs calibrated scales (calibrate_int8)")
    return ((np.asarray(q).astype(np.float32) - affine.zero_point) * affine.scale).astype(np.float32)


def within_rounding(base: str, got: np.ndarray, want: np.ndarray) -> bool:
    """Whether two codings of one tensor differ by no more than the codec's own rounding: one
    step for int8 (a value at a rounding tie, or a fused multiply-add), one half-precision ulp
    for fp16, 1e-5 of the scale for fp32."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False
    if not want.size:
        return True
    diff = np.abs(got - want)
    if base == "int8":
        return bool(diff.max() <= 1.0)
    if base == "fp16":
        return bool(np.all(diff <= 2.0 ** -10 * np.maximum(np.abs(want), 2.0 ** -14)))
    return bool(diff.max() <= 1e-5 * max(float(np.abs(want).max()), 1e-6))


# --- the lossless stage over the bytes -------------------------------------------------------------
def _zstd():
    import zstandard

    return zstandard


def pack(codec, arr: np.ndarray):
    """The bytes to send for `arr` (already base-coded): the array's own bytes without a lossless
    stage (no copy), else the compressed stream."""
    c = parse(codec)
    data = np.ascontiguousarray(arr)
    if not c.lossless:
        return data
    raw = memoryview(data.reshape(-1).view(np.uint8))
    if c.lossless == "zstd":
        return _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    import lz4.frame

    return lz4.frame.compress(raw, store_size=True)


def unpack(codec, data, dtype: str, shape, name: str = "tensor") -> np.ndarray:
    """The array of `dtype` and `shape` from the bytes `pack` made. A stream that does not
    decompress to exactly the header's size raises ProtocolError (a wire error, not a crash)."""
    c = parse(codec)
    if not c.lossless:
        return data
    want = int(np.dtype(dtype).itemsize * math.prod(shape))
    try:
        if c.lossless == "zstd":
            raw = _zstd().ZstdDecompressor().decompress(bytes(data), max_output_size=want + 1)
        else:
            import lz4.frame

            raw = lz4.frame.decompress(bytes(data))
    except Exception as e:  # noqa: BLE001 - any library error is a bad frame
        raise ProtocolError(f"tensor {name!r}: its {c.lossless} stream does not decode "
                            f"({type(e).__name__}: {e})") from None
    if len(raw) != want:
        raise ProtocolError(f"tensor {name!r}: coded length disagrees with its header: {c.lossless} gives "
                            f"{len(raw)} bytes, {dtype}{list(shape)} needs {want}")
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def packed_bytes(codec, arr: np.ndarray) -> int:
    """Bytes `pack` sends for `arr`."""
    out = pack(codec, arr)
    return int(out.nbytes if isinstance(out, np.ndarray) else len(out))
