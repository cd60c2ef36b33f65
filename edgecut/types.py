"""Frozen dataclasses that cross package boundaries (see docs/architecture.md).

`Link`, `Cut`, `Plan` and `PlanTable` are plain values: the solver makes them, codegen and the
runtime read them, and they round-trip through `to_dict`/`from_dict` into the msgpack manifest.
Units: seconds, bytes, and bits per second.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Link:
    """A network between device and edge: `bandwidth` in bit/s, round-trip `rtt` in seconds,
    and a fixed per-message `overhead` in seconds (framing, syscalls, serialisation)."""

    bandwidth: float
    rtt: float = 0.0
    overhead: float = 0.0

    def __post_init__(self):
        if not self.bandwidth > 0:
            raise ValueError(f"Link bandwidth must be > 0 bit/s, got {self.bandwidth}")
        if self.rtt < 0 or self.overhead < 0:
            raise ValueError("Link rtt and overhead must be >= 0")

    def transfer_seconds(self, up_bytes: int, down_bytes: int = 0) -> float:
        """Seconds to send `up_bytes` to the edge and get `down_bytes` back; 0 when nothing is sent."""
        if up_bytes <= 0:
            return 0.0
        return self.rtt + self.overhead + 8.0 * (up_bytes + down_bytes) / self.bandwidth


@dataclass(frozen=True)
class Cut:
    """Where the graph is split. `device` holds the names of the fx nodes computed on the device
    (closed under predecessors); `crossing` the names of the nodes whose outputs are sent to the
    edge, each once. `crossing == ()` means device-only; a device set of only the placeholders
    means edge-only. `name` is a short stable label ("input", "after:conv3", "device")."""

    name: str
    device: frozenset = field(default_factory=frozenset)
    crossing: tuple = ()
    crossing_bytes: int = 0

    @property
    def device_only(self) -> bool:
        return not self.crossing

    def to_dict(self) -> dict:
        return {"name": self.name, "device": sorted(self.device), "crossing": list(self.crossing),
                "crossing_bytes": int(self.crossing_bytes)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cut":
        return cls(d["name"], frozenset(d["device"]), tuple(d["crossing"]), int(d["crossing_bytes"]))


@dataclass(frozen=True)
class Plan:
    """One choice of (exit, cut, codec) with its predicted latency split and expected accuracy.
    `exit` is the exit id (the final output of the backbone has the largest id).
    `feasible` is False when the predicted latency exceeds the deadline; `shortfall_s` by how much."""

    exit: int
    cut: Cut
    device_s: float
    transfer_s: float
    edge_s: float
    accuracy: float = float("nan")
    feasible: bool = True
    shortfall_s: float = 0.0
    codec: str = "fp32"         # how the crossing tensors travel (edgecut.codecs); fp32: as computed

    @property
    def latency_s(self) -> float:
        return self.device_s + self.transfer_s + self.edge_s

    @property
    def id(self) -> str:
        """Stable id used on the wire and in the manifest: "e1/after:pool1", "e1/after:pool1@int8+zstd"."""
        return f"e{self.exit}/{self.cut.name}" + ("" if self.codec == "fp32" else f"@{self.codec}")

    def same_choice(self, other: "Plan") -> bool:
        return self.exit == other.exit and self.cut.name == other.cut.name and self.codec == other.codec

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cut"] = self.cut.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["cut"] = Cut.from_dict(d["cut"])
        return cls(**d)


@dataclass(frozen=True)
class PlanTable:
    """Bandwidth ranges -> Plan. `bounds[i]` is the lowest bandwidth (bit/s) at which `plans[i]`
    applies; bounds are increasing, and plans[0] also covers everything below bounds[0]."""

    bounds: tuple
    plans: tuple
    deadline: float = math.inf

    def __post_init__(self):
        if len(self.bounds) != len(self.plans) or not self.plans:
            raise ValueError("PlanTable needs one bound per plan and at least one plan")
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds[:-1])):
            raise ValueError("PlanTable bounds must increase")

    def lookup(self, bandwidth: float) -> Plan:
        i = bisect.bisect_right(self.bounds, bandwidth) - 1
        return self.plans[max(i, 0)]

    def by_id(self, plan_id: str) -> Plan:
        for p in self.plans:
            if p.id == plan_id:
                return p
        raise KeyError(plan_id)

    def to_dict(self) -> dict:
        return {"bounds": [float(b) for b in self.bounds], "plans": [p.to_dict() for p in self.plans],
                "deadline": float(self.deadline)}

    @classmethod
    def from_dict(cls, d: dict) -> "PlanTable":
        return cls(tuple(d["bounds"]), tuple(Plan.from_dict(p) for p in d["plans"]), d["deadline"])
