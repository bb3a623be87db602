"""Is the model still right on what it is sent? Label-free signals over recent images.

Calibration promises an accuracy measured on held-out images; live traffic drifts away
from them and the promise goes stale. Two signals need no labels, only what an early-exit
run produces anyway:

* **an accuracy estimate** (ATC, Garg et al., ICLR 2022): calibration stored, per budget
  point, the score threshold above which the held-out share of images equals the held-out
  accuracy. The share of recent images above their point's threshold estimates the
  accuracy now. It sits next to what calibration expects for the same images (the budgets
  they were answered at), so a budget the objective or the controller moved is not
  mistaken for a drop;
* **exit drift**: the share of images per exit, against the shares calibration predicted
  at the thresholds each image was answered with (the controller moves thresholds, so the
  prediction is the window's mix of points), as a Jensen-Shannon divergence (base 2: 0 for
  the same shares, 1 for disjoint ones).

Pure NumPy over sliding windows of the last ``window`` images; no clock, no HTTP.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitserve.repository.confidence import ESTIMATE_SCORE, confidence
from exitserve.repository.format import Calibration
from exitserve.server.policy import ExitResult, point_index_for_budget


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions, base 2 (in [0, 1])."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / m[mask])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


@dataclass(frozen=True)
class QualityReading:
    """The window's signals now; None where it holds too few images."""

    window_images: int
    estimated_accuracy: float | None
    calibrated_accuracy: float | None
    exit_drift: float | None
    exit_shares: list[float] | None
    expected_exit_shares: list[float] | None


class QualityMonitor:
    """One model's sliding windows: the accuracy estimate and the exit drift."""

    def __init__(self, calibration: Calibration | None, num_exits: int, window: int = 1000,
                 min_images: int = 100) -> None:
        self.calibration = calibration
        self.num_exits = num_exits
        self.window = window
        self.min_images = min_images
        curve = calibration.curve if calibration is not None else []
        self._budgets = [p.budget for p in curve]
        self._atc = [p.atc_threshold for p in curve]
        self._expected = [p.expected_accuracy for p in curve]
        self._fractions = np.array([p.exit_fractions for p in curve]).reshape(len(curve), num_exits)
        # estimate: (above its point's ATC threshold, the point's expected accuracy) per image
        self._estimates: deque[tuple[bool, float]] = deque()
        self._above = 0
        self._expected_sum = 0.0
        # drift: (exit taken, point) per image answered by its point's thresholds
        self._exits: deque[tuple[int, int]] = deque()
        self._exit_counts = np.zeros(num_exits, dtype=np.int64)
        self._point_counts = np.zeros(len(curve), dtype=np.int64)
        self._pending: list[tuple[int, Sequence[ExitResult], bool]] = []  # observed, not yet scored

        # whether this model's calibration carries the estimate's thresholds (older ones do not)
        self.estimates = bool(self._atc) and all(t is not None for t in self._atc)
        self._atc_array = np.array([t if t is not None else np.inf for t in self._atc], dtype=np.float64)
        self._expected_array = np.array(self._expected, dtype=np.float64)

    def point_index(self, budget: float) -> int:
        """The calibrated point a budget's thresholds come from."""
        return point_index_for_budget(self._budgets, budget)

    def observe(self, point: int | None, results: Sequence[ExitResult], by_thresholds: bool) -> None:
        """A request's answers. ``point``: the calibrated point its thresholds (or its batch
        budget) came from, None for a client's own thresholds (no calibrated prediction
        exists for those: they are left out). ``by_thresholds``: whether the exits were the
        thresholds' choice (not a whole-batch budget's), so they count toward the drift;
        an image answered at its deadline never does.

        Only recorded here; scored on the next reading, in one vectorised pass over every
        request since: per request, on the event loop, the same NumPy calls took 17 µs."""
        if point is None or not results or not self.estimates:
            return
        self._pending.append((point, results, by_thresholds))
        if len(self._pending) >= self.window:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        points = [point for point, results, _ in pending for _ in results]
        scores = confidence(np.stack([r.probs for _, results, _ in pending for r in results]), ESTIMATE_SCORE)
        above = (scores > self._atc_array[points]).tolist()
        expected = self._expected_array[points].tolist()
        estimates = self._estimates
        for image_above, image_expected in zip(above, expected):
            estimates.append((image_above, image_expected))
            self._above += image_above
            self._expected_sum += image_expected
        while len(estimates) > self.window:
            old_above, old_expected = estimates.popleft()
            self._above -= old_above
            self._expected_sum -= old_expected
        exits = self._exits
        for point, results, by_thresholds in pending:
            if not by_thresholds:
                continue
            for result in results:
                if not result.deadline_hit:
                    exits.append((result.exit_index, point))
                    self._exit_counts[result.exit_index] += 1
                    self._point_counts[point] += 1
        while len(exits) > self.window:
            old_exit, old_point = exits.popleft()
            self._exit_counts[old_exit] -= 1
            self._point_counts[old_point] -= 1

    def estimate(self) -> float | None:
        """The estimated accuracy alone."""
        self._flush()
        n = len(self._estimates)
        return self._above / n if n >= self.min_images else None

    def reading(self) -> QualityReading:
        self._flush()
        n = len(self._estimates)
        estimated = calibrated = drift = shares = expected_shares = None
        if n >= self.min_images:
            estimated = self._above / n
            calibrated = self._expected_sum / n
        counted = len(self._exits)
        if counted >= self.min_images:
            observed = self._exit_counts / counted
            predicted = (self._point_counts @ self._fractions) / counted
            drift = jensen_shannon(observed, predicted)
            shares = [round(float(v), 6) for v in observed]
            expected_shares = [round(float(v), 6) for v in predicted]
        return QualityReading(n, estimated, calibrated, drift, shares, expected_shares)
