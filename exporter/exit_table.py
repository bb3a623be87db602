"""Every exit's confidence and correctness for every image of a split: the offline
table calibration searches and the test report evaluates (NumPy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from exitserve.repository.confidence import ALWAYS, ESTIMATE_SCORE, NEVER, ConfidenceRule, confidence, exits_taken
from exitserve.repository.format import Manifest
from exitserve.repository.runtime import StagedModel
from exitserve.models.data import ImageDataset


@dataclass
class ExitTable:
    conf: np.ndarray  # K x N
    correct: np.ndarray  # K x N bool
    costs: np.ndarray  # K cumulative cost fractions
    score: np.ndarray | None = None  # K x N ``ESTIMATE_SCORE`` of each exit (the accuracy estimate's)

    @property
    def num_exits(self) -> int:
        return self.conf.shape[0]

    @property
    def num_images(self) -> int:
        return self.conf.shape[1]

    def evaluate(self, thresholds: np.ndarray) -> tuple[float, float, np.ndarray]:
        """(accuracy, mean cost fraction, fraction of images per exit) under ``thresholds``."""
        taken = exits_taken(self.conf, thresholds)
        accuracy = float(self.correct[taken, np.arange(self.num_images)].mean())
        fractions = np.bincount(taken, minlength=self.num_exits) / self.num_images
        return accuracy, float(fractions @ self.costs), fractions

    def correct_per_image(self, thresholds: np.ndarray) -> np.ndarray:
        """N bools: is each image right at the exit it takes under ``thresholds``."""
        taken = exits_taken(self.conf, thresholds)
        return self.correct[taken, np.arange(self.num_images)]

    def served_scores(self, thresholds: np.ndarray) -> np.ndarray:
        """N: each image's estimate score at the exit it takes under ``thresholds``."""
        if self.score is None:
            raise ValueError("this exit table was built without estimate scores")
        taken = exits_taken(self.conf, thresholds)
        return self.score[taken, np.arange(self.num_images)]

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


def exit_table(staged: StagedModel, manifest: Manifest, data: ImageDataset, rule: ConfidenceRule,
               batch_size: int = 500) -> ExitTable:
    """Run every image of ``data`` through every stage (none leaves early) and record each exit."""
    conf = np.zeros((manifest.num_exits, len(data)))
    correct = np.zeros((manifest.num_exits, len(data)), dtype=bool)
    score = np.zeros((manifest.num_exits, len(data)))
    desc = data.split or "exits"
    for start in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False):
        stop = start + batch_size
        images = manifest.input.normalize(data.images[start:stop])
        for k, _, out in staged.iter_stages(images):
            conf[k, start:stop] = confidence(out.probs, rule)
            correct[k, start:stop] = out.probs.argmax(1) == data.labels[start:stop]
            score[k, start:stop] = confidence(out.probs, ESTIMATE_SCORE)
    return ExitTable(conf, correct, np.asarray(manifest.cost_fractions()), score)
