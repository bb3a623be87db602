"""Confidence rules and threshold semantics (NumPy only).

The calibrator and the serving scheduler both apply these, so the offline evaluation of a
threshold set and what the server does with it cannot drift apart: an image leaves at
exit ``k`` when ``confidence >= thresholds[k]``; the last exit takes everyone left.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

ConfidenceRule = Literal["max_softmax", "entropy", "margin"]
RULES: tuple[ConfidenceRule, ...] = get_args(ConfidenceRule)
DEFAULT_RULE: ConfidenceRule = "max_softmax"

# The score the label-free accuracy estimate (ATC) thresholds: negative entropy, which
# Garg et al. found more accurate than the top probability, and which here does not
# saturate at 1.0 the way float32 softmax maxima do.
ESTIMATE_SCORE: ConfidenceRule = "entropy"

NEVER = 1e9  # a threshold no confidence reaches: never leave at this exit
ALWAYS = -1e9  # every image leaves (the last exit)


def confidence(probs: np.ndarray, rule: ConfidenceRule = DEFAULT_RULE) -> np.ndarray:
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


def leaves(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The one exit rule: which confidences reach their thresholds (elementwise)."""
    return conf >= thresholds


def exits_taken(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the first exit whose confidence reaches its threshold (the last exit always).

    ``conf``: K x N confidences, ``thresholds``: K values.
    """
    passes = leaves(conf, np.asarray(thresholds)[:, None])
    passes[-1] = True
    return passes.argmax(axis=0)


def full_depth_thresholds(num_exits: int) -> np.ndarray:
    """Thresholds that run every image to the last exit."""
    return np.append(np.full(num_exits - 1, NEVER), ALWAYS)
