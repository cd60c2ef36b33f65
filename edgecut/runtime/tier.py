"""The edge tier: edge parts run as Ray Serve deployments, the device-facing front stays edgecut's.

`start_ray(address)` joins the cluster at `address` (or starts a local one). `RayExecutor(part)`
deploys one model as its own Serve application (`edgecut-<model>-<sha12>`, deployment `edge`)
with its own replica bounds: Serve places the replicas, scales them between `min_replicas` and
`max_replicas` on the ongoing requests per replica, and restarts one that dies.

The front (this module) reaches a replica (runtime/replicas.py) two ways. Through Ray: the replica
actor's `handle_request`, with the request metadata a Serve handle would send, not through a
`DeploymentHandle` (measured here, a handle call costs ~4-7 ms at the median, an actor call
~1-3 ms); each request's tensors go as an argument of their own, so that Ray sends them inline
with the call (a batch of eight 36 KB requests in one list went through its object store). And
over the replica's data port: a TCP connection to the replica, opened with a token the probe
returned through Ray, carrying the same batch in edgecut's msgpack frames (one device through a 20 ms
RTT link: 1.02-1.05x the single process over the port, 1.13-1.18x through Ray). Serve counts only the requests of its own call path
when it autoscales, so the port carries the latency path (a lone request, below) always, and
batches too when the replica count is fixed (`min_replicas == max_replicas`: nothing to scale);
with autoscaling, batches go through Ray. A port the front cannot reach (another machine's
firewall) is dropped for that replica, which is then called through Ray. The replicas are found
by name (`SERVE_REPLICA::<app>#edge#...`) every `refresh_s` and after any failure. This uses
Serve internals pinned by `ray[serve]==2.60.0`; `route="handle"` uses the public
DeploymentHandle instead (and no port). Replicas keep Serve's user-code thread: on Serve's own
event loop (`RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`, tried) a computing replica holds up
the reports autoscaling reads, and Serve stopped scaling up (tests/runtime/test_tier.py, slow).
The median of an empty call at start (`overhead_s`, over the port when the latency path uses
it) is added to the edge times the welcome sends, so a device plans with what the tier costs
it; online correction sees the rest.

Batching happens in the front, so a batch costs one Ray call, not one per request: connection
threads queue their requests; one dispatcher thread per model takes, whenever a replica has a
free slot (`per_replica` calls in flight: one computing, one on its way), the oldest request and
up to `max_batch - 1` more of the same plan, and sends them in one call to the replica's
`run_many` (or its data port), which runs them as one batch (`executor.run_batch`: the part's batch-N libraries
when it has them). Alone, a request goes at once (batch 1, the latency path); when other calls
are in flight a short batch waits for company at most `batch_wait_s`, and never past what its
oldest request's deadline leaves. A request waits in the front, not in a replica, so it can
expire there without costing compute: one that cannot finish in time even at one edge run per
queued batch round is answered `timeout` at admission, and one left with less time than a call
takes is answered at dispatch, so the device has the rest of its deadline for its local exit. A replica that dies mid-call (an actor error, or its port's
connection breaking) costs each of its requests one retry on another replica if its deadline still leaves an edge run; otherwise it expires in
time and the device answers from its local exit.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from edgecut.errors import ArtifactError, UsageError
from edgecut.runtime.executor import Busy, Expired

log = logging.getLogger("edgecut.runtime.tier")

# Serve must count a replica's queue where the requests arrive (the replica), not in the handle:
# the front bypasses the handle.
_ENV = {"RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
os.environ.update(_ENV)

from edgecut.runtime.replicas import _QUIET, EdgeReplica, ReplicaGone, ReplicaSet, _metadata, ray, serve  # noqa: E402

_FAILED = ((ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.WorkerCrashedError, ReplicaGone) if ray is not None else (ReplicaGone,))


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
    else:   # Ray runs its workers at nice 15; replicas are the serving work here, not background
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus, **kw)
    serve.start(logging_config=_QUIET)


class _Request:
    """One admitted request on its way through the front's queue to a replica."""

    __slots__ = ("plan", "tensors", "expiry", "done", "reply", "gone", "tries", "avoid")

    def __init__(self, plan: str, tensors: dict, expiry: float):
        self.plan, self.tensors, self.expiry = plan, tensors, expiry
        self.done, self.reply, self.gone, self.tries, self.avoid = threading.Event(), None, False, 0, None

    def finish(self, reply) -> None:
        self.reply = reply
        self.done.set()


class RayExecutor(ReplicaSet):
    """Run one model's edge part on the Ray cluster (see the module docstring). `artifact` is
    what `EdgeReplica` loads; `part` the front's own copy (model name and hash, plans)."""

    where = "ray"

    def __init__(self, part, artifact=None, *, min_replicas: int = 1, max_replicas: int = 2, max_batch: int = 8,
                 batch_wait_s: float = 0.002, batching: bool = True, max_queue: int = 256, backend: str = "tvm",
                 replica_cpus: float = 1.0, route: str = "direct", refresh_s: float = 1.0,
                 target_ongoing: float | None = None, per_replica: int = 2, hang_s: float = 2.0,
                 data_port: bool = True):
        _need_ray()
        from edgecut.runtime import protocol as P
        if not 1 <= min_replicas <= max_replicas:
            raise UsageError(f"replica bounds {min_replicas}:{max_replicas}: need 1 <= MIN <= MAX")
        model, sha = P.manifest_identity(part)
        self.app = f"edgecut-{model}-{sha[:12]}"
        self.max_batch = max_batch if batching else 1
        self.batch_wait_s = batch_wait_s
        self.max_queue, self.route = max_queue, route
        self.max_replicas, self.hang_s = max_replicas, hang_s
        # the data port (runtime/replicas.py) for the latency path; for batches too when Serve has
        # nothing to scale (it counts only requests that come through Ray's call)
        self.data_port = data_port and route == "direct"
        self.port_batches = self.data_port and min_replicas == max_replicas
        self._calls_s = deque([0.01], maxlen=31)     # the last calls' round trips as a call thread saw them
        app = EdgeReplica.options(
            max_ongoing_requests=max(4 * per_replica, 8),
            ray_actor_options={"num_cpus": replica_cpus},
            autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                                "initial_replicas": min_replicas,
                                "target_ongoing_requests": target_ongoing or max(1.0, per_replica / 2),
                                "upscale_delay_s": 2.0, "downscale_delay_s": 30.0, "metrics_interval_s": 0.5,
                                "look_back_period_s": 2.0},
        ).bind(artifact if artifact is not None else part, backend)
        self.handle = serve.run(app, name=self.app, route_prefix=None)
        ReplicaSet.__init__(self, self.app, per_replica, refresh_s)
        self._queue: deque[_Request] = deque()
        self._pending = 0
        end = time.monotonic() + 60
        while len(self._actors) < min_replicas and time.monotonic() < end:
            self._refresh(force=True)
            time.sleep(0.02)
        self.overhead_s = self._hop(self.data_port)
        self._calls = ThreadPoolExecutor(max_replicas * per_replica + 1, thread_name_prefix="edgecut-tier-call")
        self._refresher = threading.Thread(target=self._refresh_loop, name=f"edgecut-tier-list-{model}", daemon=True)
        self._refresher.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"edgecut-tier-{model}", daemon=True)
        self._dispatcher.start()

    @property
    def pending(self) -> int:
        return self._pending

    # ------------------------------------------------------------------------------ requests
    def infer(self, plan_id: str, tensors: dict, received: float, expiry: float, abandon=None):
        with self._lock:
            if self._pending >= self.max_queue:
                raise Busy(f"edge tier queue is full ({self.max_queue} requests in flight); retry or run locally")
            if self._late(expiry):
                raise Expired()         # answered at once: the device has its whole deadline for its exit
            self._pending += 1
            req = _Request(plan_id, tensors, expiry)
            slot = None if self._queue else self._idle_slot()
            if slot is None:
                self._queue.append(req)
                self._free.notify_all()
        if slot is not None:            # nothing queued, a replica free: call it from this thread
            self._send(*slot, [req], port=self.data_port)
        try:
            if not req.done.wait(max(0.0, expiry - time.monotonic())):
                req.gone = True         # the dispatcher drops it; a call holding it ignores it
                raise Expired()
        finally:
            with self._lock:
                self._pending -= 1
        reply = req.reply
        if reply[0] == "ok":
            _, out, edge_s, batch = reply
            return out, max(0.0, time.monotonic() - received - edge_s), edge_s, batch
        if reply[0] == "bad":
            raise ArtifactError(reply[1])
        raise Expired()

    def _late(self, expiry: float) -> bool:
        """(With self._lock held) whether a request queued now cannot finish by `expiry` even at
        the least it could take: the queued batches ahead of it spread over the replicas, each
        at least one edge run. A lower bound, so an idle queue never refuses anything."""
        if not self._actors:
            return False
        rounds = len(self._queue) // self.max_batch // len(self._actors) + 1
        return time.monotonic() + rounds * self._est_s > expiry

    def _dispatch(self) -> None:
        """The dispatcher thread: batches from the queue, one Ray call each (module docstring)."""
        while not self._closed:
            with self._free:
                while not self._closed and not self._live_head():
                    self._free.wait(0.5)
                if self._closed:
                    return
                head = self._queue[0]
            try:
                name, actor = self._pick(head.avoid, head.expiry)
            except Expired:             # no slot in time for the head: answered now, not at its deadline
                with self._free:
                    if self._queue and self._queue[0] is head:
                        self._queue.popleft()
                head.finish(("expired",))
                continue
            if actor is None:           # all restarting: give Serve a moment
                time.sleep(0.05)
                self._refresh(force=True)
                continue
            batch = self._take(head.plan)
            if not batch:
                self._release(name)
                continue
            self._calls.submit(self._send, name, actor, batch, self.port_batches)

    def _call_s(self) -> float:       # with self._lock held
        """The median of the last calls' round trips (a median: one call slowed by a replica's
        death must not make the dispatcher answer every request `timeout` for a while)."""
        return sorted(self._calls_s)[len(self._calls_s) // 2]

    def _live_head(self) -> bool:       # with self._lock held: drop expired requests at the head
        while self._queue and (self._queue[0].gone or self._queue[0].expiry <= time.monotonic()):
            self._queue.popleft()
        return bool(self._queue)

    def _take(self, plan: str) -> list:
        """Up to max_batch live requests of `plan`, oldest first. A short batch waits for more
        only while other calls are in flight, at most batch_wait_s, never past its deadline."""
        with self._free:
            if self.max_batch > 1 and sum(self._inflight.values()) > 1:
                wait_end = time.monotonic() + self.batch_wait_s
                while len(self._queue) < self.max_batch:
                    live = [r.expiry for r in self._queue if not r.gone]
                    left = min(wait_end, min(live, default=0.0) - 2 * self._est_s) - time.monotonic()
                    if left <= 0:
                        break
                    self._free.wait(left)
            # A request with less time left than a call takes is answered now (no replica time
            # spent on it), unless nothing else is in flight: then it goes, and the estimate learns.
            need = self._call_s() if sum(self._inflight.values()) > 1 else self._est_s
            batch, keep, now = [], deque(), time.monotonic()
            while self._queue:
                r = self._queue.popleft()
                if r.gone or r.expiry <= now:
                    continue
                if r.expiry - now < need:
                    r.finish(("expired",))
                    continue
                (batch if r.plan == plan and len(batch) < self.max_batch else keep).append(r)
            self._queue = keep
            return batch

    def _send(self, name: str, actor, batch: list, port: bool = False) -> None:
        """A call thread: one replica call for `batch` (over its data port if `port`); each
        request finished, or re-queued once at the front of the queue when the replica died and
        its deadline leaves another run."""
        failed, t0 = False, time.monotonic()
        try:
            replies = self._call(name, actor, batch, port)
        except Expired:
            replies = [("expired",)] * len(batch)
        except _FAILED as e:
            failed = True
            log.info("%s: replica failed (%s) with %d request(s)", self.app, type(e).__name__, len(batch))
            replies = None
        except Exception as e:  # a bug must cost this batch, not the dispatcher
            log.error("%s: replica call failed", self.app, exc_info=e)
            replies = [("bad", f"{type(e).__name__}: {e}")] * len(batch)
        finally:
            self._release(name)
        if failed:                      # not used again until a re-listing finds it and it answers a probe
            with self._lock:
                self._actors.pop(name, None)
                self._inflight.pop(name, None)
            self._refresh(force=True)
            now, retry = time.monotonic(), []
            for r in batch:
                if r.tries == 0 and r.expiry - now >= 2 * self._est_s and not r.gone:
                    r.tries, r.avoid = 1, name
                    retry.append(r)
                else:
                    r.finish(("expired",))      # answered now: the device runs its local exit
            with self._free:
                self._queue.extendleft(reversed(retry))
                self._free.notify_all()
            return
        for r, reply in zip(batch, replies):
            r.finish(reply)
        edge = [rep[2] for rep in replies if rep[0] == "ok"]
        if edge:
            self._est_s = 0.9 * self._est_s + 0.1 * edge[0]
            with self._lock:
                self._calls_s.append(time.monotonic() - t0)

    def _call(self, name: str, actor, batch: list, port: bool):
        plan, now = batch[0].plan, time.monotonic()
        budgets = [r.expiry - now for r in batch]
        left = max(budgets)
        if left <= 0:
            raise Expired()
        ch = self._connect(name) if port else None
        if ch is not None:
            return self._port_call(name, ch, plan, budgets, [r.tensors for r in batch], left + self.hang_s)
        args = (plan, budgets, *(r.tensors for r in batch))
        if self.route == "handle":
            resp = self.handle.run_many.remote(*args)
            try:
                return resp.result(timeout_s=left + self.hang_s)
            except TimeoutError:
                resp.cancel()
                raise Expired() from None
        ref = actor.handle_request.remote(_metadata(self.app, "run_many"), *args)
        try:   # past the deadlines too: the replica still computes, and its slot stays taken till then
            return ray.get(ref, timeout=left + self.hang_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)
            raise Expired() from None

    def close(self) -> None:
        with self._free:
            self._closed = True
            self._free.notify_all()
        self._refresh_now.set()
        self._dispatcher.join(5)
        self._refresher.join(5)
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._close_idle()
        try:
            serve.delete(self.app)
        except Exception as e:  # the cluster may already be gone
            log.warning("could not delete %s: %s", self.app, e)
