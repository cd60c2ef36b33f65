"""Online correction rules (estimates.LatencyEstimates), on plain numbers."""
import pytest

from edgecut.planning import RouteCost
from edgecut.runtime.replan import LatencyEstimates

MS = 1e-3


def routes():
    return [RouteCost("e0/device", 0, 0.6, True, 2 * MS, 0.0, 0, 0),
            RouteCost("e1/mid", 1, 0.9, False, 4 * MS, 2 * MS, 1000, 40),
            RouteCost("e1/input", 1, 0.9, False, 0.1 * MS, 4 * MS, 3000, 40)]


def test_a_step_up_is_taken_after_three_requests_and_raises_the_sides_other_plans():
    est = LatencyEstimates(routes())
    assert est.observe("e1/mid", "edge", 12 * MS) is None
    assert est.observe("e1/mid", "edge", 11 * MS) is None
    ch = est.observe("e1/mid", "edge", 13 * MS)
    assert ch is not None and ch.new_s == 13 * MS and "step" in ch.why
    edge = est.seconds("edge")
    assert edge["e1/mid"] == 13 * MS
    assert edge["e1/input"] == pytest.approx(26 * MS)      # 6.5x, more than +11 ms
    assert est.seconds("device") == {"e0/device": 2 * MS, "e1/mid": 4 * MS, "e1/input": 0.1 * MS}
    assert est.observed("e1/mid", "edge") == (12 * MS, 11 * MS, 13 * MS)
    assert est.observed("e1/input", "edge") == ()


def test_a_device_rise_moves_other_plans_by_the_ratio_only():
    est = LatencyEstimates(routes())
    for _ in range(3):
        est.observe("e0/device", "device", 4 * MS)
    dev = est.seconds("device")
    assert dev["e0/device"] == 4 * MS and dev["e1/mid"] == pytest.approx(8 * MS)
    assert dev["e1/input"] == pytest.approx(0.2 * MS)       # not +2 ms: a device's slowdown is a ratio


def test_noise_and_one_outlier_move_nothing_a_drift_does():
    est = LatencyEstimates(routes())
    for s in (2.1, 1.9, 2.0, 2.2, 1.8, 2.0, 9.0, 2.1, 2.0, 1.9):
        assert est.observe("e0/device", "device", s * MS) is None
    # a slow drift under the step rule's reach: the window's p99 (its second largest) decides
    est = LatencyEstimates(routes())
    changes = [est.observe("e0/device", "device", s * MS) for s in (2.5, 2.0, 2.6, 2.0, 2.55, 2.0, 2.0, 2.6)]
    assert [c for c in changes if c] and est.seconds("device")["e0/device"] == pytest.approx(2.6 * MS)


def test_a_step_down_waits_for_the_window_and_moves_only_its_plan():
    est = LatencyEstimates(routes())
    for i in range(7):
        assert est.observe("e1/mid", "device", 1 * MS) is None
    ch = est.observe("e1/mid", "device", 1 * MS)
    assert ch is not None and ch.new_s == pytest.approx(1 * MS)
    assert est.seconds("device")["e0/device"] == 2 * MS


def test_a_timeout_counts_at_once():
    est = LatencyEstimates(routes())
    ch = est.observe("e1/input", "edge", 50 * MS, censored=True)
    assert ch is not None and est.seconds("edge")["e1/input"] == 100 * MS and "did not finish in 50 ms" in ch.why
    assert est.observe("e1/input", "edge", 1 * MS, censored=True) is None     # a lower bound under it says nothing


def test_set_replaces_estimates_and_unknown_plans_are_ignored():
    est = LatencyEstimates(routes())
    est.set("edge", {"e1/mid": 0.5 * MS, "e9/nope": 1.0})
    assert est.seconds("edge") == {"e1/mid": 0.5 * MS, "e1/input": 4 * MS}
    assert est.observe("e0/device", "edge", 1.0) is None and est.observe("e9/x", "device", 1.0) is None
    r = {x.plan_id: x for x in est.routes()}
    assert r["e1/mid"].edge_s == 0.5 * MS and r["e0/device"].edge_s == 0.0
    with pytest.raises(ValueError):
        LatencyEstimates(routes(), quantile=1.5)


def test_a_raised_estimate_of_an_unused_plan_is_tried_again_with_backoff():
    import time

    est = LatencyEstimates(routes(), recheck_s=0.05)
    est.observe("e1/input", "edge", 50 * MS, censored=True)
    assert est.relax() == []                                        # just raised
    time.sleep(0.06)
    changes = est.relax()
    assert {(c.plan_id, c.new_s) for c in changes} == {("e1/input", 4 * MS), ("e1/mid", 2 * MS)}
    est.observe("e1/input", "edge", 60 * MS, censored=True)         # still slow: raised again
    time.sleep(0.06)
    assert not [c for c in est.relax() if c.plan_id == "e1/input"]  # now waits 0.1 s
    time.sleep(0.05)
    assert [c for c in est.relax() if c.plan_id == "e1/input"]
    est.observe("e1/input", "edge", 4 * MS)                         # ran as calibrated: backoff reset
    est.observe("e1/input", "edge", 70 * MS, censored=True)
    time.sleep(0.06)
    assert [c for c in est.relax() if c.plan_id == "e1/input"]
