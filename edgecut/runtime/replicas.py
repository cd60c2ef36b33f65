"""The replicas of one model's edge part on Ray Serve, as the tier's front sees them.

`EdgeReplica` is the Serve deployment (one replica: the edge part, `run_many` runs a batch).
`ReplicaSet` keeps the front's list of live replica actors: a refresher thread re-lists them by
name (`SERVE_REPLICA::<app>#edge#...`) every `refresh_s` and at once after a failure, probes a
new one before using it, and hands out call slots (`per_replica` calls in flight each).

Each replica also listens on a data port of its own (`_DataPort`): a TCP socket on its node's
address that takes the same batches as `run_many` in edgecut's msgpack frames, once the
connection has shown the replica's token (a random secret the probe returns through Ray). A
call over it skips Ray's task submission and Serve's request path (metadata, metrics, a hop to
the user-code thread): measured here, an empty call takes 0.05-0.08 ms over the port and 1.3-2.6 ms
through Ray, and one device through a 20 ms RTT link pays 1.02-1.05x the single-process server
over the port, 1.13-1.18x through Ray (bench/serve.py). Serve counts only requests that come through its call path, so the front sends
over the port what autoscaling need not see (runtime/tier.py says which).
Imported by runtime/tier.py, which sets Serve's environment first.
"""
from __future__ import annotations

import hmac
import logging
import os
import pickle
import socket
import threading
import time
import uuid

from edgecut.errors import ArtifactError
from edgecut.runtime import protocol as P
from edgecut.runtime.executor import Expired, run_batch

log = logging.getLogger("edgecut.runtime.tier")

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - tier.start_ray says what to do
    ray = serve = None

_QUIET = {"enable_access_log": False, "log_level": "WARNING"}


class ReplicaGone(ConnectionError):
    """A replica's data port broke mid-call: the replica is taken as dead (as Ray's actor errors)."""


def _wire_reply(r: tuple) -> list:
    return ["ok", P.TensorDict(r[1]), *r[2:]] if r[0] == "ok" else list(r)


def _reply(r) -> tuple:
    """One request's reply as it came over a data port, as `run_many` returns it."""
    if not isinstance(r, list) or not r or r[0] not in ("ok", "expired", "bad"):
        raise P.ProtocolError(f"bad reply from a replica's data port: {str(r)[:80]}")
    return ("ok", P.decode_tensors(r[1], "outputs"), float(r[2]), int(r[3])) if r[0] == "ok" else tuple(r)


class _DataPort:
    """A replica's data port (module docstring): a listener on the node's address, a thread per
    connection. A connection's first frame must carry the token; then each `run` frame is one
    batch, answered in order; `ping` is answered at once (the front times its hop with it).
    Anything else, or a frame that does not decode, closes that connection only."""

    def __init__(self, run, token: bytes):
        self.run, self.token = run, token
        host = ray.util.get_node_ip_address()
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        threading.Thread(target=self._accept, name="edgecut-replica-port", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="edgecut-replica-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ch = P.Channel(conn)
        try:
            first = ch.recv(time.monotonic() + 5)
            token = first.get("token")
            if first["type"] != "open" or not isinstance(token, bytes) or not hmac.compare_digest(token, self.token):
                return
            ch.send({"type": "opened"})
            while True:
                msg = ch.recv(None)
                if msg["type"] == "ping":
                    ch.send({"type": "pong"})
                    continue
                plan, budgets, tensors = msg.get("plan"), msg.get("budgets"), msg.get("tensors")
                if (msg["type"] != "run" or not isinstance(plan, str) or not isinstance(budgets, list)
                        or not isinstance(tensors, list) or len(budgets) != len(tensors)
                        or not all(isinstance(b, (int, float)) for b in budgets)):
                    return
                replies = self.run(plan, budgets, [P.decode_tensors(t) for t in tensors])
                ch.send({"type": "done", "replies": [_wire_reply(r) for r in replies]})
        except (OSError, ConnectionError, TimeoutError, P.ProtocolError):
            return
        finally:
            ch.close()


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
            self._computing = threading.Lock()     # one batch at a time, from Ray's call or the port
            self._port = _DataPort(self._run, os.urandom(32))

        async def run_many(self, plan_id: str, budgets: list, *tensors: dict):
            """One reply per request: ('ok', outputs, edge seconds, batch size), ('expired',)
            (its budget, seconds from now, ran out before it started) or ('bad', message).
            Each request's tensors are an argument of their own: Ray sends an argument under
            100 KB inline with the call, where a list of them would go through the object store.
            async: it computes on the replica's user-code event loop, without Serve's hop to a
            worker thread for a plain method (one computes at a time either way)."""
            return self._run(plan_id, budgets, tensors)

        def _run(self, plan_id: str, budgets: list, tensors) -> list:
            with self._computing:
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

        async def endpoint(self) -> tuple:
            """The probe: (pid, data port host, port, token). async like run_many, so it takes
            the same path through the replica (a plain method adds Serve's thread hop)."""
            return (os.getpid(), *self._port.address, self._port.token)


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
        self._ports: dict[str, tuple] = {}          # name -> (host, port, token) of its data port
        self._idle: dict[str, list] = {}            # name -> open connections to its port, not in use
        self._probes: dict[str, tuple] = {}
        self._probe_after: dict[str, float] = {}
        self._orphans: list = []
        self._refreshed = 0.0
        self._closed = False

    def _hop(self, port: bool, n: int = 21) -> float:
        """Median seconds of an empty call to a replica, over its data port (the latency path)
        if `port` and it has one, else through Ray: what the tier adds to each edge time."""
        ts = []
        for _ in range(n):
            name, actor = self._pick(None, time.monotonic() + 10)
            if actor is None:
                return 0.0
            t = time.perf_counter()
            try:
                ch = self._connect(name) if port else None
                if ch is not None:
                    ch.send({"type": "ping"}, time.monotonic() + 10)
                    if ch.recv(time.monotonic() + 10)["type"] != "pong":
                        raise P.ProtocolError("no pong")
                    self._checkin(name, ch)
                else:
                    ray.get(actor.handle_request.remote(_metadata(self.app, "endpoint")), timeout=10)
            except Exception:
                return 0.0
            finally:
                self._release(name)
            ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2]

    # ------------------------------------------------------------------------------- data port
    def _connect(self, name: str):
        """An open connection to replica `name`'s data port (an idle one, or a new one); None
        when it has no port or the port cannot be reached from here (the caller uses Ray)."""
        with self._lock:
            idle = self._idle.get(name)
            if idle:
                return idle.pop()
            where = self._ports.get(name)
        if where is None:
            return None
        host, port, token = where
        try:
            sock = socket.create_connection((host, port), timeout=2.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ch = P.Channel(sock)
            ch.send({"type": "open", "token": token}, time.monotonic() + 2.0)
            if ch.recv(time.monotonic() + 2.0)["type"] != "opened":
                raise P.ProtocolError("not opened")
            return ch
        except (OSError, ConnectionError, TimeoutError, P.ProtocolError) as e:
            log.warning("%s: %s's data port %s:%d unreachable (%s); calling it through Ray",
                        self.app, name, host, port, e)
            with self._lock:
                self._ports.pop(name, None)
            return None

    def _checkin(self, name: str, ch) -> None:
        with self._lock:
            if name in self._actors and not self._closed:
                self._idle.setdefault(name, []).append(ch)
                return
        ch.close()

    def _close_idle(self, keep=()) -> None:
        """Close the idle port connections of every replica not in `keep` (`_checkin` adds none
        for a replica that is not listed)."""
        with self._lock:
            gone = [ch for n in list(self._idle) if n not in keep for ch in self._idle.pop(n)]
        for ch in gone:
            ch.close()

    def _port_call(self, name: str, ch, plan: str, budgets: list, tensors: list, timeout: float) -> list:
        """One batch over an open connection to `name`'s data port: the replies, as run_many's.
        Raises Expired when no reply comes within `timeout` (the connection is dropped: its reply
        may still come), ReplicaGone when the connection breaks."""
        end = time.monotonic() + timeout
        try:
            ch.send({"type": "run", "plan": plan, "budgets": budgets,
                     "tensors": [P.TensorDict(t) for t in tensors]}, end)
            msg = ch.recv(end)
            if msg["type"] != "done" or not isinstance(msg.get("replies"), list) or len(msg["replies"]) != len(budgets):
                raise P.ProtocolError(f"unexpected {msg['type']!r} frame from a replica's data port")
            replies = [_reply(r) for r in msg["replies"]]
        except TimeoutError:
            ch.close()
            raise Expired() from None
        except (OSError, ConnectionError, P.ProtocolError) as e:
            ch.close()
            raise ReplicaGone(f"{name}: {type(e).__name__}: {e}") from e
        self._checkin(name, ch)
        return replies

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
            probes[n] = (actor, actor.handle_request.remote(_metadata(self.app, "endpoint")))
        fresh, ports = set(), {}
        if probes:
            ready, _ = ray.wait([p for _, p in probes.values()], num_returns=len(probes), timeout=0)
            for n, (actor, ref) in list(probes.items()):
                if ref in ready:
                    del probes[n]
                    try:
                        ports[n] = tuple(ray.get(ref)[1:])
                        actors[n] = actor
                        fresh.add(n)
                    except Exception:   # not initialised yet (or dying): probe again shortly
                        self._probe_after[n] = now + 0.2
        with self._lock:                # one a failed call dropped meanwhile stays out till probed again
            self._actors = {n: a for n, a in actors.items() if n in self._actors or n in fresh}
            self._ports = {n: p for n, p in {**self._ports, **ports}.items() if n in self._actors}
            self._probes = probes
            self._inflight = {n: self._inflight.get(n, 0) for n in actors}
            self._free.notify_all()
        self._close_idle(keep=self._actors)

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
