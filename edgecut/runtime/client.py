"""The device client: runs the device part, ships the crossing tensors, re-plans as bandwidth moves.

`DeviceRuntime(artifact, edge=(host, port))` loads the device side of an artifact (no torch) and
answers `infer(inputs, deadline=...)` with a `Result`: the logits, the plan used, where the answer
came from ("device": device-only plan or an early exit; "edge"; "fallback": the edge could not
answer, so a local exit did) and why, and the time split (device, transfer, edge).

Plans from measurements: at its first start the runtime times its device parts (`calibration`;
kept beside the artifact, redone when stale), takes the edge's measured times from the server's
welcome, and plans every request with `planning.choose` over the artifact's runnable plans: their
device and edge seconds (`replan.LatencyEstimates`, corrected online from every request's
measured times, planned to the `quantile`, p99 by default) and the link's bandwidth and RTT
(`bandwidth.BandwidthEstimator`, fed by every transfer, and by a small probe when the link has
been idle for `probe_interval` seconds). `table` is the plan table re-solved from the current
estimates (`planning.solve_table`). With nothing measured (a part with no artifact directory,
`calibrate=False` and an edge that sends no times), requests follow the artifact's PlanTable at
the current bandwidth, and a per-request deadline other than the table's re-plans over the
table's plans with the predicted times. Every socket operation has a deadline, so a dead,
slow or refusing edge costs at most the request's deadline (or `request_timeout`), never a hang.
"""
from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from edgecut.errors import ProtocolError, RemoteError
from edgecut.runtime import protocol as P
from edgecut.runtime.bandwidth import BandwidthEstimator
from edgecut.runtime.replan import Replanner

REPLY_SPIN_S = 300e-6    # poll for a reply without sleeping this long when the last one came this fast
PROBE_ROUNDS = 4         # uploads per probe at most
PROBE_AGREE = 0.25       # two consecutive rates this close (relative) end a probe
PROBE_BUDGET_S = 0.2     # a probe holds the runtime's lock (requests wait for it): its time at most

log = logging.getLogger("edgecut.runtime.client")


@dataclass(frozen=True)
class Result:
    """One answer. `where`: "device" | "edge" | "fallback"; `reason` says why it ended there.
    `predicted_s`: the latency the runtime planned the chosen plan with (its current estimates)."""

    outputs: dict
    plan_id: str
    exit_id: int
    where: str
    reason: str
    device_s: float
    transfer_s: float
    edge_s: float
    total_s: float
    bandwidth: float | None = None
    timing: dict = field(default_factory=dict)
    predicted_s: float = math.nan

    @property
    def logits(self) -> np.ndarray:
        return self.outputs["logits"]


class EdgeConnection:
    """One handshaken connection to an edge server; one request at a time. `edge_s`: the
    server's measured seconds per plan id from its welcome ({} when it sent none)."""

    def __init__(self, host: str, port: int, model: str, manifest_sha256: str, *, token: bytes | None = None,
                 deadline: float | None = None, max_frame: int = P.DEFAULT_MAX_FRAME):
        timeout = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ch = P.Channel(sock, max_frame)
        self._last_wait = math.inf        # seconds from a request sent to its reply in, the last time
        try:
            msg = self.ch.recv(deadline)
            if msg["type"] == "error":
                raise RemoteError(*P.error_of(msg))
            if msg["type"] != "challenge" or not isinstance(msg.get("nonce"), (bytes, memoryview)):
                raise ProtocolError(f"expected a challenge from the edge server, got {msg['type']!r}")
            if msg.get("auth") and not token:
                raise RemoteError(P.AUTH, "the edge server requires a token: pass token=... (--token-file)")
            digest = P.auth_digest(token, bytes(msg["nonce"]), model, manifest_sha256) if token else None
            t = time.monotonic()
            self.ch.send(P.hello(model, manifest_sha256, digest), deadline)
            reply = self.ch.recv(deadline)
            self.rtt = time.monotonic() - t
            if reply["type"] == "error":
                raise RemoteError(*P.error_of(reply))
            if reply["type"] != "welcome":
                raise ProtocolError(f"expected a welcome from the edge server, got {reply['type']!r}")
            self.edge_s = _edge_times(reply.get("edge_s"))
        except BaseException:
            self.ch.close()
            raise

    def request(self, msg: dict, deadline: float | None) -> tuple[dict, int, int]:
        """(reply, bytes sent, bytes received). Error replies come back as replies, not raised."""
        before = self.ch.bytes_received
        sent = self.ch.send(msg, deadline)
        t = time.monotonic()
        reply = self.ch.recv(deadline, spin_s=REPLY_SPIN_S if self._last_wait <= REPLY_SPIN_S else 0.0)
        self._last_wait = time.monotonic() - t
        if reply.get("id") != msg.get("id") and not (reply["type"] == "error" and reply.get("id") is None):
            raise ProtocolError(f"reply {reply.get('id')!r} does not answer request {msg.get('id')!r}")
        return reply, sent, self.ch.bytes_received - before

    def close(self) -> None:
        self.ch.close()


class DeviceRuntime:
    """Run the device side of `artifact` (a path, or a part from `edgecut.load(..., side="device")`)
    against the edge server at `edge=(host, port)` (None: local only).

    deadline: default per-request deadline in seconds (None: the table's). early_exit: take an
    exit's answer when its entropy is under its threshold. connect_timeout / request_timeout bound
    a connection attempt and a request without a deadline; retry_interval: after a failure, how
    long the edge is not retried (requests answer locally meanwhile). probe_interval: probe the
    link when idle this long (None: only measure real transfers). initial_bandwidth: bit/s to
    plan the first request with (default: probe at the first request).

    calibrate: True (the device calibration beside the artifact; made at this first start when
    missing or older than the artifact), a path or a `Calibration`, or False (plan with the
    artifact's predictions). quantile: of the measured times to plan with (0.99). adapt: correct
    the estimates online from every request (`window` samples per plan); an estimate raised
    online for a plan no longer used returns to its calibrated value after `recheck_s` (doubled
    each time the plan proves still slow), so the plan is tried again. See `replan.Replanner`."""

    def __init__(self, artifact, edge: tuple[str, int] | None = None, *, token: bytes | None = None,
                 backend: str = "tvm", deadline: float | None = None, early_exit: bool = True,
                 connect_timeout: float = 2.0, request_timeout: float = 30.0, retry_interval: float = 1.0,
                 probe_interval: float | None = 5.0, initial_bandwidth: float | None = None,
                 max_frame: int = P.DEFAULT_MAX_FRAME, calibrate=True, quantile: float = 0.99,
                 adapt: bool = True, window: int = 32, recheck_s: float = 30.0):
        if hasattr(artifact, "run"):
            self.part = artifact
        else:
            from edgecut.codegen.load import load
            self.part = load(artifact, side="device", backend=backend)
        self.model, self.manifest_sha256 = P.manifest_identity(self.part)
        self.planner = Replanner(self.part, deadline=deadline, calibrate=calibrate, quantile=quantile,
                                 adapt=adapt, window=window, recheck_s=recheck_s, early_exit=early_exit)
        self.edge, self.token = edge, (bytes(token) if token else None)
        self.deadline, self.early_exit = deadline, early_exit
        self.connect_timeout, self.request_timeout, self.retry_interval = connect_timeout, request_timeout, retry_interval
        self.probe_interval, self.max_frame = probe_interval, max_frame
        self.estimator = BandwidthEstimator(initial_bandwidth=initial_bandwidth)
        self.plan_history: list[str] = []          # plan id of each request, in order
        self._warned_infeasible, self._first, self._planned_s = False, True, math.nan
        self._conn: EdgeConnection | None = None
        self._last_attempt, self._last_error = -math.inf, "not connected yet"
        self._last_activity = time.monotonic()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()              # one exchange on the connection at a time
        self._closed = threading.Event()
        self._prober = None
        if edge is not None and probe_interval:
            self._prober = threading.Thread(target=self._probe_loop, daemon=True, name="edgecut-probe")
            self._prober.start()

    # ------------------------------------------------------------------------------ planning
    table = property(lambda self: self.planner.table, doc="the plan table from the current estimates")
    estimates = property(lambda self: self.planner.estimates, doc="per plan device/edge seconds (online)")
    calibration = property(lambda self: self.planner.calibration, doc="the device calibration, or None")
    measured = property(lambda self: self.planner.measured, doc="planning from measurements")

    def _link(self) -> tuple[float, float]:
        """(bandwidth to plan with, rtt): 0 without an edge, infinite before the first estimate."""
        bw = self.estimator.bandwidth
        if bw is None or self.edge is None:
            bw = 0.0 if self.edge is None else math.inf
        return bw, self.estimator.rtt or 0.0

    def choose_plan(self, deadline: float | None = None):
        """The plan for the current bandwidth estimate: from measurements, `planning.choose` over
        the current estimates; with nothing measured, the artifact table's lookup, or, for a
        deadline other than the table's, the most accurate plan whose predicted latency fits."""
        return self.planner.choose(*self._link(), deadline, self.edge is not None)

    def _local_plan(self, end: float | None):
        """The device-only plan to answer with (`Replanner.local_plan`) in the time left."""
        return self.planner.local_plan(math.inf if end is None else end - time.monotonic())

    # ------------------------------------------------------------------------------ connection
    def _connected(self, end: float | None) -> bool:
        if self._conn is not None:
            return True
        now = time.monotonic()
        if self.edge is None or now - self._last_attempt < self.retry_interval:
            return False
        self._last_attempt = now
        deadline = now + self.connect_timeout if end is None else min(end, now + self.connect_timeout)
        try:
            self._conn = EdgeConnection(*self.edge, self.model, self.manifest_sha256, token=self.token,
                                        deadline=deadline, max_frame=self.max_frame)
        except (OSError, ProtocolError) as e:
            self._last_error = _describe(e, "connecting")
            log.warning("edge %s:%s unreachable: %s", *self.edge, self._last_error)
            return False
        self.estimator.add_rtt(self._conn.rtt)
        self.planner.welcomed(self._conn.edge_s)
        return True

    def _drop(self, why: str) -> None:
        self._last_error, self._last_attempt = why, time.monotonic()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------------------ inference
    def infer(self, inputs, deadline: float | None = None, early_exit: bool | None = None) -> Result:
        """Answer one request. `inputs`: an array (the model's only input) or {name: array}.
        `deadline`: seconds from now (default: the runtime's, else the table's)."""
        t0 = time.monotonic()
        if not isinstance(inputs, dict):
            inputs = {self.part.input_names[0]: np.asarray(inputs)}
        deadline = self.deadline if deadline is None else deadline
        end = None if deadline is None else t0 + deadline
        early = self.early_exit if early_exit is None else early_exit
        with self._lock:
            self._last_activity = t0
            if self._first and self.edge is not None:
                self._first = False
                self._connected(end)          # the first request: the edge's welcome times count for it
            if self.estimator.bandwidth is None and self._connected(end):
                self._probe_locked(end)
            bw = self.estimator.bandwidth
            plan = self.choose_plan(deadline)
            if self.plan_history and self.plan_history[-1] != plan.id:
                log.info("bandwidth %.3g Mbit/s: plan %s -> %s", (bw or 0) / 1e6, self.plan_history[-1], plan.id)
            if not plan.feasible and not self._warned_infeasible:
                self._warned_infeasible = True
                log.warning("no plan meets the deadline of %.3g ms at %s: running the fastest, %s (%.3g ms, "
                            "%.3g ms too slow); relax the deadline or use a faster device or edge",
                            self.planner.deadline_of(deadline) * 1e3, _mbit(bw),
                            plan.id, plan.latency_s * 1e3, plan.shortfall_s * 1e3)
            self.plan_history.append(plan.id)
            self._planned_s = plan.latency_s
            if not plan.cut.device_only and not self._connected(end):
                return self._fallback(inputs, t0, end, early, f"edge unreachable: {self._last_error}", 0.0, bw)
            res = self.part.run(plan.id, inputs, early_exit=early)
            if not res.done and getattr(plan, "codec", "fp32") != "fp32":   # the codec's lossless stage
                t = time.perf_counter()
                res = replace(res, outputs=P.pack_tensors(res.outputs, plan.codec))
                res = replace(res, seconds=res.seconds + time.perf_counter() - t)
            if res.exit_id == plan.exit:          # the whole device part ran (no early exit)
                self.planner.observe(plan.id, "device", res.seconds)
            if res.done:
                why = (f"device-only plan at {_mbit(bw)}" if plan.cut.device_only
                       else f"early exit {res.exit_id}: confident on the device")
                return Result(res.outputs, plan.id, res.exit_id, "device", why, res.seconds, 0.0, 0.0,
                              time.monotonic() - t0, bw, predicted_s=plan.latency_s)
            return self._ask_edge(plan, res, inputs, t0, end, early, bw)

    def _ask_edge(self, plan, res, inputs, t0, end, early, bw) -> Result:
        rid = next(self._ids)
        sent_at = time.monotonic()
        left = None if end is None else end - sent_at
        if left is not None and left <= 0:
            return self._fallback(inputs, t0, end, early, "deadline spent on the device before sending", res.seconds, bw)
        wait_until = sent_at + (self.request_timeout if left is None else left)
        up_bytes = sum(int(v.nbytes) for v in res.outputs.values())
        try:
            reply, up, down = self._conn.request(P.infer(rid, plan.id, res.outputs, left,
                                                         getattr(plan, "codec", "fp32")), wait_until)
        except TimeoutError:
            waited = time.monotonic() - sent_at
            self._drop(f"edge timed out after {waited:.3f}s")
            self._last_attempt = -math.inf           # the edge is alive, only late: reconnect at will
            self.planner.late(plan.id, up_bytes, waited, *self._link())
            return self._fallback(inputs, t0, end, early, self._last_error, res.seconds, bw)
        except (OSError, ProtocolError) as e:
            self._drop(_describe(e, "waiting for the reply"))
            return self._fallback(inputs, t0, end, early, f"edge lost: {self._last_error}", res.seconds, bw)
        round_trip = time.monotonic() - sent_at
        self._last_activity = time.monotonic()
        if reply["type"] == "error":
            code, message = P.error_of(reply)
            if code == P.TIMEOUT:
                self.planner.late(plan.id, up + down, round_trip, *self._link())
            if code in (P.BAD_FRAME, P.TOO_LARGE, P.SHUTTING_DOWN):
                self._drop(f"{code}: {message}")
            return self._fallback(inputs, t0, end, early, f"edge answered {code}: {message}", res.seconds, bw)
        try:
            outputs = P.decode_tensors(reply.get("outputs"), "outputs")
            edge_s = float(reply.get("edge_s", 0.0)) + float(reply.get("queue_s", 0.0))
        except (ProtocolError, TypeError, ValueError) as e:
            self._drop(f"bad reply: {e}")
            return self._fallback(inputs, t0, end, early, f"edge sent a bad reply: {e}", res.seconds, bw)
        transfer_s = max(round_trip - edge_s, 0.0)
        before = self._link()
        self.estimator.add_transfer(up + down, transfer_s)
        self.planner.transferred(plan.id, transfer_s, before, self._link())
        self.planner.observe(plan.id, "edge", edge_s)
        return Result(outputs, plan.id, res.exit_id, "edge", f"plan {plan.id} at {_mbit(bw)}", res.seconds,
                      transfer_s, edge_s, time.monotonic() - t0, bw,
                      {"up_bytes": up, "down_bytes": down, "queue_s": float(reply.get("queue_s", 0.0))},
                      plan.latency_s)

    def _fallback(self, inputs, t0, end, early, reason, spent_s, bw) -> Result:
        plan_id = self._local_plan(end)
        res = self.part.run(plan_id, inputs, early_exit=early)
        log.info("answered locally with %s: %s", plan_id, reason)
        return Result(res.outputs, plan_id, res.exit_id, "fallback", reason, spent_s + res.seconds,
                      0.0, 0.0, time.monotonic() - t0, bw, predicted_s=self._planned_s)

    # ------------------------------------------------------------------------------ probing
    def probe(self) -> float | None:
        """Measure the link now; the new bandwidth estimate, or None. A ping, then uploads sized
        to take ~30 ms (or 2 RTT) at the estimate, each sized from the last one's rate, until two
        in a row agree within 25% (at most PROBE_ROUNDS, within PROBE_BUDGET_S): a rate far from
        the estimate is found in one probe, not one step per probe interval. The probe at a
        first request (no estimate yet) sends one upload only, inside that request's deadline."""
        with self._lock:
            if not self._connected(None):
                return None
            self._probe_locked(None)
            return self.estimator.bandwidth

    def _probe_locked(self, end: float | None) -> None:
        now = time.monotonic()
        limit = now + self.connect_timeout + 1.0 if end is None else min(end, now + self.connect_timeout + 1.0)
        try:
            t = time.monotonic()
            self._conn.request({"type": "ping", "id": next(self._ids)}, limit)
            self.estimator.add_rtt(time.monotonic() - t)
            n, last, start = self.estimator.probe_bytes(), None, time.monotonic()
            for _ in range(PROBE_ROUNDS if end is None else 1):
                t = time.monotonic()
                _, up, down = self._conn.request({"type": "probe", "id": next(self._ids),
                                                  "data": memoryview(np.zeros(n, np.uint8))}, limit)
                sample = self.estimator.add_transfer(up + down, time.monotonic() - t)
                if sample is None or (last is not None and abs(sample - last) <= PROBE_AGREE * last):
                    break
                last, n = sample, self.estimator.probe_bytes(at=sample)
                if time.monotonic() - start + 8.0 * n / sample + (self.estimator.rtt or 0.0) > PROBE_BUDGET_S:
                    break
        except (OSError, ProtocolError) as e:
            self._drop(_describe(e, "probing"))
        self._last_activity = time.monotonic()

    def _probe_loop(self) -> None:
        while not self._closed.wait(min(self.probe_interval, 1.0) / 2):
            if time.monotonic() - self._last_activity < self.probe_interval:
                continue
            if self._lock.acquire(blocking=False):
                try:
                    if self._connected(None):
                        self._probe_locked(None)
                    else:
                        self._last_activity = time.monotonic()
                finally:
                    self._lock.release()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "DeviceRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(e: BaseException, doing: str) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out {doing}"
    if isinstance(e, RemoteError):
        return str(e)
    if isinstance(e, P.ConnectionClosed):
        return f"the edge closed the connection while {doing}"
    return f"{type(e).__name__} while {doing}: {e}"


def _edge_times(value) -> dict:
    """{plan id: seconds} from a welcome's optional `edge_s`; {} when absent or malformed."""
    if not isinstance(value, dict):
        return {}
    out = {}
    for k, v in value.items():
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf:
            out[k] = float(v)
    return out


def _mbit(bw: float | None) -> str:
    return "unknown bandwidth" if bw is None else f"{bw / 1e6:.3g} Mbit/s"
