"""The Manifest: what an artifact holds and how its parts run. Torch-free (numpy + msgpack).

Written by `edgecut.codegen.artifact.build_artifact` as `manifest.msgpack` (what programs read; its
sha256 is the artifact's identity on the wire) and `manifest.json` (the same content, for people).
Tensors (weights, reference inputs) are stored as {"dtype", "shape", "data": bytes} maps.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from edgecut.errors import ArtifactError
from edgecut.types import Plan, PlanTable

FORMAT_VERSION = 1
MANIFEST = "manifest.msgpack"
MANIFEST_JSON = "manifest.json"
REFERENCE = "reference.msgpack"


@dataclass(frozen=True)
class Segment:
    """A piece of the graph compiled as one library. `inputs`: node names it reads (model
    placeholders or other segments' outputs), in argument order; `outputs`: node names it
    returns; `nodes`: its own nodes in graph order; `macs`: their multiply-accumulates (the
    work of one call, from node metadata; 0 when unknown)."""

    name: str
    nodes: tuple
    inputs: tuple
    outputs: tuple
    macs: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "nodes": list(self.nodes), "inputs": list(self.inputs),
                "outputs": list(self.outputs), "macs": int(self.macs)}

    @classmethod
    def from_dict(cls, d: dict) -> "Segment":
        return cls(d["name"], tuple(d["nodes"]), tuple(d["inputs"]), tuple(d["outputs"]), int(d.get("macs", 0)))


@dataclass(frozen=True)
class ExitSpec:
    """What the runtime needs of an exit: its logits node, branch point and entropy threshold
    (nats; the exit fires when the entropy of softmax(logits) is below it; nan = never early)."""

    id: int
    output: str
    point: str
    accuracy: float = math.nan
    threshold: float = math.nan

    def to_dict(self) -> dict:
        return {"id": self.id, "output": self.output, "point": self.point,
                "accuracy": float(self.accuracy), "threshold": float(self.threshold)}

    @classmethod
    def from_dict(cls, d: dict) -> "ExitSpec":
        return cls(int(d["id"]), d["output"], d["point"], float(d["accuracy"]), float(d["threshold"]))


@dataclass(frozen=True)
class Route:
    """How one plan runs. `device`: segment names run on the device, in order; `edge`: those run
    on the edge; `crossing`: node names sent from device to edge. `checks`: early exits, each
    (k, exit id, head segments): once the first k device segments have run, the head segments
    compute that exit's logits, and an entropy under the exit's threshold ends the request.
    `codec`: how the crossing tensors travel (`edgecut.codecs`); with a base other than fp32 the
    crossing names are the coded tensors (`codecs.coded_name`) the device segments return."""

    plan_id: str
    exit: int
    device: tuple
    edge: tuple
    crossing: tuple
    checks: tuple = ()
    codec: str = "fp32"

    @property
    def device_only(self) -> bool:
        return not self.edge

    def to_dict(self) -> dict:
        return {"plan_id": self.plan_id, "exit": self.exit, "device": list(self.device),
                "edge": list(self.edge), "crossing": list(self.crossing),
                "checks": [[k, e, list(h)] for k, e, h in self.checks], "codec": self.codec}

    @classmethod
    def from_dict(cls, d: dict) -> "Route":
        return cls(d["plan_id"], int(d["exit"]), tuple(d["device"]), tuple(d["edge"]),
                   tuple(d["crossing"]), tuple((int(k), int(e), tuple(h)) for k, e, h in d["checks"]),
                   d.get("codec", "fp32"))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(int(s) for s in d["shape"]))

    def check(self, a, what: str) -> None:
        """Raise ArtifactError unless `a` is an array of this dtype and shape."""
        if not isinstance(a, np.ndarray):
            raise ArtifactError(f"{what}: tensor {self.name!r} is a {type(a).__name__}, expected a numpy array")
        if str(a.dtype) != self.dtype or tuple(a.shape) != self.shape:
            raise ArtifactError(f"{what}: tensor {self.name!r} is {a.dtype}{list(a.shape)}, "
                                f"expected {self.dtype}{list(self.shape)}")


@dataclass(frozen=True)
class Library:
    """One compiled segment for one side: `file` (a TVM library, or an .onnx file for the
    onnxruntime backend), `params` (weights file, "" for ONNX), the TVM target it was built for.
    `weights`: the side's shared weight store when `params` lists references into it
    ({"ref": sha256} entries; weights used by several libraries are stored once), else "".
    `note`: why a segment runs on ONNX Runtime (backend requested, or what TVM could not do).
    `batch`: the batch size the library was compiled for (codegen/batches.py)."""

    side: str
    segment: str
    backend: str
    file: str
    params: str
    target: str
    tvm_target: str
    arch: str
    weights: str = ""
    note: str = ""
    batch: int = 1          # requests per run (edge_batches); 1 is every side's latency path

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Library":
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    """Everything a device or an edge needs to run its side of a model, and to check it."""

    model: str
    inputs: tuple                   # TensorSpec of each model input, in order
    segments: tuple                 # Segment
    tensors: dict                   # node name -> TensorSpec: every tensor a segment reads or returns
    table: PlanTable
    fallback: Plan                  # device-only plan for when the edge is unreachable
    routes: dict                    # plan id -> Route (the table's plans and the fallback)
    exits: tuple                    # ExitSpec, by id
    libraries: tuple                # Library
    onnx: dict                      # segment -> onnx file ("" when not exported)
    files: dict                     # relative path -> sha256 of every file but the manifest
    targets: dict                   # side -> Target.to_dict()
    versions: dict                  # {"edgecut", "tvm", "torch", "onnx"} at build time
    checks: dict = field(default_factory=dict)   # segment -> {"tvm_vs_torch", "onnx_vs_tvm"} max abs errors
    reference: str = REFERENCE      # file with a reference input and expected outputs (for `check`)
    format_version: int = FORMAT_VERSION
    info: dict = field(default_factory=dict)     # what compile knew: deadline, profiles, per-layer costs (explain)
    candidates: tuple = ()          # Plan: every plan with a route, predicted device/edge seconds as built

    def route(self, plan_id: str) -> Route:
        try:
            return self.routes[plan_id]
        except KeyError:
            raise ArtifactError(f"unknown plan id {plan_id!r}; this artifact has "
                                f"{', '.join(sorted(self.routes))}") from None

    def libraries_of(self, side: str, backend: str | None = "tvm", batch: int = 1) -> dict:
        """segment -> Library of `side` with `backend` compiled for `batch`; backend=None: each
        segment's library as built (TVM, or ONNX Runtime where TVM could not build it)."""
        return {lib.segment: lib for lib in self.libraries if lib.side == side and lib.batch == batch
                and (backend is None or lib.backend == backend)}

    def batch_sizes(self, side: str = "edge") -> tuple:
        """The batch sizes above 1 that `side` has libraries for."""
        return tuple(sorted({lib.batch for lib in self.libraries if lib.side == side and lib.batch > 1}))

    def exit(self, exit_id: int) -> ExitSpec:
        return next(e for e in self.exits if e.id == exit_id)

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "model": self.model,
                "inputs": [t.to_dict() for t in self.inputs],
                "segments": [s.to_dict() for s in self.segments],
                "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
                "table": self.table.to_dict(), "fallback": self.fallback.to_dict(),
                "routes": {k: r.to_dict() for k, r in self.routes.items()},
                "exits": [e.to_dict() for e in self.exits],
                "libraries": [lib.to_dict() for lib in self.libraries], "onnx": dict(self.onnx),
                "files": dict(self.files), "targets": dict(self.targets), "versions": dict(self.versions),
                "checks": dict(self.checks), "reference": self.reference, "info": dict(self.info),
                "candidates": [p.to_dict() for p in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        version = d.get("format_version")
        if not isinstance(version, int):
            raise ArtifactError("manifest has no format_version: not an edgecut artifact")
        if version > FORMAT_VERSION:
            raise ArtifactError(f"artifact format version {version} is newer than this edgecut reads "
                                f"({FORMAT_VERSION}); upgrade edgecut on this machine or rebuild the artifact")
        table, fallback = PlanTable.from_dict(d["table"]), Plan.from_dict(d["fallback"])
        if "candidates" in d:
            candidates = tuple(Plan.from_dict(p) for p in d["candidates"])
        else:                       # written before candidates: the table's plans and the fallback
            candidates = tuple({p.id: p for p in (*table.plans, fallback)}.values())
        return cls(d["model"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(Segment.from_dict(s) for s in d["segments"]),
                   {k: TensorSpec.from_dict(v) for k, v in d["tensors"].items()}, table, fallback,
                   {k: Route.from_dict(r) for k, r in d["routes"].items()},
                   tuple(ExitSpec.from_dict(e) for e in d["exits"]),
                   tuple(Library.from_dict(x) for x in d["libraries"]), dict(d["onnx"]),
                   dict(d["files"]), dict(d["targets"]), dict(d["versions"]), dict(d.get("checks", {})),
                   d.get("reference", REFERENCE), version, dict(d.get("info", {})), candidates)

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Manifest":
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:
            raise ArtifactError(f"manifest is not valid msgpack ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict):
            raise ArtifactError("manifest is not a msgpack map: not an edgecut artifact")
        return cls.from_dict(d)

    def write(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / MANIFEST).write_bytes(self.to_msgpack())
        (directory / MANIFEST_JSON).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{directory} is not an edgecut artifact: {MANIFEST} is missing")
        return cls.from_msgpack(path.read_bytes())


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(directory: str | Path, manifest: Manifest, names) -> None:
    """Refuse files whose sha256 differs from the manifest (or that are missing), naming them."""
    for name in names:
        want = manifest.files.get(name)
        path = Path(directory) / name
        if want is None:
            raise ArtifactError(f"{name} is not listed in the manifest of {directory}")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact; copy the whole {Path(name).parts[0]}/ folder")
        if sha256(path) != want:
            raise ArtifactError(f"{path} does not match the manifest (sha256 differs): the file was changed "
                                "or damaged; rebuild the artifact or copy it again")


def pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def save_arrays(path: str | Path, arrays) -> None:
    """A list (or dict of lists / arrays) of numpy arrays as msgpack."""
    def pack(x):
        if isinstance(x, dict):
            return {k: pack(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [pack(v) for v in x]
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        return pack_array(np.asarray(x))
    Path(path).write_bytes(msgpack.packb(pack(arrays), use_bin_type=True))


def load_arrays(path: str | Path):
    def unpack(x):
        if isinstance(x, dict) and set(x) == {"dtype", "shape", "data"}:
            return unpack_array(x)
        if isinstance(x, dict):
            return {k: unpack(v) for k, v in x.items()}
        if isinstance(x, list):
            return [unpack(v) for v in x]
        return x
    return unpack(msgpack.unpackb(Path(path).read_bytes(), raw=False, strict_map_key=False))


def array_key(a: np.ndarray) -> str:
    """The content hash of an array (dtype, shape and bytes): equal weights share one key."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def max_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs error relative to the reference's scale (max |want|, at least 1e-6)."""
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-6)
    return float(np.max(np.abs(got.astype(np.float64) - want))) / scale if want.size else 0.0


def entropy(logits: np.ndarray) -> float:
    """Entropy (nats) of softmax(logits) along the last axis; the largest over the batch."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    h = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1)
    return float(np.max(h)) if h.size else math.inf
