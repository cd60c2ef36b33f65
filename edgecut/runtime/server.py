"""The edge server: runs the edge part of an artifact for many devices at once.

One thread per connection reads frames (blocking sockets, `recv_into`, no copies). At most
`workers` requests compute at once: a request that finds a free slot and nobody queued runs on its
connection thread (no handoff between threads: that cost more than the framing); otherwise it
waits, first come first served, for a pool of `workers` threads behind a bounded queue (a request
that finds `workers + max_queue` already pending gets a `busy` error at once). Each request has a
timeout: the server's `request_timeout`, shortened to the device's `deadline_s`. A queued request
gets the `timeout` error when it expires (its run, if it started, is abandoned); one running on
its connection thread cannot be abandoned, so it answers `timeout` when it finishes late. A bad frame gets an error reply and a
clean close of that connection only; the server keeps serving everyone else. One log line per
connection, when it closes. `shutdown()` (SIGTERM under `serve_forever`) stops accepting, lets the
requests already received finish and answer, then closes.

Where the compute runs is an executor per model (`runtime.executor`): `LocalExecutor`, the
thread pool of this process (the default), or `runtime.tier.RayExecutor`, replicas on a Ray
cluster (`edgecut serve --ray`). Everything else, the protocol, tokens, frame limits, deadlines
and error replies, is this one code path. Several artifacts may be served at once: a device's
hello names its model, and its connection is routed to that model's executor.

At start the server times its edge parts (`runtime.calibration`: the valid calibration beside the
artifact, or a new one) and sends {plan id: seconds} (the `quantile` of each part's time, p99 by
default) in its welcome: devices plan with the edge's measured times, not the compile-time guess.
"""
from __future__ import annotations

import ipaddress
import logging
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass

from edgecut.errors import ArtifactError, ProtocolError, UsageError
from edgecut.codecs import parse as parse_codec
from edgecut.planning import runnable_plans
from edgecut.runtime import protocol as P
from edgecut.runtime.calibration import ensure_calibration
from edgecut.runtime.executor import Busy, Expired, LocalExecutor
from edgecut.units import format_bytes

log = logging.getLogger("edgecut.runtime.server")


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host!r}: {e}") from None
    return all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


@dataclass(frozen=True)
class ServedModel:
    """One artifact the server serves: its edge part, identity, plans, edge times, executor."""
    part: object
    model: str
    manifest_sha256: str
    plans: dict
    calibration: object
    edge_s: dict | None
    executor: object


class EdgeServer:
    """Serve the edge side of `artifact` (a path, or a part from `edgecut.load(..., side="edge")`),
    or of each artifact in a list (one per model name).

    `executor`: None (a `LocalExecutor` of `workers` slots and `max_queue` waiting, per model) or
    a function (part, artifact) -> executor (the tier: `RayExecutor`). `metrics`: a
    `runtime.metrics.Metrics` to record into.

    `token` (bytes): devices must answer the HMAC-SHA256 challenge with it. Binding an address
    that is not loopback without a token raises UsageError unless `insecure=True`. `calibrate`:
    True (the calibration beside the artifact, made if missing or stale), a path or a
    `Calibration`, or False (send no edge times)."""

    def __init__(self, artifact, host: str = "127.0.0.1", port: int = 9000, *, token: bytes | None = None,
                 insecure: bool = False, backend: str = "tvm", max_frame: int = P.DEFAULT_MAX_FRAME,
                 workers: int = 2, max_queue: int = 64, request_timeout: float = 30.0,
                 handshake_timeout: float = 10.0, idle_timeout: float = 600.0, frame_timeout: float = 60.0,
                 max_connections: int = 256, calibrate=True, quantile: float = 0.99, executor=None,
                 metrics=None):
        if not token and not insecure and not is_loopback(host):
            raise UsageError(f"refusing to serve on {host!r} without a token: anyone who can reach it could use "
                             f"the server; pass --token-file FILE (devices need the same token), bind 127.0.0.1, "
                             f"or pass --insecure on a network you trust")
        self.models: dict[str, ServedModel] = {}
        self.metrics = metrics
        try:
            for art in (artifact if isinstance(artifact, (list, tuple)) else [artifact]):
                self._add_model(art, backend, calibrate, quantile,
                                executor or (lambda part, _: LocalExecutor(part, workers, max_queue)))
        except BaseException:
            self._close_executors()
            raise
        first = next(iter(self.models.values()))
        self.part, self.model, self.manifest_sha256 = first.part, first.model, first.manifest_sha256
        self._plans, self.calibration, self.edge_s = first.plans, first.calibration, first.edge_s
        self.host, self.port, self.token = host, port, (bytes(token) if token else None)
        self.max_frame, self.workers, self.max_queue = max_frame, workers, max_queue
        self.request_timeout, self.handshake_timeout = request_timeout, handshake_timeout
        self.idle_timeout, self.frame_timeout, self.max_connections = idle_timeout, frame_timeout, max_connections
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._stopping = threading.Event()
        self._stop_request = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.stats = {"connections": 0, "requests": 0, "errors": 0}

    def _add_model(self, artifact, backend: str, calibrate, quantile: float, make_executor) -> None:
        if hasattr(artifact, "run"):
            part = artifact
        else:
            from edgecut.codegen.load import load
            part = load(artifact, side="edge", backend=backend)
        model, sha = P.manifest_identity(part)
        if model in self.models:
            raise UsageError(f"two artifacts of model {model!r}: serve one build per model name (a device's "
                             f"hello names the model, so the server could not tell them apart)")
        cal = ensure_calibration(part, "edge", calibrate)
        executor = make_executor(part, None if hasattr(artifact, "run") else artifact)
        hop = getattr(executor, "overhead_s", 0.0)      # the tier's front -> replica round trip
        edge_s = {k: v + hop for k, v in cal.seconds(quantile).items()} if cal else None
        plans = {p.id: p for p in runnable_plans(part.manifest)}
        self.models[model] = ServedModel(part, model, sha, plans, cal, edge_s, executor)

    def _close_executors(self) -> None:
        for m in self.models.values():
            m.executor.close()

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2] if self._listener else (self.host, self.port)

    def start(self) -> "EdgeServer":
        if self._listener:
            return self
        self._listener = socket.create_server((self.host, self.port), reuse_port=False, backlog=128)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="edgecut-accept", daemon=True)
        self._accept_thread.start()
        for m in self.models.values():
            log.info("serving %s (manifest %s) on %s:%d, %s executor, %s", m.model, m.manifest_sha256[:12],
                     *self.address, m.executor.where, "token required" if self.token else "no token")
        return self

    def serve_forever(self, handle_signals: bool = True, drain_timeout: float = 30.0) -> None:
        """Serve until SIGTERM/SIGINT (or `request_stop()`), then drain and return."""
        self.start()
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.request_stop())
        while not self._stop_request.wait(0.2):
            pass
        self.shutdown(drain_timeout)

    def request_stop(self) -> None:
        self._stop_request.set()

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting; let requests already received finish and answer; close everything."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._stop_request.set()
        if self._accept_thread:
            self._accept_thread.join()
        with self._lock:
            conns = dict(self._conns)
        log.info("draining %d connection(s), %d request(s) in flight", len(conns),
                 sum(m.executor.pending for m in self.models.values()))
        for sock in conns.values():      # no new frames; a request already read still gets its reply
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        end = time.monotonic() + drain_timeout
        for t in conns:
            t.join(max(0.0, end - time.monotonic()))
        for t, sock in conns.items():
            if t.is_alive():
                sock.close()
        self._close_executors()
        log.info("stopped: %d connections, %d requests, %d errors", *self.stats.values())

    def __enter__(self) -> "EdgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(drain_timeout=5.0)

    # ------------------------------------------------------------------------------ connections
    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                if not sel.select(0.1):
                    continue
                try:
                    sock, peer = self._listener.accept()
                except OSError:
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    full = len(self._conns) >= self.max_connections
                    if not full:
                        t = threading.Thread(target=self._serve_conn, args=(sock, peer), daemon=True,
                                             name=f"edgecut-conn-{peer[1]}")
                        self._conns[t] = sock
                        self.stats["connections"] += 1
                if full:
                    self._refuse(sock, P.BUSY, f"server has {self.max_connections} connections already; retry later")
                else:
                    t.start()
        finally:
            sel.close()
            self._listener.close()

    def _refuse(self, sock, code: str, message: str) -> None:
        try:
            P.Channel(sock).send(P.error(code, message), deadline=time.monotonic() + 1.0)
        except OSError:
            pass
        _linger_close(sock)

    def _serve_conn(self, sock: socket.socket, peer) -> None:
        ch = P.Channel(sock, self.max_frame, reuse_buffer=True)
        start, n_req, n_err, reason = time.monotonic(), 0, 0, "closed by peer"
        try:
            reason, m = self._handshake(ch)
            check = (lambda msg: self._check(m, msg))
            while reason is None:
                try:
                    msg, checked = ch.recv_prepared(check, deadline=time.monotonic() + self.idle_timeout,
                                                    frame_timeout=self.frame_timeout)
                except P.ConnectionClosed:
                    reason = "closed by peer" if not self._stopping.is_set() else "server shutting down"
                    break
                received = time.monotonic()
                reply = self._handle(m, msg, checked, ch)
                if self.metrics and msg["type"] == "infer":
                    plan = msg.get("plan")
                    self.metrics.answered(m.model, plan if plan in m.plans else None, reply,
                                          time.monotonic() - received)
                n_req += 1
                if reply["type"] == "error":
                    n_err += 1
                ch.send(reply, deadline=time.monotonic() + self.frame_timeout)
        except P.FrameTooLarge as e:
            reason = self._fail(ch, P.TOO_LARGE, str(e))
            n_err += 1
        except ProtocolError as e:
            reason = self._fail(ch, P.BAD_FRAME, str(e))
            n_err += 1
        except TimeoutError:
            reason = "timed out waiting for the device"
        except OSError as e:
            reason = "server shutting down" if self._stopping.is_set() else f"socket error: {e}"
        except Exception as e:  # a bug must cost one connection, not the server
            log.exception("connection %s: unexpected error", peer)
            reason = self._fail(ch, P.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            _linger_close(sock)
            with self._lock:
                self._conns.pop(threading.current_thread(), None)
                self.stats["requests"] += n_req
                self.stats["errors"] += n_err
            log.info("connection %s:%s: %d requests (%d errors), in %s, out %s, %.2fs, %s", peer[0], peer[1],
                     n_req, n_err, format_bytes(ch.bytes_received), format_bytes(ch.bytes_sent),
                     time.monotonic() - start, reason)

    def _fail(self, ch: P.Channel, code: str, message: str) -> str:
        try:
            ch.send(P.error(code, message), deadline=time.monotonic() + 1.0)
        except OSError:
            pass
        return f"{code}: {message}"

    def _handshake(self, ch: P.Channel) -> tuple[str | None, ServedModel | None]:
        """(None, the device's model) when the device may go on; otherwise (why the connection ends, None)."""
        deadline = time.monotonic() + self.handshake_timeout
        nonce = P.new_nonce()
        ch.send(P.challenge(nonce, self.token is not None), deadline)
        msg = ch.recv(deadline, frame_timeout=self.handshake_timeout)
        if msg["type"] != "hello":
            return self._fail(ch, P.BAD_REQUEST, f"expected a hello first, got {msg['type']!r}"), None
        if msg.get("version") != P.PROTOCOL_VERSION:
            return self._fail(ch, P.VERSION, f"device speaks protocol {msg.get('version')!r}, this server "
                                             f"{P.PROTOCOL_VERSION}: install the same edgecut version on both"), None
        model, sha = msg.get("model"), msg.get("manifest_sha256")
        if self.token and not (isinstance(model, str) and isinstance(sha, str)
                               and P.check_auth(self.token, nonce, model, sha, msg.get("auth"))):
            return self._fail(ch, P.AUTH, "authentication failed: the device's token does not match the "
                                          "server's --token-file"), None
        m = self.models.get(model) if isinstance(model, str) else None
        if m is None:
            served = ", ".join(repr(k) for k in self.models)
            return self._fail(ch, P.MODEL, f"device runs model {model!r}, this server serves {served}"), None
        if sha != m.manifest_sha256:
            return self._fail(ch, P.MANIFEST, f"device's artifact has manifest sha256 {str(sha)[:12]}..., this "
                                              f"server's {m.manifest_sha256[:12]}...: deploy the same build "
                                              f"to device and edge"), None
        ch.send(P.welcome(m.model, m.manifest_sha256, m.edge_s), deadline)
        if self.metrics:
            self.metrics.connections.inc()
        return None, m

    # ------------------------------------------------------------------------------ requests
    def _handle(self, m: ServedModel, msg: dict, checked, ch: P.Channel) -> dict:
        kind, rid = msg["type"], msg.get("id")
        if kind == "infer":
            return checked if isinstance(checked, dict) else self._infer(m, *checked, ch)
        if kind == "ping":
            return {"type": "pong", "id": rid}
        if kind == "probe":
            data = msg.get("data")
            return {"type": "probe_ack", "id": rid,
                    "n": memoryview(data).nbytes if isinstance(data, (bytes, memoryview)) else 0}
        return P.error(P.BAD_REQUEST, f"unknown message type {kind!r}", rid)

    def _check(self, m: ServedModel, msg: dict):
        """An infer request's (id, plan id, tensors, timeout), or the error reply it gets; None
        for other messages. Reads nothing but the map's structure: the channel calls it while
        the tensors' bytes are still arriving (Channel.recv_prepared)."""
        if msg["type"] != "infer":
            return None
        rid, plan_id, deadline_s = msg.get("id"), msg.get("plan"), msg.get("deadline_s")
        if not isinstance(rid, int) or isinstance(rid, bool):
            return P.error(P.BAD_REQUEST, "infer needs an integer 'id'", None)
        if not isinstance(plan_id, str):
            return P.error(P.BAD_REQUEST, "infer needs a string 'plan'", rid)
        plan = m.plans.get(plan_id)
        if plan is None:
            known = ", ".join(m.plans)
            return P.error(P.UNKNOWN_PLAN, f"plan {plan_id!r} is not one of this artifact's plans ({known})", rid)
        if plan.cut.device_only:
            return P.error(P.UNKNOWN_PLAN, f"plan {plan_id!r} runs on the device only; nothing to do here", rid)
        codec, want = msg.get("codec", "fp32"), getattr(plan, "codec", "fp32")
        if codec != want:
            return P.error(P.BAD_TENSOR, f"plan {plan_id!r} sends its tensors as {want}, this frame says "
                           f"{codec!r}: send the plan's codec", rid)
        try:
            tensors = P.decode_tensors(msg.get("tensors"), packed=bool(parse_codec(codec).lossless))
        except ProtocolError as e:
            return P.error(P.BAD_TENSOR, str(e), rid)
        timeout = self.request_timeout
        if deadline_s is not None:
            if not isinstance(deadline_s, (int, float)) or isinstance(deadline_s, bool):
                return P.error(P.BAD_REQUEST, "deadline_s must be a number of seconds or nil", rid)
            if deadline_s <= 0:
                return P.error(P.TIMEOUT, "the request arrived after its deadline", rid)
            timeout = min(timeout, float(deadline_s))
        return rid, plan_id, tensors, timeout

    def _infer(self, m: ServedModel, rid: int, plan_id: str, tensors: dict, timeout: float, ch: P.Channel) -> dict:
        received = time.monotonic()
        try:
            tensors = P.unpack_tensors(tensors, m.plans[plan_id].codec)   # the codec's lossless stage, if any
        except ProtocolError as e:
            return P.error(P.BAD_TENSOR, str(e), rid)
        unpack_s = time.monotonic() - received
        try:
            out, queue_s, edge_s, batch = m.executor.infer(plan_id, tensors, received, received + timeout,
                                                           ch.release_buffer)
            edge_s += unpack_s
        except Busy as e:
            return P.error(P.BUSY, str(e), rid)
        except Expired:
            return P.error(P.TIMEOUT, f"edge did not finish within {timeout:.3f}s", rid)
        except ArtifactError as e:
            return P.error(P.BAD_TENSOR, str(e), rid)
        except Exception as e:
            log.error("request %s (model %s, plan %s) failed", rid, m.model, plan_id, exc_info=e)
            return P.error(P.INTERNAL, f"{type(e).__name__}: {e}", rid)
        finally:
            if self.metrics:
                self.metrics.queue.labels(m.model).set(m.executor.pending)
        if self.metrics:
            self.metrics.batch.labels(m.model).observe(batch)
        return P.result(rid, out, edge_s, queue_s)


def _linger_close(sock: socket.socket) -> None:
    """Close so that a reply already sent is not destroyed by a reset: stop writing, read and drop
    what the peer still sends for a moment, then close."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        for _ in range(64):
            if not sock.recv(65536):
                break
    except OSError:
        pass
    finally:
        sock.close()
