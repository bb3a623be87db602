"""The label-free signals on chosen numbers: the ATC estimate is the share of recent images
above their point's threshold, next to what calibration expects for those same images, and
the exit drift compares the exits taken with what calibration predicts at the thresholds
each image was answered with."""

from __future__ import annotations

import numpy as np
import pytest

from exitserve.repository.confidence import ESTIMATE_SCORE, confidence
from exitserve.repository.format import BudgetPoint, Calibration
from exitserve.server.monitoring import QualityMonitor, jensen_shannon
from exitserve.server.policy import ExitResult

CLASSES = 4
SURE = np.array([0.97, 0.01, 0.01, 0.01])  # estimate score ~0.88
UNSURE = np.array([0.4, 0.3, 0.2, 0.1])  # estimate score ~0.08
THRESHOLD = float(confidence(np.stack([SURE, UNSURE]), ESTIMATE_SCORE).mean())  # between the two


def calibration(atc: float | None = THRESHOLD) -> Calibration:
    def point(budget: float, accuracy: float, fractions: list[float]) -> BudgetPoint:
        return BudgetPoint(budget=budget, thresholds=[0.9, -1e9], method="reference", expected_accuracy=accuracy,
                           expected_cost=budget, exit_fractions=fractions, atc_threshold=atc)

    return Calibration(rule="max_softmax", heldout={}, exit_accuracy=[0.8, 0.9], cost_fractions=[0.3, 1.0],
                       curve=[point(0.3, 0.80, [1.0, 0.0]), point(0.65, 0.90, [0.5, 0.5]), point(1.0, 0.95, [0.0, 1.0])])


def answers(probs: np.ndarray, exit_index: int = 0, count: int = 1, deadline_hit: bool = False) -> list[ExitResult]:
    return [ExitResult(exit_index, exit_index + 1, probs, float(probs.max()), 0.3 if exit_index == 0 else 1.0,
                       deadline_hit) for _ in range(count)]


def monitor(window: int = 100, min_images: int = 10, atc: float | None = THRESHOLD) -> QualityMonitor:
    return QualityMonitor(calibration(atc), num_exits=2, window=window, min_images=min_images)


def test_jensen_shannon_is_zero_for_the_same_shares_and_one_for_disjoint() -> None:
    assert jensen_shannon(np.array([0.2, 0.8]), np.array([0.2, 0.8])) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.3, 0.3, 0.4])
    assert jensen_shannon(p, q) == pytest.approx(jensen_shannon(q, p))
    assert 0 < jensen_shannon(p, q) < 1


def test_the_estimate_is_the_share_above_the_points_threshold() -> None:
    m = monitor()
    m.observe(1, answers(SURE, count=30) + answers(UNSURE, count=10), by_thresholds=True)
    reading = m.reading()
    assert reading.estimated_accuracy == pytest.approx(0.75)
    assert reading.calibrated_accuracy == pytest.approx(0.90)  # point 1's promise, for the same images
    assert m.estimate() == reading.estimated_accuracy


def test_nothing_is_published_before_the_window_holds_enough_images() -> None:
    m = monitor(min_images=50)
    m.observe(1, answers(SURE, count=49), by_thresholds=True)
    reading = m.reading()
    assert (reading.estimated_accuracy, reading.calibrated_accuracy, reading.exit_drift) == (None, None, None)
    assert reading.window_images == 49
    m.observe(1, answers(SURE), by_thresholds=True)
    assert m.reading().estimated_accuracy == 1.0


def test_the_window_slides_old_images_out() -> None:
    m = monitor(window=100)
    m.observe(1, answers(SURE, count=100), by_thresholds=True)
    assert m.estimate() == 1.0
    m.observe(1, answers(UNSURE, count=60), by_thresholds=True)
    assert m.estimate() == pytest.approx(0.4)  # 40 sure left of 100
    m.observe(1, answers(UNSURE, count=100), by_thresholds=True)
    assert m.estimate() == 0.0 and m.reading().window_images == 100


def test_the_calibrated_baseline_follows_the_points_images_were_answered_at() -> None:
    m = monitor()
    m.observe(0, answers(SURE, count=20), by_thresholds=True)  # the cheap point promises 80%
    m.observe(2, answers(SURE, exit_index=1, count=20), by_thresholds=True)  # full depth promises 95%
    assert m.reading().calibrated_accuracy == pytest.approx(0.875)


def test_exits_as_predicted_show_no_drift_and_a_moved_mix_does() -> None:
    m = monitor()
    m.observe(1, answers(SURE, 0, 25) + answers(SURE, 1, 25), by_thresholds=True)  # point 1 predicts 50/50
    steady = m.reading()
    assert steady.exit_drift == pytest.approx(0.0, abs=1e-12)
    assert steady.exit_shares == [0.5, 0.5] and steady.expected_exit_shares == [0.5, 0.5]
    m.observe(1, answers(UNSURE, 1, 100), by_thresholds=True)  # everything goes deep now
    assert m.reading().exit_drift > 0.3


def test_drift_compares_with_the_thresholds_in_force() -> None:
    """Images at the cheap point all leave at exit 0, as that point predicts: no drift,
    though a window at point 1 would call the same exits drifted."""
    m = monitor()
    m.observe(0, answers(SURE, 0, 50), by_thresholds=True)
    assert m.reading().exit_drift == pytest.approx(0.0, abs=1e-12)
    other = monitor()
    other.observe(1, answers(SURE, 0, 50), by_thresholds=True)
    assert other.reading().exit_drift > 0.3


def test_what_the_thresholds_did_not_choose_is_left_out_of_the_drift() -> None:
    m = monitor()
    m.observe(1, answers(SURE, 0, 20, deadline_hit=True), by_thresholds=True)  # the deadline chose
    m.observe(1, answers(SURE, 0, 20), by_thresholds=False)  # a whole-batch budget chose
    m.observe(None, answers(SURE, 0, 20), by_thresholds=True)  # the client's own thresholds: no prediction
    reading = m.reading()
    assert reading.exit_drift is None and reading.window_images == 40  # both counted in the estimate


def test_a_calibration_without_the_estimates_thresholds_estimates_nothing() -> None:
    m = monitor(atc=None)
    assert not m.estimates
    m.observe(1, answers(SURE, count=50), by_thresholds=True)
    assert m.reading().estimated_accuracy is None and m.reading().exit_drift is None


def test_point_index_is_the_policys_lookup() -> None:
    m = monitor()
    assert [m.point_index(b) for b in (0.1, 0.3, 0.64, 0.65, 0.99, 1.0)] == [0, 0, 0, 1, 1, 2]


def test_default_budget_traffic_is_watched_at_the_point_its_thresholds_came_from() -> None:
    """The online controller serves the default budget with thresholds looked up at a
    nudged budget; the estimate and the drift must compare with that point, not with the
    budget it holds (which the answer reports as applied)."""
    from exitserve.server.budget import decide_budget
    from exitserve.server.options import InferenceOptions
    from tests.support.synthetic import synthetic_engine

    policy = synthetic_engine(default_budget=0.5, online_budget=True).policy
    policy.controller.effective = 0.2  # costs ran high: the controller looks up a cheaper point
    decision, thresholds = decide_budget("synthetic", policy, InferenceOptions(), may_lower=False)
    assert decision.applied == 0.5 and decision.lookup_budget == 0.2
    assert list(thresholds) == list(policy.thresholds_for(0.2))
    named, _ = decide_budget("synthetic", policy, InferenceOptions("budget", 0.5), may_lower=False)
    assert named.lookup_budget == 0.5
