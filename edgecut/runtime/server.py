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
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from edgecut.errors import ArtifactError, ProtocolError, UsageError
from edgecut.planning import runnable_plans
from edgecut.runtime import protocol as P
from edgecut.runtime.calibration import ensure_calibration
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


class _Expired(Exception):
    pass


class EdgeServer:
    """Serve the edge side of `artifact` (a path, or a part from `edgecut.load(..., side="edge")`).

    `token` (bytes): devices must answer the HMAC-SHA256 challenge with it. Binding an address
    that is not loopback without a token raises UsageError unless `insecure=True`. `calibrate`:
    True (the calibration beside the artifact, made if missing or stale), a path or a
    `Calibration`, or False (send no edge times)."""

    def __init__(self, artifact, host: str = "127.0.0.1", port: int = 9000, *, token: bytes | None = None,
                 insecure: bool = False, backend: str = "tvm", max_frame: int = P.DEFAULT_MAX_FRAME,
                 workers: int = 2, max_queue: int = 64, request_timeout: float = 30.0,
                 handshake_timeout: float = 10.0, idle_timeout: float = 600.0, frame_timeout: float = 60.0,
                 max_connections: int = 256, calibrate=True, quantile: float = 0.99):
        if not token and not insecure and not is_loopback(host):
            raise UsageError(f"refusing to serve on {host!r} without a token: anyone who can reach it could use "
                             f"the server; pass --token-file FILE (devices need the same token), bind 127.0.0.1, "
                             f"or pass --insecure on a network you trust")
        if hasattr(artifact, "run"):
            self.part = artifact
        else:
            from edgecut.codegen.load import load
            self.part = load(artifact, side="edge", backend=backend)
        self.model, self.manifest_sha256 = P.manifest_identity(self.part)
        self._plans = {p.id: p for p in runnable_plans(self.part.manifest)}
        self.calibration = ensure_calibration(self.part, "edge", calibrate)
        self.edge_s = self.calibration.seconds(quantile) if self.calibration else None
        self.host, self.port, self.token = host, port, (bytes(token) if token else None)
        self.max_frame, self.workers, self.max_queue = max_frame, workers, max_queue
        self.request_timeout, self.handshake_timeout = request_timeout, handshake_timeout
        self.idle_timeout, self.frame_timeout, self.max_connections = idle_timeout, frame_timeout, max_connections
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edgecut-edge")
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._pending = 0       # requests admitted and not finished (busy beyond workers + max_queue)
        self._running = 0       # requests computing now, on a connection thread or the pool: <= workers
        self._waiting = 0       # requests queued for the pool, not yet computing
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._stopping = threading.Event()
        self._stop_request = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.stats = {"connections": 0, "requests": 0, "errors": 0}

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
        log.info("serving %s (manifest %s) on %s:%d, %d workers, queue %d, %s", self.model,
                 self.manifest_sha256[:12], *self.address, self.workers, self.max_queue,
                 "token required" if self.token else "no token")
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
        log.info("draining %d connection(s), %d request(s) in flight", len(conns), self._pending)
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
        self._pool.shutdown(wait=False, cancel_futures=True)
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
            reason = self._handshake(ch)
            while reason is None:
                try:
                    msg, checked = ch.recv_prepared(self._check, deadline=time.monotonic() + self.idle_timeout,
                                                    frame_timeout=self.frame_timeout)
                except P.ConnectionClosed:
                    reason = "closed by peer" if not self._stopping.is_set() else "server shutting down"
                    break
                reply = self._handle(msg, checked, ch)
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

    def _handshake(self, ch: P.Channel) -> str | None:
        """None when the device may go on; otherwise why the connection ends."""
        deadline = time.monotonic() + self.handshake_timeout
        nonce = P.new_nonce()
        ch.send(P.challenge(nonce, self.token is not None), deadline)
        msg = ch.recv(deadline, frame_timeout=self.handshake_timeout)
        if msg["type"] != "hello":
            return self._fail(ch, P.BAD_REQUEST, f"expected a hello first, got {msg['type']!r}")
        if msg.get("version") != P.PROTOCOL_VERSION:
            return self._fail(ch, P.VERSION, f"device speaks protocol {msg.get('version')!r}, this server "
                                             f"{P.PROTOCOL_VERSION}: install the same edgecut version on both")
        model, sha = msg.get("model"), msg.get("manifest_sha256")
        if self.token and not (isinstance(model, str) and isinstance(sha, str)
                               and P.check_auth(self.token, nonce, model, sha, msg.get("auth"))):
            return self._fail(ch, P.AUTH, "authentication failed: the device's token does not match the "
                                          "server's --token-file")
        if model != self.model:
            return self._fail(ch, P.MODEL, f"device runs model {model!r}, this server serves {self.model!r}")
        if sha != self.manifest_sha256:
            return self._fail(ch, P.MANIFEST, f"device's artifact has manifest sha256 {str(sha)[:12]}..., this "
                                              f"server's {self.manifest_sha256[:12]}...: deploy the same build "
                                              f"to device and edge")
        ch.send(P.welcome(self.model, self.manifest_sha256, self.edge_s), deadline)
        return None

    # ------------------------------------------------------------------------------ requests
    def _handle(self, msg: dict, checked, ch: P.Channel) -> dict:
        kind, rid = msg["type"], msg.get("id")
        if kind == "infer":
            return checked if isinstance(checked, dict) else self._infer(*checked, ch)
        if kind == "ping":
            return {"type": "pong", "id": rid}
        if kind == "probe":
            data = msg.get("data")
            return {"type": "probe_ack", "id": rid,
                    "n": memoryview(data).nbytes if isinstance(data, (bytes, memoryview)) else 0}
        return P.error(P.BAD_REQUEST, f"unknown message type {kind!r}", rid)

    def _check(self, msg: dict):
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
        plan = self._plans.get(plan_id)
        if plan is None:
            known = ", ".join(self._plans)
            return P.error(P.UNKNOWN_PLAN, f"plan {plan_id!r} is not one of this artifact's plans ({known})", rid)
        if plan.cut.device_only:
            return P.error(P.UNKNOWN_PLAN, f"plan {plan_id!r} runs on the device only; nothing to do here", rid)
        try:
            tensors = P.decode_tensors(msg.get("tensors"))
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

    def _infer(self, rid: int, plan_id: str, tensors: dict, timeout: float, ch: P.Channel) -> dict:
        received = time.monotonic()
        expiry = received + timeout
        with self._lock:
            if self._pending >= self.workers + self.max_queue:
                return P.error(P.BUSY, f"edge queue is full ({self.max_queue} waiting); retry or run locally", rid)
            self._pending += 1
            inline = self._running < self.workers and self._waiting == 0
            if inline:
                self._running += 1
            else:
                self._waiting += 1
        if inline:          # a free slot and nobody ahead: compute here, no thread handoff
            try:
                out, queue_s, edge_s = self._run(plan_id, tensors, received, expiry)
                if time.monotonic() > expiry:
                    raise _Expired()
            except Exception as e:
                return self._failed(e, rid, plan_id, timeout)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._release_slot()
            return P.result(rid, out, edge_s, queue_s)
        fut = self._pool.submit(self._queued, plan_id, tensors, received, expiry)
        fut.add_done_callback(self._done)
        try:
            out, queue_s, edge_s = fut.result(timeout=max(0.0, expiry - time.monotonic()))
        except FutureTimeout:
            if not fut.cancel():
                ch.release_buffer()     # the abandoned run may still read this frame's tensors
            return self._failed(_Expired(), rid, plan_id, timeout)
        except Exception as e:
            return self._failed(e, rid, plan_id, timeout)
        return P.result(rid, out, edge_s, queue_s)

    def _failed(self, e: Exception, rid, plan_id: str, timeout: float) -> dict:
        if isinstance(e, _Expired):
            return P.error(P.TIMEOUT, f"edge did not finish within {timeout:.3f}s", rid)
        if isinstance(e, ArtifactError):
            return P.error(P.BAD_TENSOR, str(e), rid)
        log.error("request %s (plan %s) failed", rid, plan_id, exc_info=e)
        return P.error(P.INTERNAL, f"{type(e).__name__}: {e}", rid)

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
            raise _Expired()
        res = self.part.run(plan_id, tensors)
        if not res.done:
            raise ArtifactError(f"edge part did not finish plan {plan_id!r}")
        return res.outputs, started - received, time.monotonic() - started


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
