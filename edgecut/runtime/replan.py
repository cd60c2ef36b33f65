"""What the device plans with: per plan, device and edge seconds from measurements, corrected online.

`Replanner` (below) holds a runtime's plans: the device calibration, the edge's welcome times,
the online estimates, and the plan table re-solved from them.

`LatencyEstimates` starts from the artifact's predictions or a calibration (`set`), then records
every request's measured device, transfer and edge seconds per plan in a sliding window
(`observe`). It plans to a quantile of what it observed (p99 by default: ALERT's probabilistic
deadline, from measurements), and changes an estimate when

- a step up is seen: the last `step` samples (3) all lie above the estimate by more than
  `tolerance` (15%); the estimate becomes the largest of them and the older samples are dropped
  (they describe the machine before the step). A step down waits for the drift rule: a plan too
  slow misses deadlines, one too fast only costs accuracy for a while;
- a request missed its deadline because that part did not finish (a timeout: a censored sample,
  a lower bound): at once, the estimate becomes twice what was waited (what was waited is
  about the deadline's share of that part, and planning to it would just fit again);
- it drifts: with `min_samples` or more in the window, its quantile is off the estimate by more
  than `tolerance`.

A rise on one plan raises the same side's other plans too: a throttled or loaded device slows
every part it runs (by the same ratio), a busy edge adds its queue to every request (by the same
difference, or the same ratio where that says slower); the runtime should not try each plan in
turn to learn it. A fall moves only the plan that was measured.

An estimate raised online for a plan that is then no longer used is never measured again, so it
returns to its calibrated value after `recheck_s` without samples (30 s; doubled each time the
plan proves still slow, reset when it runs as calibrated): the planner tries it again. Costs one
late request per recheck while the edge stays busy; without it, one slow spell would pin the
device to a worse plan for good. Thread-safe. Torch-free.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from edgecut import planning
from edgecut.runtime.calibration import ensure_calibration, quantile
from edgecut.types import Link

LINK_FACTOR_MAX = 3.0    # the link's jitter planned for is at most this x its model
LINK_TOLERANCE = 0.02    # a link factor that moved less than this (relative) is not a change
LINK_STEP = 1.5          # a bandwidth estimate that moved more than this x between transfers is a new link

SIDES = ("device", "edge")
CENSORED_FACTOR = 2.0     # a part that did not finish in t seconds is planned as taking this x t

log = logging.getLogger("edgecut.runtime.replan")


@dataclass(frozen=True)
class Change:
    """An estimate that moved: which plan and side, from and to (seconds), and why."""

    plan_id: str
    side: str
    old_s: float
    new_s: float
    why: str

    def __str__(self) -> str:
        return (f"{self.side} time of {self.plan_id}: {self.old_s * 1e3:.3g} -> {self.new_s * 1e3:.3g} ms "
                f"({self.why})")


class LatencyEstimates:
    """Per plan id and side, the seconds to plan with (see the module docstring). `routes` are
    `planning.RouteCost` values holding the starting estimates."""

    def __init__(self, routes, *, quantile: float = 0.99, window: int = 32, tolerance: float = 0.15,
                 step: int = 3, min_samples: int = 8, recheck_s: float = 30.0):
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), e.g. 0.99, got {quantile}")
        self.quantile, self.window, self.tolerance = float(quantile), int(window), float(tolerance)
        self.step, self.min_samples, self.recheck_s = int(step), int(min_samples), float(recheck_s)
        self._routes = {r.plan_id: r for r in routes}
        self._est = {"device": {p: r.device_s for p, r in self._routes.items()},
                     "edge": {p: r.edge_s for p, r in self._routes.items() if not r.device_only}}
        self._obs = {s: {p: deque(maxlen=self.window) for p in self._routes} for s in (*SIDES, "transfer")}
        self._base = {s: dict(e) for s, e in self._est.items()}            # what `relax` returns to
        self._seen = {s: dict.fromkeys(e, -math.inf) for s, e in self._est.items()}  # last sample or rise
        self._backoff = {s: dict.fromkeys(e, self.recheck_s) for s, e in self._est.items()}
        self._lock = threading.Lock()
        self.version = 0                  # bumped by every change of an estimate
        self._cache = (-1, [])            # (version, routes)
        self._raised = False              # some estimate may be above its calibrated value
        self.changes: list[Change] = []   # every change, in order
        self._link = deque(maxlen=self.window)   # observed / modelled link time, one per transfer
        self.link_factor = 1.0                   # its quantile (>= 1, <= LINK_FACTOR_MAX): planned with

    def set(self, side: str, seconds: dict) -> None:
        """Replace the estimates of `side` for the plans `seconds` names (a calibration, the
        edge's welcome) and forget their samples."""
        with self._lock:
            for pid, s in seconds.items():
                if pid in self._est[side]:
                    self._est[side][pid] = self._base[side][pid] = float(s)
                    self._obs[side][pid].clear()
            self.version += 1

    def seconds(self, side: str) -> dict:
        with self._lock:
            return dict(self._est[side])

    def routes(self) -> list:
        """The routes with the current estimates (rebuilt only when an estimate moved)."""
        with self._lock:
            if self._cache[0] != self.version:
                self._cache = (self.version, [replace(r, device_s=self._est["device"][p],
                                                      edge_s=self._est["edge"].get(p, 0.0),
                                                      link_factor=self.link_factor)
                                              for p, r in self._routes.items()])
            return self._cache[1]

    def route(self, plan_id: str):
        """The route of `plan_id` as given (its starting estimates, link factor 1), or None."""
        return self._routes.get(plan_id)

    def observed(self, plan_id: str, side: str) -> tuple:
        with self._lock:
            return tuple(self._obs[side].get(plan_id, ()))

    def observe(self, plan_id: str, side: str, seconds: float, *, censored: bool = False) -> Change | None:
        """Record one measurement of `side` ("device", "edge" or "transfer") of `plan_id`;
        `censored`: the part did not finish, it took at least `seconds`. The change it made to
        the estimates, if any."""
        if plan_id not in self._routes or (side != "transfer" and plan_id not in self._est[side]):
            return None
        seconds = max(float(seconds), 0.0)
        with self._lock:
            w = self._obs[side][plan_id]
            w.append(seconds)
            if side == "transfer":
                return None
            est = self._est[side][plan_id]
            tol = self.tolerance * est
            new, why = None, ""
            self._seen[side][plan_id] = time.monotonic()
            recent = list(w)[-self.step:]
            if censored and seconds > est:       # a lower bound: planning to it would just fit again
                new, why = CENSORED_FACTOR * seconds, f"did not finish in {seconds * 1e3:.3g} ms"
            elif len(recent) == self.step and all(x > est + tol for x in recent):
                new, why = max(recent), f"step seen in {self.step} requests"
                w.clear()
                w.extend(recent)
            elif len(w) >= self.min_samples:
                q = quantile(w, self.quantile)
                if abs(q - est) > tol:
                    new, why = q, f"p{self.quantile * 100:g} of the last {len(w)} requests"
            if new is None or new == est:
                if est <= self._base[side][plan_id] * (1 + self.tolerance):
                    self._backoff[side][plan_id] = self.recheck_s        # it ran as calibrated
                return None
            self._move(side, plan_id, est, new)
            change = Change(plan_id, side, est, new, why)
            self.changes.append(change)
            self.version += 1
            return change

    def observe_link(self, observed: float, modelled: float) -> Change | None:
        """Record one transfer: `observed` seconds where the link model said `modelled`. The
        link's time is planned as the model times the quantile of these ratios (so the spread of
        transfer times counts like that of compute times); the change, if it moved."""
        if not (modelled > 0 and observed >= 0):
            return None
        with self._lock:
            self._link.append(observed / modelled)
            if len(self._link) < self.min_samples:
                return None
            new = min(max(quantile(self._link, self.quantile), 1.0), LINK_FACTOR_MAX)
            if abs(new - self.link_factor) <= LINK_TOLERANCE * self.link_factor:
                return None
            change = Change("*", "link", self.link_factor, new, f"p{self.quantile * 100:g} of the last "
                                                                  f"{len(self._link)} transfers / link model")
            self.link_factor = new
            self.changes.append(change)
            self.version += 1
            return change

    def reset_link(self) -> None:
        """The bandwidth estimate stepped: the ratios describe the old link; start again."""
        with self._lock:
            self._link.clear()
            if self.link_factor != 1.0:
                self.link_factor = 1.0
                self.version += 1

    def _move(self, side: str, plan_id: str, old: float, new: float) -> None:
        """Set `plan_id`'s estimate; raise the side's other plans with a rise (with self._lock)."""
        ests = self._est[side]
        ests[plan_id] = new
        if new <= old:
            return
        self._raised = True
        ratio = new / old if old > 0 else None
        for pid, e in ests.items():
            if pid == plan_id:
                continue
            self._seen[side][pid] = time.monotonic()
            moved = ([e * ratio] if ratio is not None else []) + ([e + new - old] if side == "edge" or ratio is None else [])
            ests[pid] = max(0.0, max(moved))
            self._obs[side][pid].clear()       # its samples describe the machine before the change


    def relax(self) -> list:
        """Estimates raised online whose plan has not been measured for its backoff (first
        `recheck_s`, doubled each time): back to their calibrated value, so the planner tries the
        plan again (an edge that was busy may be free now; a still busy one is seen at the first
        request and raised again). The changes made."""
        now, changes = time.monotonic(), []
        with self._lock:
            if not self._raised:
                return changes
            raised = False
            for side in SIDES:
                for pid, e in self._est[side].items():
                    base, wait = self._base[side][pid], self._backoff[side][pid]
                    if e > base * (1 + self.tolerance) and now - self._seen[side][pid] >= wait:
                        self._est[side][pid], self._seen[side][pid] = base, now
                        self._obs[side][pid].clear()
                        self._backoff[side][pid] = 2 * wait
                        changes.append(Change(pid, side, e, base, f"not measured for {wait:g} s: "
                                                                   "trying its calibrated time again"))
                    raised |= self._est[side][pid] > base * (1 + self.tolerance)
            self._raised = raised
            if changes:
                self.changes.extend(changes)
                self.version += 1
        return changes


class Replanner:
    """What a `DeviceRuntime` plans with: the runnable plans of `part`, their estimates (the
    device calibration, the edge's welcome times, online correction), and `table`, the plan
    table re-solved from them (`planning.solve_table`) whenever they move.

    With nothing measured (`measured` False: no calibration, no welcome times), `choose` follows
    the artifact's table; a part whose `table` is not its manifest's (a wrapper that narrows the
    choice) is planned over that table's plans only. `early_exit`: the device times planned with
    include the exit heads (run, not taken: the worst case), as the runtime runs its plans."""

    def __init__(self, part, *, deadline: float | None = None, calibrate=True, quantile: float = 0.99,
                 adapt: bool = True, window: int = 32, recheck_s: float = 30.0, early_exit: bool = False):
        self.part, self.deadline, self.adapt = part, deadline, adapt
        self.table = part.table
        self.rtt = 0.0
        self.estimates = LatencyEstimates(self._routes(), quantile=quantile, window=window, recheck_s=recheck_s)
        self.calibration = ensure_calibration(part, "device", calibrate)
        self.measured = self.calibration is not None
        self._welcome: dict = {}
        if self.calibration is not None:
            self.estimates.set("device", self.calibration.seconds(quantile, early_exit))
            self.resolve()

    def _routes(self) -> list:
        man = self.part.manifest
        routes = planning.route_costs(man)
        if self.part.table is not getattr(man, "table", None):        # a wrapper narrowed the choice
            keep = {p.id for p in self.part.table.plans}
            routes = [r for r in routes if r.plan_id in keep]
        return routes

    def deadline_of(self, deadline: float | None) -> float:
        d = self.deadline if deadline is None else deadline
        return self.table.deadline if d is None else d

    def resolve(self) -> None:
        """Re-solve `table` from the current estimates and the last link RTT seen."""
        self.table = planning.solve_table(self.estimates.routes(), self.deadline_of(None), rtt=self.rtt)

    def choose(self, bandwidth: float, rtt: float, deadline: float | None, edge_available: bool):
        """The Plan for one request (see `DeviceRuntime.choose_plan`)."""
        self.rtt = rtt
        if self.adapt and self.measured:
            relaxed = self.estimates.relax()
            for change in relaxed:
                log.info("re-planning: %s", change)
            if relaxed:
                self.resolve()
        if not self.measured and (deadline is None or math.isclose(deadline, self.table.deadline, rel_tol=1e-6)):
            return self.table.lookup(bandwidth)
        d = self.deadline_of(deadline)
        route = planning.choose(self.estimates.routes(), bandwidth, d, rtt=rtt, edge_available=edge_available)
        return route.plan(Link(bandwidth if bandwidth > 0 else math.inf, rtt), d)

    def local_plan(self, left: float) -> str:
        """The most accurate device-only plan whose device time fits `left` seconds, else the
        artifact's fallback plan."""
        local = [r for r in self.estimates.routes() if r.device_only and r.device_s <= left]
        if local:
            return max(local, key=lambda r: (r.accuracy if r.accuracy == r.accuracy else -math.inf, r.exit)).plan_id
        return self.part.fallback_plan_id

    def observe(self, plan_id: str, side: str, seconds: float, censored: bool = False) -> None:
        """Online correction: record a measured time; re-solve when an estimate moved."""
        if not (self.adapt and self.measured):
            return
        change = self.estimates.observe(plan_id, side, seconds, censored=censored)
        if change is not None:
            log.info("re-planning: %s", change)
            self.resolve()

    def transferred(self, plan_id: str, seconds: float, before: tuple, after: tuple) -> None:
        """Online correction of the link: a transfer of `plan_id` took `seconds`; `before` and
        `after` are the (bandwidth, rtt) estimates before and after it was counted. A step of the
        estimate (over `LINK_STEP`x) resets the link's ratios; otherwise the transfer is compared
        with the model at the new estimate."""
        self.observe(plan_id, "transfer", seconds)
        route = self.estimates.route(plan_id)
        if not (self.adapt and self.measured) or route is None or not all(b > 0 and math.isfinite(b)
                                                                          for b in (before[0], after[0])):
            return
        if max(before[0] / after[0], after[0] / before[0]) > LINK_STEP:
            self.estimates.reset_link()
            self.resolve()
            return
        change = self.estimates.observe_link(seconds, route.transfer_s(Link(*after)))
        if change is not None:
            log.info("re-planning: %s", change)
            self.resolve()

    def late(self, plan_id: str, nbytes: int, waited: float, bandwidth: float, rtt: float) -> None:
        """The edge did not answer within the deadline: its part took at least `waited` less the
        link's share at the current estimate (a censored sample, so a busy edge is seen at the
        first request it fails; a link that slowed down is charged to the edge too, and the
        decision, to stay on the device, is the same)."""
        link = Link(bandwidth if bandwidth > 0 else math.inf, rtt).transfer_seconds(nbytes)
        self.observe(plan_id, "edge", waited - link, censored=True)

    def welcomed(self, edge_s: dict) -> None:
        """The edge's measured times (its welcome): plan with them, once per new set."""
        if edge_s and edge_s != self._welcome:
            self._welcome = dict(edge_s)
            self.estimates.set("edge", edge_s)
            self.measured = True
            self.resolve()
