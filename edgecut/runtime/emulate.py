"""Emulate a slower device on this machine, the way `linkemu` emulates a slower network.

`EmulatedDevice(part, DeviceModel(...))` wraps the device side of an artifact. Every library
call really computes on this CPU (the answers are real), then waits until the time the fixed
device model gives that call has passed:

    call_s + macs / macs_per_s + s_per_elem * (input + output elements)

where `macs` is the work the build recorded for the segment (`Segment.macs`) and the elements
come from the manifest's tensor specs. The time depends on the artifact and the model only, not
on this machine's speed or load, so the device is the same from run to run and from VM to VM.
The wait sleeps, then polls the clock for its last `SPIN_S`, so a call ends within microseconds
of its model time. A call whose real compute takes longer than its model time is not stretched
further: `overruns` records it (segment, real seconds, model seconds), since it means the model
device is faster than this machine can emulate.

`DeviceModel.profile()` is the compile-time profile of the same device (every layer charged its
MACs at `macs_per_s`, every segment call `call_s` + `s_per_elem` per element), so a plan
predicted with it and the device measured by calibration describe one device.

`SlowDevice(part, slowdown)` is the older emulation: `slowdown` times each segment's warm time on
this CPU. It carries this machine's noise into the device's speed; kept for comparisons.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

SPIN_S = 1e-3


@dataclass(frozen=True)
class DeviceModel:
    """A fixed device: a library call takes `call_s` + MACs / `macs_per_s` + `s_per_elem` per
    input and output element. `message_overhead_s` is its network stack's fixed cost per
    message (what a profile's `message_overhead_s` holds)."""

    macs_per_s: float = 1e9
    call_s: float = 0.5e-3
    s_per_elem: float = 0.0
    message_overhead_s: float = 0.0
    name: str = "emulated"

    def __post_init__(self):
        from edgecut.errors import UsageError

        if not (self.macs_per_s > 0 and math.isfinite(self.macs_per_s)):
            raise UsageError(f"an emulated device's macs_per_s must be a positive number, got {self.macs_per_s}")
        if not min(self.call_s, self.s_per_elem, self.message_overhead_s) >= 0:
            raise UsageError("an emulated device's call_s, s_per_elem and message_overhead_s must be >= 0 seconds")

    def call_seconds(self, macs: float, elems: int = 0) -> float:
        """Seconds one library call of `macs` work with `elems` input + output elements takes."""
        return self.call_s + float(macs) / self.macs_per_s + self.s_per_elem * elems

    def profile(self, target: str = "local"):
        """The compile-time `Profile` of this device (for `edgecut.compile(profile=...)`)."""
        from edgecut.costmodel.profile import Profile
        from edgecut.frontend import meta

        linear = {"type": "linear", "coef": [1.0 / self.macs_per_s, 0.0, 0.0, 0.0], "intercept": 0.0,
                  "floor": 0.0, "positive": True}      # WORK features: macs, in, out elements, params
        kinds = {k: {"models": {"work": linear}, "features": {"work": "work"}, "chosen": "work", "cv": {}, "n": 0}
                 for k in meta.KINDS if k not in meta.NO_COST_KINDS}
        return Profile(name=self.name, target=target, kinds=kinds, fused_s_per_elem=0.0,
                       fallback={"s_per_mac": 1.0 / self.macs_per_s, "s_per_elem": 0.0, "intercept": 0.0},
                       message_overhead_s=self.message_overhead_s, error_p95=0.0, layer_mdape=0.0,
                       calibrated=True, source="emulated",
                       notes=f"emulated device: {self.macs_per_s:g} MAC/s, {self.call_s * 1e3:g} ms a call",
                       segment={"intercept": self.call_s, "s_per_elem": self.s_per_elem})


# A Raspberry-Pi-class device: alexnet_cifar's 28 M MACs in ~40 ms (what the shipped local profile
# scaled 100x predicted for it), 0.5 ms a library call, 2 ns an element copied in or out.
PI_CLASS = DeviceModel(macs_per_s=0.7e9, call_s=0.5e-3, s_per_elem=2e-9, name="emulated-pi")


def wait_until(t_end: float) -> None:
    """Sleep, then poll the clock for the last `SPIN_S`, until perf_counter() >= t_end."""
    left = t_end - time.perf_counter()
    if left > SPIN_S:
        time.sleep(left - SPIN_S)
    while time.perf_counter() < t_end:
        pass


class _Paced:
    """A copy of a device part whose library calls are wrapped by `self._pace(name, fn)`;
    everything else is the wrapped part's (manifest, table, input names, fallback plan)."""

    def _wrap(self, part) -> None:
        self._part = copy.copy(part)          # the caller's part keeps its own speed
        self._part._run = {name: self._pace(name, fn) for name, fn in part._run.items()}

    def run(self, plan_id, tensors, early_exit: bool = True):
        return self._part.run(plan_id, tensors, early_exit=early_exit)

    def __getattr__(self, name):
        if name == "_part":
            raise AttributeError(name)
        return getattr(self._part, name)


class EmulatedDevice(_Paced):
    """A device part whose library calls take the time `model` gives them (see the module
    docstring)."""

    def __init__(self, part, model: DeviceModel):
        self.model = model
        self.overruns: list[tuple[str, float, float]] = []
        m = part.manifest
        segments = {s.name: s for s in m.segments}

        def elems(names) -> int:
            return sum(math.prod(m.tensors[n].shape) for n in names if n in m.tensors)

        self.call_seconds = {name: model.call_seconds(segments[name].macs,
                                                      elems(segments[name].inputs) + elems(segments[name].outputs))
                             for name in part._run}
        self._wrap(part)

    def _pace(self, name: str, fn):
        want = self.call_seconds[name]

        def run(inputs):
            t0 = time.perf_counter()
            out = fn(inputs)
            spent = time.perf_counter() - t0
            if spent > want:
                self.overruns.append((name, spent, want))
            else:
                wait_until(t0 + want)
            return out
        return run

    def route_seconds(self, plan_id: str, early_exit: bool = True) -> float:
        """The model's seconds for plan `plan_id`'s device part when no early exit fires."""
        r = self._part.manifest.route(plan_id)
        calls = list(r.device) + ([h for _, _, heads in r.checks for h in heads] if early_exit else [])
        return sum(self.call_seconds[c] for c in calls)


class SlowDevice(_Paced):
    """A device part whose segment calls take `slowdown` x their warm time on this CPU (measured
    once per segment, back to back, at its first call). This machine's speed and noise become
    the device's: use `EmulatedDevice` for a device that is the same from run to run."""

    def __init__(self, part, slowdown: float):
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown must be >= 1 (a slower device), got {slowdown}")
        self.slowdown = float(slowdown)
        self._wrap(part)

    def _pace(self, name: str, fn):
        warm = []

        def run(inputs):
            t0 = time.perf_counter()
            out = fn(inputs)
            spent = time.perf_counter() - t0
            if not warm:                      # first call: time the segment warm, back to back
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    fn(inputs)
                    times.append(time.perf_counter() - t)
                warm.append(sorted(times)[len(times) // 2])
            time.sleep(max(0.0, self.slowdown * warm[0] - spent))
            return out
        return run
