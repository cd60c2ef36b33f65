"""The bandwidth estimator's arithmetic (no sockets: the socket-level behaviour is in test_link)."""
from edgecut.runtime.bandwidth import BandwidthEstimator


def test_median_of_three_ignores_one_outlier_and_follows_two():
    e = BandwidthEstimator(initial_bandwidth=5e6)
    assert e.bandwidth == 5e6 and e.rtt is None
    e.add_rtt(0.010)
    e.add_rtt(0.012)
    assert e.rtt == 0.010
    for _ in range(3):
        e.add_transfer(1_000_000, 0.010 + 8e6 / 100e6)        # 100 Mbit/s
    assert abs(e.bandwidth - 100e6) < 1e3
    e.add_transfer(1_000_000, 0.010 + 8e6 / 2e6)              # one slow transfer: not yet
    assert e.bandwidth > 50e6
    e.add_transfer(1_000_000, 0.010 + 8e6 / 2e6)              # two: follow
    assert abs(e.bandwidth - 2e6) < 1e3


def test_small_transfers_are_rtt_samples_only():
    e = BandwidthEstimator()
    e.add_transfer(3000, 0.0025)
    e.add_transfer(3000, 0.0300)                              # slow, but maybe only jitter
    assert e.bandwidth is None and e.samples == 0 and e.rtt == 0.0025
    e.add_transfer(16 * 1024, 0.0025 + 8 * 16 * 1024 / 1e6)   # a probe-sized one measures the rate
    assert abs(e.bandwidth - 1e6) < 1e3


def test_stale_rtt_does_not_give_infinite_bandwidth():
    e = BandwidthEstimator()
    e.add_rtt(0.050)
    e.add_transfer(100_000, 0.040)                            # faster than the "RTT": 10x naive
    assert e.bandwidth == 8 * 100_000 / 0.004


def test_a_transfer_shorter_than_the_rtt_still_measures_the_rate():
    # 93.5 kB at 100 Mbit/s over a 20 ms RTT: 7.5 ms of serialization in 27.5 ms; an earlier
    # rule read such samples as half the rate, and probes crept up ~1.4x per probe interval
    e = BandwidthEstimator()
    e.add_rtt(0.020)
    e.add_transfer(93_500, 0.020 + 8 * 93_500 / 100e6)
    assert abs(e.bandwidth - 100e6) < 1e3


def test_probe_size_targets_30ms_or_two_rtt_within_bounds():
    assert BandwidthEstimator().probe_bytes() == 16 * 1024
    assert BandwidthEstimator(initial_bandwidth=8e6).probe_bytes() == 30_000
    assert BandwidthEstimator(initial_bandwidth=1e10).probe_bytes() == 1024 * 1024
    assert BandwidthEstimator(initial_bandwidth=8e6, initial_rtt=0.040).probe_bytes() == 80_000
    assert BandwidthEstimator(initial_bandwidth=8e6).probe_bytes(at=16e6) == 60_000
