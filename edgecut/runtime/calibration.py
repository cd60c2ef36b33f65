"""Calibration: every route's part timed on the machine that runs it, as built. Torch-free.

`calibrate(part, side)` runs each runnable plan's device part (`early_exit=False`, on the
artifact's reference input) or edge part (on its crossing tensors) under the idle pattern of real
requests: a sleep of 0, 5 and 20 ms before each call, not only back to back, because thread pools
fall asleep and caches go cold between requests. A device part with early-exit checks is also
timed with its exit heads run but not taken (each head's library right after the part): what a
request with early exit on costs when no exit fires, the worst case a deadline must survive. It
keeps every sample; `Calibration.seconds(q, early_exit)` gives the q-quantile per plan id, with the
heads when `early_exit`, without them otherwise. A plan whose codec has a lossless stage is timed
with it: the device's encode of what it sends, the edge's decode of what it gets. `ensure_calibration` is what `DeviceRuntime` and `EdgeServer`
do at start: use the valid calibration beside the artifact, or make one and save it there.

The file (`calibration-<side>.json` beside the artifact; `calibration-<side>-<runner>.json` for a
wrapped part such as an emulated device) holds the manifest's sha256, the machine's fingerprint,
when it was made, and the samples with their p50/p90/p99 per plan id. A calibration of another
artifact or another machine is refused with the reason; one older than the artifact's manifest
is redone.

Any object with `.run(plan_id, tensors, early_exit)` and `.manifest` is calibrated the same way
(`runner`: its `calibration_tag`, else its class name, is part of the fingerprint).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgecut.errors import ArtifactError, UsageError
from edgecut.planning import runnable_plans
from edgecut.runtime.protocol import pack_tensors, unpack_tensors

FORMAT = 1
SIDES = ("device", "edge")
IDLE_PATTERN = (0.0, 0.005, 0.02)
REPORTED = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
COMPARED = ("machine", "cpu", "cores", "tvm", "runner")   # what makes two machines "the same"

log = logging.getLogger("edgecut.runtime.calibration")


def quantile(samples, q: float) -> float:
    """The q-quantile of `samples` (linear interpolation); from 8 samples on, never past the
    second largest: a tail quantile of a few dozen samples cannot tell an outlier from the tail,
    so one outlier in a window does not move a plan, two do."""
    s = np.sort(np.asarray(samples, dtype=np.float64))
    if s.size == 0:
        return math.nan
    pos = float(q) * (s.size - 1)
    if s.size >= 8:
        pos = min(pos, s.size - 2.0)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.size - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def cpu_model() -> str:
    """The CPU's model name (x86: "model name"; a Pi: "Model", "Hardware"), else
    platform.processor()."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                found.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    for key in ("model name", "model", "hardware", "cpu model"):      # x86 "model" is a number
        if found.get(key) and not found[key].isdigit():
            return found[key]
    return platform.processor() or "unknown"


def _tvm_version() -> str:
    tvm = sys.modules.get("tvm")
    if tvm is not None and getattr(tvm, "__version__", None):
        return str(tvm.__version__)
    try:
        from importlib.metadata import version

        return version("apache-tvm")
    except Exception:                       # noqa: BLE001 - a source build has no distribution
        try:
            import tvm

            return str(tvm.__version__)
        except Exception:                   # noqa: BLE001
            return "none"


def runner_of(obj) -> str:
    """'Part' for an artifact's own part; a wrapper's `calibration_tag`, else its class name."""
    try:
        tag = object.__getattribute__(obj, "calibration_tag")
    except AttributeError:
        tag = None
    return str(tag or type(obj).__name__)


def fingerprint(runner: str = "Part") -> dict:
    """What identifies this machine for timing: architecture, CPU model, cores, TVM version, the
    runner (an emulated device is another machine); the hostname is recorded, not compared."""
    return {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count() or 0,
            "tvm": _tvm_version(), "runner": runner, "hostname": socket.gethostname()}


def _describe(fp: dict) -> str:
    return (f"{fp.get('cpu', '?')} ({fp.get('machine', '?')}, {fp.get('cores', '?')} cores, TVM {fp.get('tvm', '?')}"
            + (f", runner {fp['runner']}" if fp.get("runner", "Part") != "Part" else "") + ")")


@dataclass(frozen=True)
class Calibration:
    """Measured seconds per plan id of one side of one artifact on one machine."""

    side: str
    manifest_sha256: str
    machine: dict
    made_at: float                              # unix time
    samples: dict                               # plan id -> tuple of seconds
    idle_pattern: tuple = IDLE_PATTERN
    path: str | None = field(default=None, compare=False)
    with_heads: dict = field(default_factory=dict)   # plan id -> seconds with its exit heads run, not taken

    def seconds(self, q: float = 0.99, early_exit: bool = False) -> dict:
        """{plan id: the q-quantile of its seconds}; `early_exit`: with its exit heads run and not
        taken, for the plans that have heads."""
        return {pid: quantile(self.with_heads.get(pid, s) if early_exit else s, q) for pid, s in self.samples.items()}

    def quantiles(self, plan_id: str) -> dict:
        return {k: quantile(self.samples[plan_id], q) for k, q in REPORTED.items()}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "side": self.side, "manifest_sha256": self.manifest_sha256,
                "machine": dict(self.machine), "made_at": self.made_at,
                "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.made_at)),
                "idle_pattern": list(self.idle_pattern),
                "plans": {pid: {**self.quantiles(pid), "n": len(s), "samples": list(s),
                                **({"with_heads": list(self.with_heads[pid])} if pid in self.with_heads else {})}
                          for pid, s in self.samples.items()}}

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> "Calibration":
        where = path or "calibration"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ArtifactError(f"{where} is not an edgecut calibration (format {FORMAT}): "
                                "run `edgecut calibrate ARTIFACT --side device|edge` to make one")
        try:
            return cls(d["side"], d["manifest_sha256"], dict(d["machine"]), float(d["made_at"]),
                       {pid: tuple(float(x) for x in p["samples"]) for pid, p in d["plans"].items()},
                       tuple(d.get("idle_pattern", IDLE_PATTERN)), path,
                       {pid: tuple(float(x) for x in p["with_heads"]) for pid, p in d["plans"].items()
                        if "with_heads" in p})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{where} is damaged ({type(e).__name__}: {e}); run `edgecut calibrate` again") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)               # a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read calibration {path}: {e}") from None
        return cls.from_dict(d, str(path))

    def check(self, side: str, manifest_sha256: str, machine: dict) -> None:
        """Raise ArtifactError, with the reason, unless this calibration is of `side` of this
        artifact on this machine."""
        where = self.path or "the calibration"
        if self.side != side:
            raise ArtifactError(f"{where} times the {self.side} side, not the {side}")
        if self.manifest_sha256 != manifest_sha256:
            raise ArtifactError(f"{where} is of another artifact (manifest sha256 {self.manifest_sha256[:12]}..., "
                                f"this one's {manifest_sha256[:12]}...): run `edgecut calibrate ARTIFACT --side "
                                f"{side}` to replace it")
        diff = [k for k in COMPARED if self.machine.get(k) != machine.get(k)]
        if diff:
            raise ArtifactError(f"{where} was made on another machine ({', '.join(diff)} differ): "
                                f"{_describe(self.machine)}, this is {_describe(machine)}; run `edgecut calibrate "
                                f"ARTIFACT --side {side}` here to replace it, or delete it")


# ---------------------------------------------------------------------------------- measuring
def _sha(obj) -> str:
    from edgecut.runtime.protocol import manifest_identity

    return manifest_identity(obj)[1]


def _reference(obj) -> dict:
    path = getattr(obj, "path", None)
    ref = getattr(obj.manifest, "reference", None)
    if path is None or not ref or not (Path(path) / ref).is_file():
        return {}
    from edgecut.codegen.manifest import load_arrays

    return load_arrays(Path(path) / ref)


def _like(spec, rng) -> np.ndarray:
    dt = np.dtype(spec.dtype)
    if dt.kind == "f":
        return rng.standard_normal(spec.shape).astype(dt)
    if dt == np.int8:                   # an int8-coded crossing tensor: its lossless stage sees noise
        return rng.integers(-128, 128, spec.shape).astype(dt)
    return np.zeros(spec.shape, dt)


def _coded_call(part, side: str, plan, tensors):
    """A call of `plan`'s `side` as the runtime makes it: the device's part and its codec's lossless
    encode of what it sends, or the edge's decode of what it gets and its part."""
    codec = getattr(plan, "codec", "fp32")
    if side == "edge":
        if codec != "fp32":
            tensors = unpack_tensors(tensors, codec)
        return part.run(plan.id, tensors, early_exit=False)
    res = part.run(plan.id, tensors, early_exit=False)
    if codec != "fp32" and not getattr(res, "done", True):
        pack_tensors(res.outputs, codec)
    return res


def _inputs(obj, side: str, plans) -> dict:
    """plan id -> the tensors its `side` part is timed on."""
    man, ref, rng = obj.manifest, _reference(obj), np.random.default_rng(0)
    if side == "device":
        specs = getattr(man, "inputs", ())
        x = {t.name: np.asarray(ref["inputs"][t.name]) if t.name in ref.get("inputs", {}) else _like(t, rng)
             for t in specs}
        if not x:
            raise ArtifactError("cannot calibrate: the manifest names no model inputs")
        return {p.id: x for p in plans}
    known = {k: np.asarray(v) for k, v in ref.get("edge", {}).get("tensors", {}).items()}
    out = {}
    for p in plans:
        route = man.route(p.id)
        out[p.id] = {c: known[c] if c in known else _like(man.tensors[c], rng) for c in route.crossing}
    return out


def side_plans(manifest, side: str) -> list:
    """The runnable plans with a part on `side` (every plan has one on the device)."""
    plans = runnable_plans(manifest)
    routes = getattr(manifest, "routes", None) or {}
    if side == "edge":
        return [p for p in plans if (routes[p.id].edge if p.id in routes else not p.cut.device_only)]
    return plans


def calibrate(part, side: str = "device", *, idle_pattern=IDLE_PATTERN, repeats: int = 8, warmup: int = 1,
              backend: str = "tvm", plans=None, sleep=time.sleep) -> Calibration:
    """Time `side` of every runnable plan of `part` (an artifact path, a loaded part, or any
    object with `.run(plan_id, tensors, early_exit)` and `.manifest`): `warmup` untimed calls,
    then `repeats` rounds, each running every plan once after each sleep of `idle_pattern`."""
    if side not in SIDES:
        raise UsageError(f"side must be one of {SIDES}, got {side!r}")
    if not (isinstance(repeats, int) and repeats >= 1) or any(not s >= 0 for s in idle_pattern):
        raise UsageError("calibrate needs repeats >= 1 and idle sleeps >= 0 seconds")
    if isinstance(part, (str, Path)):
        from edgecut.codegen.load import load

        part = load(part, side, backend)
    plans = list(plans) if plans is not None else side_plans(part.manifest, side)
    if not plans:
        raise ArtifactError(f"nothing runs on the {side} side of this artifact: nothing to calibrate")
    tensors = _inputs(part, side, plans)
    if side == "edge":                  # what a coded plan's edge gets: the lossless stage's bytes
        tensors = {p.id: pack_tensors(tensors[p.id], getattr(p, "codec", "fp32")) for p in plans}
    heads = _heads(part, plans) if side == "device" else {}
    samples, with_heads = {p.id: [] for p in plans}, {pid: [] for pid in heads}
    for _ in range(warmup):
        for p in plans:
            _coded_call(part, side, p, dict(tensors[p.id]))
            _time_heads(heads.get(p.id, ()))
    for _ in range(repeats):
        for idle in idle_pattern:
            for p in plans:
                if idle:
                    sleep(idle)
                t = time.perf_counter()
                _coded_call(part, side, p, dict(tensors[p.id]))
                samples[p.id].append(time.perf_counter() - t)
                if p.id in heads:
                    with_heads[p.id].append(samples[p.id][-1] + _time_heads(heads[p.id]))

    def rounded(d):
        return {pid: tuple(sorted(round(x, 9) for x in s)) for pid, s in d.items()}
    return Calibration(side, _sha(part), fingerprint(runner_of(part)), time.time(), rounded(samples),
                       tuple(idle_pattern), with_heads=rounded(with_heads))


def _heads(part, plans) -> dict:
    """plan id -> [(library call, its input arrays)] of its early-exit heads, for the plans
    that have checks (inputs shaped as the manifest's tensor specs)."""
    man, rng, out = part.manifest, np.random.default_rng(1), {}
    segments, run = {s.name: s for s in man.segments}, getattr(part, "_run", {})
    for p in plans:
        names = [h for _, _, hs in man.route(p.id).checks for h in hs]
        if names and all(n in run and n in segments for n in names):
            out[p.id] = [(run[n], [_like(man.tensors[i], rng) for i in segments[n].inputs]) for n in names]
    return out


def _time_heads(calls) -> float:
    t = time.perf_counter()
    for fn, args in calls:
        fn(args)
    return time.perf_counter() - t


def default_path(part, side: str) -> Path | None:
    """`calibration-<side>.json` beside the artifact (`-<runner>` added for a wrapped part), or
    None when `part` has no artifact directory."""
    path = getattr(part, "path", None)
    if path is None or not (Path(path) / "manifest.msgpack").is_file():
        return None
    runner = runner_of(part)
    tail = "" if runner == "Part" else "-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in runner)
    return Path(path) / f"calibration-{side}{tail}.json"


def ensure_calibration(part, side: str, spec=True, **kw) -> Calibration | None:
    """The calibration to plan `side` of `part` with. `spec`: False/None (none), a Calibration
    (checked), a file path, or True (the default file beside the artifact). A file that exists
    and is newer than the manifest is checked (another artifact or machine: ArtifactError with
    the reason); a missing one, or one older than the manifest, is made (`calibrate(**kw)`) and
    saved. None when `part` has no artifact directory to calibrate from."""
    if spec is False or spec is None:
        return None
    if not side_plans(part.manifest, side):
        log.info("nothing runs on the %s side of this artifact: nothing to calibrate", side)
        return None
    machine = fingerprint(runner_of(part))
    if isinstance(spec, Calibration):
        spec.check(side, _sha(part), machine)
        return spec
    path = Path(spec) if isinstance(spec, (str, os.PathLike)) else default_path(part, side)
    if path is None:
        return None
    if path.is_file():
        cal = Calibration.load(path)
        manifest = Path(getattr(part, "path", path.parent)) / "manifest.msgpack"
        if manifest.is_file() and cal.made_at < manifest.stat().st_mtime:
            log.warning("%s is older than the artifact's manifest: calibrating again", path)
        else:
            cal.check(side, _sha(part), machine)
            return cal
    log.info("calibrating the %s side of %s (no calibration in %s yet)", side, getattr(part, "path", "?"), path)
    cal = calibrate(part, side, **kw)
    try:
        cal.save(path)
    except OSError as e:
        log.warning("cannot save the %s calibration to %s (%s): using it for this run only; pass a "
                    "writable path (--calibration FILE) to keep it", side, path, e.strerror or e)
        return cal
    return replace(cal, path=str(path))
