"""The replicas of one model's edge part on Ray Serve, as the tier's front sees them.

`EdgeReplica` is the Serve deployment (one replica: the edge part, `run_many` runs a batch).
`ReplicaSet` keeps the front's list of live replica actors: a refresher thread re-lists them by
name (`SERVE_REPLICA::<app>#edge#...`) every `refresh_s` and at once after a failure, probes a
new one before using it, and hands out call slots (`per_replica` calls in flight each).
Imported by runtime/tier.py, which sets Serve's environment first.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import uuid

from edgecut.errors import ArtifactError
from edgecut.runtime.executor import Expired, run_batch

log = logging.getLogger("edgecut.runtime.tier")

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - tier.start_ray says what to do
    ray = serve = None

_QUIET = {"enable_access_log": False, "log_level": "WARNING"}


if serve is not None:
    @serve.deployment(name="edge", logging_config=_QUIET)
    class EdgeReplica:
        """One replica of a model's edge part. `artifact`: a path (loaded here, so a replica on
        another machine needs the artifact at the same path) or a picklable part."""

        def __init__(self, artifact, backend: str = "tvm"):
            if isinstance(artifact, (str, os.PathLike)):
                from edgecut.codegen.load import load
                artifact = load(artifact, side="edge", backend=backend)
            self.part = artifact

        async def run_many(self, plan_id: str, budgets: list, *tensors: dict):
            """One reply per request: ('ok', outputs, edge seconds, batch size), ('expired',)
            (its budget, seconds from now, ran out before it started) or ('bad', message).
            Each request's tensors are an argument of their own: Ray sends an argument under
            100 KB inline with the call, where a list of them would go through the object store.
            async: it computes on the replica's user-code event loop, without Serve's hop to a
            worker thread for a plain method (one computes at a time either way)."""
            now = time.monotonic()
            live = [i for i, b in enumerate(budgets) if b > 0]
            replies: list = [("expired",)] * len(budgets)
            if not live:
                return replies
            try:
                outs, seconds = run_batch(self.part, plan_id, [tensors[i] for i in live])
                for i, out in zip(live, outs):
                    replies[i] = ("ok", out, seconds, len(live))
            except ArtifactError:       # one request's bad tensors must not fail the others
                for i in live:
                    if time.monotonic() - now >= budgets[i]:
                        continue
                    try:
                        (out,), seconds = run_batch(self.part, plan_id, [tensors[i]])
                        replies[i] = ("ok", out, seconds, 1)
                    except ArtifactError as e:
                        replies[i] = ("bad", str(e))
            return replies

        async def pid(self) -> int:
            """The probe (and the empty call `overhead_s` times): async like run_many, so it
            takes the same path through the replica (a plain method adds Serve's thread hop,
            ~1.5 ms here)."""
            return os.getpid()



class ReplicaSet:
    """The live replicas of Serve application `app` and this front's calls in flight to each
    (see the module docstring). Subclasses set `_est_s` (one edge run, for slot waits)."""

    def __init__(self, app: str, per_replica: int, refresh_s: float):
        self.app, self.per_replica, self.refresh_s = app, per_replica, refresh_s
        self._est_s = 0.005         # running estimate of one replica call's compute
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)     # a replica's slot freed, or a request queued
        self._refresh_now = threading.Event()
        self._refresher: threading.Thread | None = None
        self._inflight: dict[str, int] = {}
        self._actors: dict[str, object] = {}
        self._probes: dict[str, tuple] = {}
        self._probe_after: dict[str, float] = {}
        self._orphans: list = []
        self._refreshed = 0.0
        self._closed = False

    def _hop(self, n: int = 21) -> float:
        """Median seconds of an empty call to a replica: what the tier adds to each edge time."""
        ts = []
        for _ in range(n):
            name, actor = self._pick(None, time.monotonic() + 10)
            if actor is None:
                return 0.0
            t = time.perf_counter()
            try:
                ray.get(actor.handle_request.remote(_metadata(self.app, "pid")), timeout=10)
            except Exception:
                return 0.0
            finally:
                self._release(name)
            ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2]

    def replica_names(self) -> list[str]:
        prefix = f"SERVE_REPLICA::{self.app}#edge#"
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a.get("namespace") == "serve" and a["name"].startswith(prefix))

    def _refresh(self, force: bool = False) -> None:
        """Have the replicas re-listed: the refresher thread does it every refresh_s, and at once
        when forced, so that no request waits on Ray's actor listing (slow while the cluster
        restarts a replica); during construction, before that thread, it is done here. A new
        replica is used once it has answered a probe: Serve names a replica's actor before the
        replica is initialised, and it refuses requests until then."""
        if self._refresher is not None:
            if force:
                self._refresh_now.set()
        elif force or time.monotonic() - self._refreshed >= self.refresh_s:
            self._relist()

    def _refresh_loop(self) -> None:
        while not self._closed:
            self._refresh_now.wait(self.refresh_s)
            self._refresh_now.clear()
            if self._closed:
                return
            try:
                self._relist()
            except Exception as e:  # the cluster busy or going: try again next round
                log.warning("%s: listing the replicas failed: %s", self.app, e)

    def _relist(self) -> None:
        self._refreshed = now = time.monotonic()
        names = set(self.replica_names())
        with self._lock:
            actors = {n: a for n, a in self._actors.items() if n in names}
            probes = {n: p for n, p in self._probes.items() if n in names}
        self._orphans += [p[1] for n, p in self._probes.items() if n not in names]
        if self._orphans:               # probes of replicas gone since: read their errors, drop them
            done, self._orphans = ray.wait(self._orphans, num_returns=len(self._orphans), timeout=0)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception:
                    pass
        self._probe_after = {n: t for n, t in self._probe_after.items() if n in names}
        for n in names - set(actors) - set(probes):
            if self._probe_after.get(n, 0.0) > now:
                continue
            try:
                actor = ray.get_actor(n, namespace="serve")
            except ValueError:          # gone between the listing and the lookup
                continue
            probes[n] = (actor, actor.handle_request.remote(_metadata(self.app, "pid")))
        fresh = set()
        if probes:
            ready, _ = ray.wait([p for _, p in probes.values()], num_returns=len(probes), timeout=0)
            for n, (actor, ref) in list(probes.items()):
                if ref in ready:
                    del probes[n]
                    try:
                        ray.get(ref)
                        actors[n] = actor
                        fresh.add(n)
                    except Exception:   # not initialised yet (or dying): probe again shortly
                        self._probe_after[n] = now + 0.2
        with self._lock:                # one a failed call dropped meanwhile stays out till probed again
            self._actors = {n: a for n, a in actors.items() if n in self._actors or n in fresh}
            self._probes = probes
            self._inflight = {n: self._inflight.get(n, 0) for n in actors}
            self._free.notify_all()

    def _pick(self, avoid: str | None, expiry: float):
        """The replica with the fewest of this front's calls in flight, below `per_replica`;
        (None, None) when none is up. Waits for a free slot until `expiry` (then `Expired`)."""
        while True:
            self._refresh()
            with self._free:
                names = [n for n in self._actors if n != avoid] or list(self._actors)
                if not names:
                    return None, None
                free = [n for n in names if self._inflight.get(n, 0) < self.per_replica]
                if free:
                    name = min(free, key=lambda n: self._inflight.get(n, 0))
                    self._inflight[name] = self._inflight.get(name, 0) + 1
                    return name, self._actors[name]
                wait = expiry - time.monotonic() - self._est_s
                if wait <= 0:
                    raise Expired()
                self._free.wait(min(wait, self.refresh_s))

    def _release(self, name: str) -> None:
        with self._free:
            if name in self._inflight:
                self._inflight[name] -= 1
                self._free.notify_all()

    def _idle_slot(self):
        """(With self._lock held) (name, actor) of a replica with no call in flight, its slot
        taken (the tier's batch-1 latency path, when nothing is queued); else None."""
        for name, n in self._inflight.items():
            if n == 0 and name in self._actors:
                self._inflight[name] = 1
                return name, self._actors[name]
        return None


def _metadata(app: str, method: str) -> bytes:
    from ray.serve._private.common import RequestMetadata

    rid = uuid.uuid4().hex
    return pickle.dumps(RequestMetadata(request_id=rid, internal_request_id=rid, call_method=method,
                                        app_name=app))
