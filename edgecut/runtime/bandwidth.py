"""Estimate the device -> edge bandwidth and round-trip time from the device's own transfers.

Every request the device sends to the edge is a measurement: `bytes` went up in `seconds` of
round trip (edge compute already subtracted). A small round trip is an RTT sample; a large
one a bandwidth sample `8 * bytes / (seconds - rtt)` (`rate`). The estimate is the median of the
last `window` bandwidth samples (one outlier cannot move it, two consecutive ones do), and the RTT
the minimum of the recent small round trips (queueing only ever adds delay).
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque

RTT_DOMINATED = 0.1        # serialization under this share of a transfer's time: not measurable
PROBE_MAX = 1024 * 1024    # bytes: the largest probe


class BandwidthEstimator:
    """Online bandwidth/RTT estimate. A transfer smaller than `min_bytes` is an RTT sample only:
    counting it as a rate sample made 32 devices on one loaded server read their own scheduling
    jitter as a slow link (small crossings are measured by the idle probe instead, which sends at
    least `min_bytes`). `window`: bandwidth samples kept; `rtt_window`: RTT samples kept.
    Thread-safe."""

    def __init__(self, *, window: int = 3, rtt_window: int = 8, min_bytes: int = 16 * 1024,
                 initial_bandwidth: float | None = None, initial_rtt: float | None = None):
        self.window, self.rtt_window, self.min_bytes = window, rtt_window, min_bytes
        self.initial_bandwidth, self.initial_rtt = initial_bandwidth, initial_rtt
        self._bw = deque(maxlen=window)
        self._rtt = deque(maxlen=rtt_window)
        self._lock = threading.Lock()
        self.last_sample_at = None

    def add_rtt(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._rtt.append(seconds)

    def add_transfer(self, nbytes: int, seconds: float) -> float | None:
        """`nbytes` crossed (up and down) in `seconds` of network round trip; the bandwidth
        sample it gave (bit/s), or None when it was an RTT sample only."""
        if seconds <= 0:
            return None
        self.last_sample_at = time.monotonic()
        if nbytes < self.min_bytes:    # small: the time is mostly round trip, overheads and jitter;
            bw = self.bandwidth        # its serialization at the current estimate is not round trip
            self.add_rtt(seconds - (8.0 * nbytes / bw if bw else 0.0))
            return None
        sample = self.rate(nbytes, seconds)
        with self._lock:
            self._bw.append(sample)
        return sample

    def rate(self, nbytes: int, seconds: float) -> float:
        """The bit/s that `nbytes` in `seconds` of round trip say, the RTT taken off. A transfer
        whose serialization is lost in the RTT (its time minus the RTT under a tenth of its
        time, or negative: a stale RTT) only says the rate is high: it counts as 10x the naive
        rate 8*nbytes/seconds, and a probe that sees it sends more (`DeviceRuntime.probe`)."""
        serial = max(seconds - (self.rtt or 0.0), RTT_DOMINATED * seconds)
        return 8.0 * nbytes / serial

    @property
    def bandwidth(self) -> float | None:
        """Bit/s, or None before the first sample (and no initial value)."""
        with self._lock:
            if not self._bw:
                return self.initial_bandwidth
            return statistics.median(self._bw)

    @property
    def rtt(self) -> float | None:
        with self._lock:
            return min(self._rtt) if self._rtt else self.initial_rtt

    @property
    def samples(self) -> int:
        return len(self._bw)

    def probe_bytes(self, target_s: float = 0.03, lo: int = 16 * 1024, hi: int = PROBE_MAX,
                    at: float | None = None) -> int:
        """How many bytes a probe should send to take about `target_s`, or twice the RTT if that
        is longer (a shorter transfer is timed mostly by the RTT's jitter), at the current
        estimate (or at `at` bit/s)."""
        bw = self.bandwidth if at is None else at
        if bw is None:
            return lo
        target_s = max(target_s, 2.0 * (self.rtt or 0.0))
        return int(min(max(bw * target_s / 8.0, lo), hi))

    def __repr__(self) -> str:
        bw, rtt = self.bandwidth, self.rtt
        return (f"BandwidthEstimator(bandwidth={'?' if bw is None else f'{bw / 1e6:.3g} Mbit/s'}, "
                f"rtt={'?' if rtt is None else f'{rtt * 1e3:.2f} ms'}, samples={self.samples})")
