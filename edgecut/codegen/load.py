"""`edgecut.load(path, side="device" | "edge")`: run one side of an artifact. Torch-free.

Needs only numpy, msgpack and the TVM *runtime* (`tvm.runtime.load_module`,
`tvm.runtime.vm.VirtualMachine`: a Pi's runtime-only TVM has no `tvm.relax`), or onnxruntime
with `backend="onnxruntime"`. Under backend="tvm" a segment whose Library says "onnxruntime"
(TVM could not build it, or the artifact was built with backend="onnxruntime") runs on
onnxruntime, the rest on TVM. Every file the side uses is checked against the manifest's sha256
before anything is loaded.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecut.codegen.manifest import Manifest, entropy, load_arrays, verify_files
from edgecut.errors import ArtifactError

SIDES = ("device", "edge")
BACKENDS = ("tvm", "onnxruntime")


@dataclass(frozen=True)
class RunResult:
    """`done`: the logits are in `outputs["logits"]`; otherwise `outputs` are the crossing
    tensors {fx node name: array} to send to the edge. `exit_id`: the exit whose logits were (or
    will be) produced. `seconds`: wall time of the call."""

    plan_id: str
    done: bool
    outputs: dict
    exit_id: int
    seconds: float


class WeightStore:
    """A side's shared weights (`Library.weights`): read once, each array made a TVM tensor
    once, and that tensor passed to every library that uses it."""

    def __init__(self, path: Path):
        self.path, self._arrays, self._tensors = Path(path), None, {}

    def tensor(self, key: str, dev):
        if key not in self._tensors:
            if self._arrays is None:
                self._arrays = load_arrays(self.path)
            if key not in self._arrays:
                raise ArtifactError(f"{self.path} lacks weight {key[:12]}...: rebuild the artifact")
            import tvm

            self._tensors[key] = tvm.runtime.tensor(np.ascontiguousarray(self._arrays[key]), dev)
        return self._tensors[key]


class _TvmSegment:
    def __init__(self, lib_path: Path, params_path: Path, target_kind: str, store: WeightStore | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        self.dev = tvm.cuda(0) if target_kind == "cuda" else tvm.cpu(0)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.dev)
        self.main = self.vm["main"]
        self.params = []
        for p in load_arrays(params_path):
            if isinstance(p, dict) and "ref" in p:
                if store is None:
                    raise ArtifactError(f"{params_path} refers to shared weights, but its library names no store")
                self.params.append(store.tensor(p["ref"], self.dev))
            else:
                self.params.append(tvm.runtime.tensor(np.ascontiguousarray(p), self.dev))

    def run(self, inputs) -> list[np.ndarray]:
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(x), self.dev) for x in inputs]
        out = self.main(*args, *self.params)
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


class Part:
    """One side of an artifact, ready to run (see `edgecut.load`)."""

    def __init__(self, path: str | Path, side: str = "device", backend: str = "tvm", *, verify: bool = True):
        if side not in SIDES:
            raise ArtifactError(f"side must be one of {SIDES}, got {side!r}")
        if backend not in BACKENDS:
            raise ArtifactError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.path, self.side, self.backend = Path(path), side, backend
        self._onnx_segments: set = set()      # segments that run on ONNX Runtime under backend="tvm"
        self.manifest = m = Manifest.read(self.path)
        self.table = m.table
        self.fallback_plan_id = m.fallback.id
        self.input_names = tuple(t.name for t in m.inputs) if side == "device" else ()
        self._segments = {s.name: s for s in m.segments}
        needed = self.segments_needed(m, side)
        files = self._files(needed)
        batched = {}            # batch size -> segment -> (file, params, weights): the edge's batch-N code
        if side == "edge" and backend == "tvm":
            for n in m.batch_sizes("edge"):
                libs = m.libraries_of("edge", "tvm", n)
                batched[n] = {s: (libs[s].file, libs[s].params, libs[s].weights) for s in needed if s in libs}
        if verify:
            verify_files(self.path, m, sorted({f for group in (files, *batched.values()) for names in group.values()
                                               for f in names if f}))
        self._stores: dict = {}
        self._run = {name: self._open(name, *files[name]) for name in needed}
        self._batched = {n: {name: self._open(name, *fs) for name, fs in group.items()}
                         for n, group in batched.items()}

    @staticmethod
    def segments_needed(m: Manifest, side: str) -> list[str]:
        names = set()
        for r in m.routes.values():
            if side == "device":
                names.update(r.device)
                names.update(h for _, _, heads in r.checks for h in heads)
            else:
                names.update(r.edge)
        return [s.name for s in m.segments if s.name in names]

    def _files(self, needed) -> dict:
        if self.backend == "onnxruntime":
            missing = [s for s in needed if not self.manifest.onnx.get(s)]
            if missing:
                raise ArtifactError(f"{self.path}: no ONNX copy of segments {missing}; rebuild with onnx=True")
            return {s: (self.manifest.onnx[s], "", "") for s in needed}
        libs = self.manifest.libraries_of(self.side, None)  # TVM, or ONNX Runtime where TVM could not build
        missing = [s for s in needed if s not in libs]
        if missing:
            raise ArtifactError(f"{self.path}: no TVM library of segments {missing} for the {self.side}; "
                                "use backend='onnxruntime' or rebuild with backend='tvm'")
        arch = platform.machine()
        for s in needed:
            lib = libs[s]
            if lib.backend != "tvm":
                continue
            if lib.arch != arch and not (lib.arch in ("aarch64", "arm64") and arch in ("aarch64", "arm64")):
                raise ArtifactError(f"{self.path}: the {self.side} libraries were built for {lib.arch} "
                                    f"(target {lib.target}), this machine is {arch}; run them there, or "
                                    "use backend='onnxruntime' here")
        self._onnx_segments = {s for s in needed if libs[s].backend == "onnxruntime"}
        return {s: (libs[s].file, libs[s].params, libs[s].weights) for s in needed}

    def _open(self, name: str, file: str, params: str, weights: str = ""):
        seg = self._segments[name]
        if self.backend == "onnxruntime" or name in self._onnx_segments:
            from edgecut.codegen.onnx_export import OnnxSegment

            return OnnxSegment(self.path / file, seg.inputs).run
        kind = self.manifest.targets.get(self.side, {}).get("tvm", {}).get("kind", "llvm")
        store = self._stores.setdefault(weights, WeightStore(self.path / weights)) if weights else None
        return _TvmSegment(self.path / file, self.path / params, kind, store).run

    # --- running ---------------------------------------------------------------------------
    def _check_tensors(self, tensors, names, what: str) -> None:
        if not isinstance(tensors, dict):
            raise ArtifactError(f"{what}: tensors must be a dict name -> numpy array")
        if set(tensors) != set(names):
            raise ArtifactError(f"{what}: expected tensors {sorted(names)}, got {sorted(tensors)}")
        for n in names:
            spec = self.manifest.tensors.get(n) or next(t for t in self.manifest.inputs if t.name == n)
            spec.check(tensors[n], what)

    def _segment(self, name: str, env: dict) -> None:
        seg = self._segments[name]
        outs = self._run[name]([env[i] for i in seg.inputs])
        env.update(zip(seg.outputs, outs))

    def run(self, plan_id: str, tensors: dict, early_exit: bool = True) -> RunResult:
        """Run this side's part of plan `plan_id` (see `RunResult`)."""
        t0 = time.perf_counter()
        route = self.manifest.route(plan_id)
        what = f"plan {plan_id!r} on the {self.side}"
        env = dict(tensors) if isinstance(tensors, dict) else tensors
        if self.side == "edge":
            if route.device_only:
                raise ArtifactError(f"{what}: the plan is device-only, nothing runs on the edge")
            self._check_tensors(tensors, route.crossing, what)
            for name in route.edge:
                self._segment(name, env)
            logits = env[self.manifest.exit(route.exit).output]
            return RunResult(plan_id, True, {"logits": logits}, route.exit, time.perf_counter() - t0)
        self._check_tensors(tensors, self.input_names, what)
        checks = route.checks if early_exit else ()
        for k in range(len(route.device) + 1):
            for kk, eid, heads in checks:
                if kk != k:
                    continue
                for name in heads:
                    self._segment(name, env)
                ex = self.manifest.exit(eid)
                logits = env[ex.output]
                if not math.isnan(ex.threshold) and entropy(logits) < ex.threshold:
                    return RunResult(plan_id, True, {"logits": logits}, eid, time.perf_counter() - t0)
            if k < len(route.device):
                self._segment(route.device[k], env)
        if route.device_only:
            logits = env[self.manifest.exit(route.exit).output]
            return RunResult(plan_id, True, {"logits": logits}, route.exit, time.perf_counter() - t0)
        return RunResult(plan_id, False, {c: env[c] for c in route.crossing}, route.exit, time.perf_counter() - t0)

    def run_batch(self, plan_id: str, tensors: list) -> list:
        """The edge side of plan `plan_id` for several requests (each a dict of batch-1 tensors),
        one RunResult each. Runs them as one batch on the batch-N libraries (the smallest size
        built that holds them, zero rows padding the rest; more than the largest: several
        batches), or one after the other where the plan's edge segments have none."""
        route = self.manifest.route(plan_id)
        what = f"plan {plan_id!r} on the {self.side}"
        if self.side != "edge" or route.device_only:
            raise ArtifactError(f"{what}: run_batch runs edge parts only")
        for t in tensors:
            self._check_tensors(t, route.crossing, what)
        sizes = [n for n in sorted(self._batched) if all(s in self._batched[n] for s in route.edge)]
        results, i = [], 0
        while i < len(tensors):
            chunk = tensors[i:i + (sizes[-1] if sizes else 1)]
            i += len(chunk)
            if len(chunk) == 1:
                results.append(self.run(plan_id, chunk[0]))
                continue
            t0, n = time.perf_counter(), next(n for n in sizes if n >= len(chunk))
            env = {}
            for c in route.crossing:
                rows = np.concatenate([t[c] for t in chunk])
                env[c] = np.concatenate([rows, np.zeros((n - len(chunk), *rows.shape[1:]), rows.dtype)])
            for name in route.edge:
                seg = self._segments[name]
                env.update(zip(seg.outputs, self._batched[n][name]([env[k] for k in seg.inputs])))
            logits, dt = env[self.manifest.exit(route.exit).output], time.perf_counter() - t0
            results += [RunResult(plan_id, True, {"logits": np.ascontiguousarray(logits[j:j + 1])}, route.exit, dt)
                        for j in range(len(chunk))]
        return results

    def __repr__(self) -> str:
        return (f"Part({str(self.path)!r}, side={self.side!r}, backend={self.backend!r}, "
                f"segments={list(self._run)}, plans={len(self.manifest.routes)})")


def load(path: str | Path, side: str = "device", backend: str = "tvm", *, verify: bool = True) -> Part:
    """Load one side of the artifact directory `path`: `part.run(plan_id, tensors)`.

    Refuses files whose sha256 differs from the manifest and manifests of a newer format."""
    return Part(path, side, backend, verify=verify)
