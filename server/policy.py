"""Exit policies: confidence rules, threshold exits and budget lookup (NumPy only).

The calibrator and the serving engine share these functions, so the offline evaluation
of a threshold set and what the server does with it cannot drift apart.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from server.repository import BudgetPoint, Calibration, ConfidenceRule

NEVER = 1e9  # a threshold no confidence reaches: never leave at this exit
ALWAYS = -1e9  # every image leaves (the last exit)
RULES: tuple[ConfidenceRule, ...] = ("max_softmax", "entropy", "margin")


def confidence(probs: np.ndarray, rule: ConfidenceRule = "max_softmax") -> np.ndarray:
    """Per-image confidence in [0, 1] from N x classes probabilities.

    max_softmax: the top probability; margin: top minus runner-up; entropy:
    1 - H(p) / log(classes), so every rule reads "higher is surer".
    """
    probs = np.asarray(probs, dtype=np.float64)
    if rule == "max_softmax":
        return probs.max(axis=1)
    if rule == "margin":
        top2 = np.partition(probs, -2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if rule == "entropy":
        entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
        return 1.0 - entropy / np.log(probs.shape[1])
    raise ValueError(f"unknown confidence rule {rule!r}; known: {', '.join(RULES)}")


def exits_taken(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the first exit whose confidence reaches its threshold (the last exit always).

    ``conf``: K x N confidences, ``thresholds``: K values.
    """
    passes = conf >= np.asarray(thresholds)[:, None]
    passes[-1] = True
    return passes.argmax(axis=0)


@dataclass
class ExitTable:
    """Every exit's confidence and correctness for every image of a split."""

    conf: np.ndarray  # K x N
    correct: np.ndarray  # K x N bool
    costs: np.ndarray  # K cumulative cost fractions

    @property
    def num_exits(self) -> int:
        return self.conf.shape[0]

    def evaluate(self, thresholds: np.ndarray) -> tuple[float, float, np.ndarray]:
        """(accuracy, mean cost fraction, fraction of images per exit) under ``thresholds``."""
        taken = exits_taken(self.conf, thresholds)
        n = self.conf.shape[1]
        accuracy = float(self.correct[taken, np.arange(n)].mean())
        fractions = np.bincount(taken, minlength=self.num_exits) / n
        return accuracy, float(fractions @ self.costs), fractions

    def correct_per_image(self, thresholds: np.ndarray) -> np.ndarray:
        """N bools: is each image right at the exit it takes under ``thresholds``."""
        taken = exits_taken(self.conf, thresholds)
        return self.correct[taken, np.arange(self.conf.shape[1])]

    def static(self, k: int) -> np.ndarray:
        """Thresholds that send every image to exit ``k``."""
        t = np.full(self.num_exits, NEVER)
        t[k:] = ALWAYS
        return t

    def oracle(self) -> tuple[float, float]:
        """Each image leaves at the first exit that is right (the last if none is)."""
        right = self.correct.copy()
        right[-1] = True
        taken = right.argmax(axis=0)
        accuracy = float(self.correct.any(axis=0).mean())
        return accuracy, float(self.costs[taken].mean())


def point_for_budget(calibration: Calibration, budget: float) -> BudgetPoint:
    """The calibrated point with the largest budget not above ``budget`` (never overspend);
    below the cheapest point, the cheapest. The curve is sorted by budget on load."""
    budgets = [p.budget for p in calibration.curve]
    index = bisect.bisect_right(budgets, budget + 1e-12) - 1
    return calibration.curve[max(index, 0)]
