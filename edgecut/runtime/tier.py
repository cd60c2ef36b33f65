"""The edge tier: edge parts run as Ray Serve deployments, the device-facing front stays edgecut's.

`start_ray(address)` joins the cluster at `address` (or starts a local one). `RayExecutor(part)`
deploys one model as its own Serve application (`edgecut-<model>-<sha12>`, deployment `edge`)
with its own replica bounds: Serve places the replicas, scales them between `min_replicas` and
`max_replicas` on the ongoing requests per replica, and restarts one that dies.

The front calls a replica as a plain Ray actor (the replica actor's `handle_request`, with the
request metadata a Serve handle would send), not through a `DeploymentHandle`: measured here, a
handle call costs ~4-7 ms at the median, an actor call ~1-2 ms. The replicas are found by name
(`SERVE_REPLICA::<app>#edge#...`) every `refresh_s` and after any failure; each request goes to
the replica with the fewest requests in flight from this front. This uses Serve internals pinned
by `ray[serve]==2.60.0`; `route="handle"` uses the public DeploymentHandle instead. The median
of an empty call at start (`overhead_s`) is added to the edge times the welcome sends, so a
device plans with what the tier costs it; online correction sees the rest (queue_s).

Batching: a request that finds others in flight for its model, and whose remaining time leaves
room for the batch wait plus a full batch, goes to the replica's `run_batched` (`@serve.batch`, up to `max_batch` requests from any devices,
waiting at most `batch_wait_s`); any other request takes `run`, the batch-1 latency path. The
artifacts are compiled at batch 1, so a batch is its requests run back to back in one replica
call: it saves the front->replica hop per request, not compute. A replica that dies mid-request
costs that request one retry on another replica if its deadline still leaves an edge run;
otherwise it expires in time and the device answers from its local exit.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import uuid

from edgecut.errors import ArtifactError, UsageError
from edgecut.runtime.executor import Busy, Expired, run_part

log = logging.getLogger("edgecut.runtime.tier")

# Serve must count a replica's queue where the requests arrive (the replica), not in the handle:
# the front bypasses the handle.
_ENV = {"RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
os.environ.update(_ENV)

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - the message says what to do
    ray = serve = None



class _NoReplica(Exception):
    """No replica of the model is up right now (all restarting)."""


_FAILED = (_NoReplica,) + ((ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                            ray.exceptions.WorkerCrashedError) if ray is not None else ())
_QUIET = {"enable_access_log": False, "log_level": "WARNING"}


def _need_ray() -> None:
    if ray is None:
        raise UsageError("the edge tier needs Ray Serve: pip install 'edgecut[tier]' "
                         "(ray[serve]==2.60.0, prometheus-client)")


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at `address` ('auto': the one `ray start` made here), or start a
    local one (`address` None). Does nothing when Ray is already initialised."""
    _need_ray()
    if ray.is_initialized():
        return
    kw = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False,
              runtime_env={"env_vars": dict(_ENV)})
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, **kw)
    serve.start(logging_config=_QUIET)


if serve is not None:
    @serve.deployment(name="edge", logging_config=_QUIET)
    class EdgeReplica:
        """One replica of a model's edge part. `artifact`: a path (loaded here, so a replica on
        another machine needs the artifact at the same path) or a picklable part."""

        def __init__(self, artifact, backend: str = "tvm", max_batch: int = 8, batch_wait_s: float = 0.002):
            if isinstance(artifact, (str, os.PathLike)):
                from edgecut.codegen.load import load
                artifact = load(artifact, side="edge", backend=backend)
            self.part = artifact
            self.run_batched.set_max_batch_size(max_batch)
            self.run_batched.set_batch_wait_timeout_s(batch_wait_s)

        def run(self, plan_id: str, tensors: dict, budget_s: float):
            return _run_one(self.part, plan_id, tensors, time.monotonic() + budget_s, 1)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
        async def run_batched(self, plan_ids, tensors, budgets):
            now, n = time.monotonic(), len(plan_ids)
            return [_run_one(self.part, p, t, now + b, n) for p, t, b in zip(plan_ids, tensors, budgets)]

        def pid(self) -> int:
            return os.getpid()


def _run_one(part, plan_id: str, tensors: dict, expiry: float, batch: int):
    """('ok', outputs, edge seconds, batch size), ('expired',) or ('bad', message)."""
    if time.monotonic() >= expiry:
        return ("expired",)
    try:
        out, seconds = run_part(part, plan_id, tensors)
    except ArtifactError as e:
        return ("bad", str(e))
    return ("ok", out, seconds, batch)


class RayExecutor:
    """Run one model's edge part on the Ray cluster (see the module docstring). `artifact` is
    what `EdgeReplica` loads; `part` the front's own copy (model name and hash, plans)."""

    where = "ray"

    def __init__(self, part, artifact=None, *, min_replicas: int = 1, max_replicas: int = 2, max_batch: int = 8,
                 batch_wait_s: float = 0.002, batching: bool = True, max_queue: int = 256, backend: str = "tvm",
                 replica_cpus: float = 1.0, route: str = "direct", refresh_s: float = 1.0,
                 target_ongoing: float | None = None):
        _need_ray()
        from edgecut.runtime import protocol as P
        if not 1 <= min_replicas <= max_replicas:
            raise UsageError(f"replica bounds {min_replicas}:{max_replicas}: need 1 <= MIN <= MAX")
        model, sha = P.manifest_identity(part)
        self.app = f"edgecut-{model}-{sha[:12]}"
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.batching = batching and max_batch > 1
        self.per_replica = max_batch if self.batching else 2
        self.max_queue, self.route, self.refresh_s = max_queue, route, refresh_s
        self.max_replicas = max_replicas
        self._est_s = 0.005         # running estimate of one edge run, for the batch decision
        app = EdgeReplica.options(
            max_ongoing_requests=max(2 * max_batch, 8),
            ray_actor_options={"num_cpus": replica_cpus},
            autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                                "initial_replicas": min_replicas,
                                "target_ongoing_requests": target_ongoing or max(1.0, self.per_replica / 2),
                                "upscale_delay_s": 2.0, "downscale_delay_s": 30.0, "metrics_interval_s": 0.5,
                                "look_back_period_s": 2.0},
        ).bind(artifact if artifact is not None else part, backend, max_batch, batch_wait_s)
        self.handle = serve.run(app, name=self.app, route_prefix=None)
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)     # a replica's slot freed
        self._refreshing = threading.Lock()
        self._pending = 0
        self._inflight: dict[str, int] = {}
        self._actors: dict[str, object] = {}
        self._probes: dict[str, tuple] = {}
        self._probe_after: dict[str, float] = {}
        self._orphans: list = []
        self._refreshed = 0.0
        end = time.monotonic() + 60
        while len(self._actors) < min_replicas and time.monotonic() < end:
            self._refresh(force=True)
            time.sleep(0.02)
        self.overhead_s = self._hop()

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

    # ------------------------------------------------------------------------------ replicas
    @property
    def pending(self) -> int:
        return self._pending

    def replica_names(self) -> list[str]:
        prefix = f"SERVE_REPLICA::{self.app}#edge#"
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a.get("namespace") == "serve" and a["name"].startswith(prefix))

    def _refresh(self, force: bool = False) -> None:
        """Re-list the replicas. A new one is used once it has answered a probe: Serve names a
        replica's actor before the replica is initialised, and it refuses requests until then."""
        if not force and time.monotonic() - self._refreshed < self.refresh_s:
            return
        if not self._refreshing.acquire(blocking=False):
            return                      # another thread is at it
        try:
            self._relist()
        finally:
            self._refreshing.release()

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
        if probes:
            ready, _ = ray.wait([p for _, p in probes.values()], num_returns=len(probes), timeout=0)
            for n, (actor, ref) in list(probes.items()):
                if ref in ready:
                    del probes[n]
                    try:
                        ray.get(ref)
                        actors[n] = actor
                    except Exception:   # not initialised yet (or dying): probe again shortly
                        self._probe_after[n] = now + 0.2
        with self._lock:
            self._actors, self._probes = actors, probes
            self._inflight = {n: self._inflight.get(n, 0) for n in actors}
            self._free.notify_all()

    def _pick(self, avoid: str | None, expiry: float):
        """The replica with the fewest of this front's requests in flight, below `per_replica`
        (max_batch when batching, else 2: one computing, one on its way). When all are full the
        request waits here, in the front, where it can expire without costing a replica any
        compute: a replica never works on a request that is already late."""
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
                self._free.notify()

    # ------------------------------------------------------------------------------ requests
    def infer(self, plan_id: str, tensors: dict, received: float, expiry: float, abandon=None):
        with self._lock:
            if self._pending >= self.max_queue:
                raise Busy(f"edge tier queue is full ({self.max_queue} requests in flight); retry or run locally")
            self._pending += 1
        try:
            return self._infer(plan_id, tensors, received, expiry)
        finally:
            with self._lock:
                self._pending -= 1

    def _infer(self, plan_id: str, tensors: dict, received: float, expiry: float):
        avoid, tries = None, 0
        while True:
            started = time.monotonic()
            left = expiry - started
            if left <= 0:
                raise Expired()
            batched = (self.batching and self._pending > 1      # alone: the batch-1 latency path
                       and left > self.batch_wait_s + (self.max_batch + 1) * self._est_s)
            try:
                reply = self._call(plan_id, tensors, left, batched, avoid)
            except _NoReplica:          # all restarting: give Serve a moment, while the deadline allows
                time.sleep(max(0.0, min(0.05, expiry - time.monotonic() - self._est_s)))
                self._refresh(force=True)
                continue
            except _FAILED as e:
                tries += 1
                self._refresh(force=True)
                left = expiry - time.monotonic()
                if tries > 1 or left < 2 * self._est_s:
                    log.info("%s: replica failed (%s); %s", self.app, type(e).__name__,
                                "no time left for a retry" if tries == 1 else "retry failed too")
                    raise Expired() from None     # answered now: the device runs its local exit
                avoid = getattr(e, "_edgecut_replica", None)
                continue
            if reply[0] == "expired":
                raise Expired()
            if reply[0] == "bad":
                raise ArtifactError(reply[1])
            _, out, edge_s, batch = reply
            self._est_s = 0.9 * self._est_s + 0.1 * edge_s
            return out, max(0.0, time.monotonic() - started - edge_s), edge_s, batch

    def _call(self, plan_id, tensors, left: float, batched: bool, avoid):
        method = "run_batched" if batched else "run"
        budget = left - (self.batch_wait_s if batched else 0.0)
        if self.route == "handle":
            resp = getattr(self.handle, method).remote(plan_id, tensors, budget)
            try:
                return resp.result(timeout_s=left)
            except TimeoutError:
                resp.cancel()
                raise Expired() from None
        name, actor = self._pick(avoid, time.monotonic() + left)
        if actor is None:
            raise _NoReplica()
        try:
            ref = actor.handle_request.remote(_metadata(self.app, method), plan_id, tensors, budget)
            try:
                return ray.get(ref, timeout=left)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref)
                raise Expired() from None
        except _FAILED as e:
            e._edgecut_replica = name
            raise
        finally:
            self._release(name)

    def close(self) -> None:
        try:
            serve.delete(self.app)
        except Exception as e:  # the cluster may already be gone
            log.warning("could not delete %s: %s", self.app, e)


def _metadata(app: str, method: str) -> bytes:
    from ray.serve._private.common import RequestMetadata

    rid = uuid.uuid4().hex
    return pickle.dumps(RequestMetadata(request_id=rid, internal_request_id=rid, call_method=method,
                                        app_name=app))
