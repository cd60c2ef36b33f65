"""Emulate a slower device on this machine, the way `linkemu` emulates a slower network.

`SlowDevice(part, slowdown=100)` wraps the device side of an artifact: every compiled segment
really computes on this CPU, then the call waits until `slowdown` times the segment's *warm*
time on this CPU has passed (measured once per segment, back to back, at its first call), so a
laptop behaves like a Raspberry-Pi-class device. The warm time is the reference because the
waiting itself lets this CPU's thread pool fall asleep and its caches go cold: stretching each
call's own time would multiply those wake-ups 100x, which no real device pays. Only segment
calls are stretched; the runtime's own Python work (routing, entropy checks, sockets) runs at
this machine's speed. Plan with the matching profile (`Profile.scaled(slowdown)`) so that
predictions describe the emulated device.
"""
from __future__ import annotations

import copy
import time


class SlowDevice:
    """A device part whose segment calls take `slowdown` x as long as they compute. Everything
    else is the wrapped part's (manifest, table, input names, fallback plan)."""

    def __init__(self, part, slowdown: float):
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown must be >= 1 (a slower device), got {slowdown}")
        self.slowdown = float(slowdown)
        self._part = copy.copy(part)          # the caller's part keeps its own speed
        self._part._run = {name: self._stretch(fn) for name, fn in part._run.items()}

    def _stretch(self, fn):
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

    def run(self, plan_id, tensors, early_exit: bool = True):
        return self._part.run(plan_id, tensors, early_exit=early_exit)

    def __getattr__(self, name):
        return getattr(self._part, name)
