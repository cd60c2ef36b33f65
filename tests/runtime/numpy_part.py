"""A torch-free part with the `edgecut.load` interface (docs: the Part API), computed in numpy.

Used by the runtime tests and bench/runtime.py until (and besides) real compiled artifacts: the
sockets, server and client under test stay real; only the model is a small numpy MLP.

Model "numpy-mlp": x (1, d0) -> l1 = relu(x W1) (1, d1) -> l2 = relu(l1 W2) (1, d2) -> logits l2 W3.
Exit 0 branches after l1 (logits l1 E0). Cuts: "input" (x crosses), "after:l1", "after:l2",
"device" (nothing crosses). Plans are ids "e{exit}/{cut}" with a real PlanTable.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from edgecut.errors import ArtifactError
from edgecut.types import Cut, Plan, PlanTable

NODES = ("x", "l1", "l2")               # the crossing candidates, in order
CUT_AT = {"input": 0, "after:l1": 1, "after:l2": 2, "device": 3}


@dataclass(frozen=True)
class RunResult:
    done: bool
    outputs: dict
    exit_id: int
    seconds: float


@dataclass(frozen=True)
class Manifest:
    model: str
    table: PlanTable
    dims: tuple


def make_table(dims, bounds=(0.0, 1e6, 20e6), cuts=("device", "after:l2", "input"), exits=(1, 1, 1),
               deadline=float("inf")) -> PlanTable:
    sizes = {"input": 4 * dims[0], "after:l1": 4 * dims[1], "after:l2": 4 * dims[2], "device": 0}
    plans = []
    for cut, e in zip(cuts, exits):
        k = CUT_AT[cut]
        crossing = () if cut == "device" else (NODES[k],)
        plans.append(Plan(e, Cut(cut, frozenset(NODES[:k + 1]) if k < 3 else frozenset(NODES), crossing, sizes[cut]),
                          device_s=0.001 * k, transfer_s=0.0, edge_s=0.001 * (3 - k), accuracy=0.5 + 0.4 * e))
    return PlanTable(tuple(bounds), tuple(plans), deadline)


class NumpyPart:
    """One side ("device" or "edge") of the numpy MLP. `edge_delay`: extra seconds per edge run
    (a slow edge, for timeout tests). `exit_threshold`: entropy under which exit 0 answers."""

    def __init__(self, side: str, dims=(256, 128, 64, 10), table: PlanTable | None = None, *, seed: int = 0,
                 edge_delay: float = 0.0, exit_threshold: float = -1.0, model: str = "numpy-mlp",
                 weights: str | None = None):
        self._args = (side, dims, table), dict(seed=seed, edge_delay=edge_delay, exit_threshold=exit_threshold,
                                                model=model)
        self.side, self.dims, self.edge_delay, self.exit_threshold = side, tuple(dims), edge_delay, exit_threshold
        self.table = table or make_table(self.dims)
        rng = np.random.default_rng(seed)
        d0, d1, d2, c = self.dims
        if weights is not None:     # saved by `_saved`: mapped, as an artifact's weights are
            *self.w, self.e0 = [np.load(os.path.join(weights, f"{i}.npy"), mmap_mode="r") for i in range(4)]
        else:   # drawn in float32 (7x faster than float64 then cast: AlexNet's FC layers in 1.4 s, not 10)
            self.w = [rng.standard_normal((a, b), dtype=np.float32) * np.float32(1 / np.sqrt(a))
                      for a, b in ((d0, d1), (d1, d2), (d2, c))]
            self.e0 = rng.standard_normal((d1, c), dtype=np.float32) * np.float32(1 / np.sqrt(d1))
        self.manifest = Manifest(model, self.table, self.dims)
        self.manifest_sha256 = hashlib.sha256(json.dumps(
            {"model": model, "dims": self.dims, "seed": seed, "table": self.table.to_dict()},
            sort_keys=True).encode()).hexdigest()
        self.input_names = ["x"]
        self.fallback_plan_id = "e1/device"

    def __reduce__(self):
        """Pickled as its arguments; weights of 16 MB or more as the directory `_saved` keeps
        them in, which the copy maps (a Ray replica on this machine: AlexNet's FC layers are 234
        MB, which Ray took ~45 s to ship to two replicas, and a restarted replica that draws them
        again takes CPU from the others on 2 cores)."""
        args, kwargs = self._args
        if sum(w.nbytes for w in self.w) >= 16 << 20:
            kwargs = {**kwargs, "weights": self._saved()}
        return _rebuild, (args, kwargs)

    def _saved(self) -> str:
        d = os.path.join(tempfile.gettempdir(), f"edgecut-numpy-part-{self.manifest_sha256[:16]}")
        if not os.path.exists(os.path.join(d, "done")):
            os.makedirs(d, exist_ok=True)
            for i, w in enumerate([*self.w, self.e0]):
                np.save(os.path.join(d, f"{i}.npy"), w)
            open(os.path.join(d, "done"), "w").close()
        return d

    def _plan(self, plan_id: str) -> tuple[int, int]:
        exit_id, _, cut = plan_id.partition("/")
        if plan_id not in {p.id for p in self.table.plans} | {"e1/device", "e0/device"}:
            raise ArtifactError(f"unknown plan id {plan_id!r}")
        return int(exit_id[1:]), CUT_AT[cut]

    def _check(self, tensors: dict, name: str, shape: tuple) -> np.ndarray:
        if set(tensors) != {name}:
            raise ArtifactError(f"expected tensor {name!r}, got {sorted(tensors)}")
        a = tensors[name]
        if a.dtype != np.float32 or tuple(a.shape) != shape:
            raise ArtifactError(f"tensor {name!r}: expected float32 {shape}, got {a.dtype} {tuple(a.shape)}")
        return a

    def _layer(self, i: int, h: np.ndarray) -> np.ndarray:
        if 1 < len(h) < 4:      # OpenBLAS's sgemm at 2-3 rows is slower than as many sgemv (9216x4096:
            y = np.concatenate([h[j:j + 1] @ self.w[i] for j in range(len(h))])     # 15.5 vs 10.8 ms at 2)
        else:
            y = h @ self.w[i]
        return y if i == 2 else np.maximum(y, 0)

    def run(self, plan_id: str, tensors: dict, early_exit: bool = True) -> RunResult:
        t0 = time.perf_counter()
        exit_id, k = self._plan(plan_id)
        if self.side == "device":
            h = self._check(tensors, "x", (1, self.dims[0]))
            stop = 2 if exit_id == 0 else k
            for i in range(min(stop, 2)):
                h = self._layer(i, h)
                if i == 0 and (exit_id == 0 or (early_exit and k >= 1)):
                    logits = h @ self.e0
                    p = np.exp(logits - logits.max())
                    p /= p.sum()
                    if exit_id == 0 or float(-(p * np.log(p + 1e-12)).sum()) < self.exit_threshold:
                        return RunResult(True, {"logits": logits}, 0, time.perf_counter() - t0)
            if k == 3:
                return RunResult(True, {"logits": self._layer(2, h)}, 1, time.perf_counter() - t0)
            return RunResult(False, {NODES[k]: h}, exit_id, time.perf_counter() - t0)
        if k == 3:
            raise ArtifactError(f"plan {plan_id!r} has no edge part")
        h = self._check(tensors, NODES[k], (1, self.dims[k]))
        for i in range(k, 3):
            h = self._layer(i, h)
        if self.edge_delay:
            time.sleep(self.edge_delay)
        return RunResult(True, {"logits": h}, exit_id, time.perf_counter() - t0)

    def run_batch(self, plan_id: str, tensors: list) -> list:
        """The edge side's results for several requests of one plan, computed as one batch
        (one matrix product per layer, as a batch-N library would)."""
        exit_id, k = self._plan(plan_id)
        if self.side != "edge" or k == 3:
            raise ArtifactError(f"plan {plan_id!r}: run_batch is for the edge part")
        t0 = time.perf_counter()
        h = np.concatenate([self._check(t, NODES[k], (1, self.dims[k])) for t in tensors])
        for i in range(k, 3):
            h = self._layer(i, h)
        if self.edge_delay:
            time.sleep(self.edge_delay)
        dt = time.perf_counter() - t0
        return [RunResult(True, {"logits": h[j:j + 1]}, exit_id, dt) for j in range(len(tensors))]

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The full model's logits, for checking answers."""
        h = x
        for i in range(3):
            h = self._layer(i, h)
        return h


def _rebuild(args, kwargs):
    return NumpyPart(*args, **kwargs)
