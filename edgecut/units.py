"""Parse quantities the way people write them: `100ms`, `2mbit`, `1.5Mbps`, `1x3x224x224`.

Bandwidth follows tc's habits: `kbit`/`mbit`/`gbit` (and `kbps`/`Mbps`/`Gbps` meaning bits, as
network people use them) are decimal bits per second; `KB/s`, `MB/s` are bytes per second.
"""
from __future__ import annotations

import re

from edgecut.errors import UsageError

_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_TIME = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "m": 60.0, "min": 60.0}
_RATE = {
    "": 1.0, "bit": 1.0, "bps": 1.0, "b/s": 1.0,
    "k": 1e3, "kbit": 1e3, "kbps": 1e3, "kb/s": 1e3, "kbit/s": 1e3,
    "m": 1e6, "mbit": 1e6, "mbps": 1e6, "mb/s": 1e6, "mbit/s": 1e6,
    "g": 1e9, "gbit": 1e9, "gbps": 1e9, "gb/s": 1e9, "gbit/s": 1e9,
}
_BYTE_RATE = {"b/s": 8.0, "kb/s": 8e3, "mb/s": 8e6, "gb/s": 8e9, "bps": 8.0}
_SIZE = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
         "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    m = re.fullmatch(_NUM + r"\s*([A-Za-zµ/]*)", str(text).strip())
    if not m:
        raise UsageError(f"cannot read {what} {text!r}: expected a number with a unit, e.g. {example}")
    return float(m.group(1)), m.group(2)


def parse_time(text: str | float) -> float:
    """Seconds from '100ms', '0.1s', '250us', '2' (seconds)."""
    if isinstance(text, (int, float)):
        return float(text)
    v, unit = _split(text, "time", "100ms or 0.1s")
    if unit.lower() not in _TIME and unit not in _TIME:
        raise UsageError(f"unknown time unit {unit!r} in {text!r}; use s, ms, us or ns")
    return v * _TIME.get(unit, _TIME.get(unit.lower()))


def parse_bandwidth(text: str | float) -> float:
    """Bits per second from '2mbit', '1.5Mbps', '500kbit', '10MB/s' (bytes, capital B), '1e6'."""
    if isinstance(text, (int, float)):
        return float(text)
    v, unit = _split(text, "bandwidth", "2mbit or 1.5Mbps")
    # Capital B after a prefix means bytes: "MB/s", "KB/s", "B/s"; "MBps" is bytes too.
    if re.fullmatch(r"[kKmMgG]?B(/s|ps)", unit):
        return v * _BYTE_RATE[unit.lower().replace("ps", "/s") if unit.endswith("ps") else unit.lower()]
    key = unit.lower()
    if key not in _RATE:
        raise UsageError(f"unknown bandwidth unit {unit!r} in {text!r}; use bit, kbit, mbit, gbit (or kbps, Mbps)")
    return v * _RATE[key]


def parse_size(text: str | int) -> int:
    """Bytes from '64MiB', '1mb', '4096' (binary multiples)."""
    if isinstance(text, int):
        return text
    v, unit = _split(text, "size", "64MiB")
    if unit.lower() not in _SIZE:
        raise UsageError(f"unknown size unit {unit!r} in {text!r}; use B, KiB, MiB or GiB")
    return int(v * _SIZE[unit.lower()])


def parse_shape(text: str) -> tuple[int, ...]:
    """(1, 3, 224, 224) from '1x3x224x224' or '1,3,224,224'."""
    parts = re.split(r"[x,×]", str(text).strip().strip("()[]"))
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"cannot read shape {text!r}: expected sizes joined by 'x', e.g. 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"bad shape {text!r}: every size must be a positive integer")
    return dims


def format_time(s: float) -> str:
    if s != s or s in (float("inf"), float("-inf")):
        return str(s)
    return f"{s * 1e3:.1f}ms" if s < 10 else f"{s:.1f}s"


def format_bandwidth(bps: float) -> str:
    for div, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= div:
            return f"{bps / div:.3g} {unit}"
    return f"{bps:.3g} bit/s"


def format_bytes(n: float) -> str:
    for div, unit in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"
