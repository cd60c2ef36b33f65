"""Where the edge server's compute runs: the seam between the device-facing front and the parts.

The front (`runtime.server.EdgeServer`) owns everything a device sees: the protocol, the challenge
and token, frame limits, per-request deadlines, error replies. An executor owns one model's edge
part and runs requests for it. `LocalExecutor` is the single-process server of old: `workers`
compute slots in this process, behind a bounded queue. `runtime.tier.RayExecutor` sends them to
replicas on a Ray cluster. Both answer `infer(plan_id, tensors, received, expiry, abandon)` with
(outputs, queue seconds, edge seconds, batch size), or raise `Expired` (the deadline passed first),
`Busy` (admission refused it: answer at once) or `ArtifactError` (the part refused the tensors).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from edgecut.errors import ArtifactError


class Expired(Exception):
    """The request's deadline passed before its answer was ready."""


class Busy(Exception):
    """Admission refused the request: the executor's queue is full."""


class LocalExecutor:
    """Run `part` in this process. At most `workers` requests compute at once: one that finds a
    free slot and nobody queued runs on the caller's (connection) thread, with no handoff between
    threads; otherwise it waits, first come first served, for a pool of `workers` threads behind a
    queue (`workers + max_queue` pending: `Busy`). A queued request abandoned at its deadline is
    cancelled if it has not started; one running on its connection thread cannot be abandoned,
    so it is reported `Expired` when it finishes late."""

    where = "local"

    def __init__(self, part, workers: int = 2, max_queue: int = 64):
        self.part, self.workers, self.max_queue = part, workers, max_queue
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edgecut-edge")
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._pending = 0       # requests admitted and not finished (busy beyond workers + max_queue)
        self._running = 0       # requests computing now, on a connection thread or the pool: <= workers
        self._waiting = 0       # requests queued for the pool, not yet computing

    @property
    def pending(self) -> int:
        return self._pending

    def infer(self, plan_id: str, tensors: dict, received: float, expiry: float, abandon=None):
        with self._lock:
            if self._pending >= self.workers + self.max_queue:
                raise Busy(f"edge queue is full ({self.max_queue} waiting); retry or run locally")
            self._pending += 1
            inline = self._running < self.workers and self._waiting == 0
            if inline:
                self._running += 1
            else:
                self._waiting += 1
        if inline:          # a free slot and nobody ahead: compute here, no thread handoff
            try:
                out = self._run(plan_id, tensors, received, expiry)
                if time.monotonic() > expiry:
                    raise Expired()
                return out
            finally:
                with self._lock:
                    self._pending -= 1
                    self._release_slot()
        fut = self._pool.submit(self._queued, plan_id, tensors, received, expiry)
        fut.add_done_callback(self._done)
        try:
            return fut.result(timeout=max(0.0, expiry - time.monotonic()))
        except FutureTimeout:
            if not fut.cancel() and abandon:
                abandon()       # the abandoned run may still read the tensors
            raise Expired() from None

    def _release_slot(self) -> None:       # with self._lock held
        self._running -= 1
        self._slot_free.notify()

    def _done(self, fut) -> None:
        with self._lock:
            self._pending -= 1
            if fut.cancelled():            # never reached _queued
                self._waiting -= 1

    def _queued(self, plan_id: str, tensors: dict, received: float, expiry: float):
        """A pool worker: wait for a compute slot (connection threads may hold them), then run."""
        with self._slot_free:
            while self._running >= self.workers:
                self._slot_free.wait()
            self._running += 1
            self._waiting -= 1
        try:
            return self._run(plan_id, tensors, received, expiry)
        finally:
            with self._lock:
                self._release_slot()

    def _run(self, plan_id: str, tensors: dict, received: float, expiry: float):
        started = time.monotonic()
        if started >= expiry:
            raise Expired()
        outputs, edge_s = run_part(self.part, plan_id, tensors)
        return outputs, started - received, edge_s, 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_part(part, plan_id: str, tensors: dict) -> tuple[dict, float]:
    """The edge part's outputs for one request, and the seconds it took."""
    started = time.perf_counter()
    res = part.run(plan_id, tensors)
    if not res.done:
        raise ArtifactError(f"edge part did not finish plan {plan_id!r}")
    return res.outputs, time.perf_counter() - started


def run_batch(part, plan_id: str, tensors: list) -> tuple[list, float]:
    """The edge part's outputs for several requests of one plan, and the seconds they took
    together: one batched run where the part has `run_batch` (batch-N libraries), else one run
    after the other. Raises ArtifactError if any request's tensors are refused."""
    started = time.perf_counter()
    batched = getattr(part, "run_batch", None)
    if batched is not None and len(tensors) > 1:
        results = batched(plan_id, tensors)
    else:
        results = [part.run(plan_id, t) for t in tensors]
    if not all(r.done for r in results):
        raise ArtifactError(f"edge part did not finish plan {plan_id!r}")
    return [r.outputs for r in results], time.perf_counter() - started
