"""Emulate a slower device on this machine, the way `linkemu` emulates a slower network.

`SlowDevice(part, slowdown=20)` wraps the device side of an artifact: every `run` really computes
on this CPU, then waits until `slowdown` times the measured compute time has passed, so a laptop
behaves like a Raspberry-Pi-class device. Plan with the matching profile
(`Profile.scaled(slowdown)`) so that predictions describe the emulated device.
"""
from __future__ import annotations

import dataclasses
import time


class SlowDevice:
    """A device part whose `run` takes `slowdown` x as long as it computes. Everything else is the
    wrapped part's (manifest, table, input names, fallback plan)."""

    def __init__(self, part, slowdown: float):
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown must be >= 1 (a slower device), got {slowdown}")
        self._part, self.slowdown = part, float(slowdown)

    def run(self, plan_id, tensors, early_exit: bool = True):
        res = self._part.run(plan_id, tensors, early_exit=early_exit)
        stretched = res.seconds * self.slowdown
        time.sleep(max(0.0, stretched - res.seconds))
        return dataclasses.replace(res, seconds=stretched)

    def __getattr__(self, name):
        return getattr(self._part, name)
