"""The staged early-exit engine: run stage by stage, let confident images leave.

After each stage, an image leaves when its exit's confidence reaches its threshold;
the next stage runs only on the rest, compacted inside the graph (``keep`` indices), so
carried tensors never come back to the host. Deadlines and the budgeted-batch mode are
decided here too. No HTTP and no PyTorch in this module.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.policy import ALWAYS, confidence, point_for_budget
from server.repository import Calibration, Manifest, load_calibration, load_manifest
from server.runtime import BindingChoice, ProviderChoice, StagedModel

log = logging.getLogger(__name__)


@dataclass
class ExitResult:
    """What one image got: the exit it left at, and what it cost."""

    exit_index: int
    stages_run: int
    probs: np.ndarray
    confidence: float
    cost_fraction: float  # cumulative cost of the stages run / full network
    deadline_hit: bool = False


class StageLatency:
    """Predicts a stage's latency for a batch size from the manifest's batch-1 and
    batch-64 measurements, scaled by a running ratio of measured to predicted."""

    def __init__(self, batch_1_ms: float, batch_64_ms: float, smoothing: float = 0.1) -> None:
        self.batch_1_ms = batch_1_ms
        self.batch_64_ms = max(batch_64_ms, batch_1_ms)
        self.ratio = 1.0
        self.smoothing = smoothing
        self._lock = threading.Lock()

    def _base(self, batch: int) -> float:
        return self.batch_1_ms + (self.batch_64_ms - self.batch_1_ms) * (batch - 1) / 63.0

    def predict_ms(self, batch: int) -> float:
        return self._base(max(batch, 1)) * self.ratio

    def observe(self, batch: int, measured_ms: float) -> None:
        ratio = measured_ms / max(self._base(max(batch, 1)), 1e-6)
        with self._lock:
            self.ratio += self.smoothing * (min(ratio, 20.0) - self.ratio)


@dataclass
class BudgetController:
    """Holds the *measured* mean cost of default-budget traffic at the configured budget
    by nudging the budget it looks thresholds up with (the exit mix drifts from the
    held-out mix)."""

    target: float
    floor: float
    gain: float = 0.005  # budget change per image per unit of cost error (an integral controller)
    effective: float = field(init=False)
    measured: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.effective = self.target

    def observe(self, costs: list[float]) -> None:
        for cost in costs:
            self.measured = cost if self.measured is None else self.measured + 0.01 * (cost - self.measured)
        if self.measured is not None:
            adjusted = self.effective + self.gain * (self.target - self.measured) * len(costs)
            self.effective = float(min(1.0, max(self.floor, adjusted)))


class ModelEngine:
    """One model: its stage sessions, calibration and exit policy."""

    def __init__(
        self,
        folder: Path,
        *,
        default_budget: float,
        provider: ProviderChoice = "auto",
        io_binding: BindingChoice = "auto",
        intra_op_threads: int | None = None,
        online_budget: bool = True,
    ) -> None:
        self.folder = folder
        self.manifest: Manifest = load_manifest(folder)
        self.calibration: Calibration | None = load_calibration(folder)
        self.name = self.manifest.name
        self.staged = StagedModel(folder, self.manifest, provider, io_binding, intra_op_threads)
        self.costs = np.asarray(self.manifest.cost_fractions())
        self.rule = self.calibration.rule if self.calibration else "max_softmax"
        self.latency = [
            StageLatency(s.latency.batch_1_ms, s.latency.batch_64_ms) if s.latency else StageLatency(1.0, 10.0)
            for s in self.manifest.stages
        ]
        self.default_budget = default_budget
        self.controller = BudgetController(default_budget, float(self.costs[0])) if online_budget else None

    # ------------------------------------------------------------------ policy
    @property
    def num_exits(self) -> int:
        return len(self.costs)

    @property
    def min_budget(self) -> float:
        return float(self.costs[0])

    def thresholds_for(self, budget: float | None) -> np.ndarray:
        """Thresholds of the calibrated point for ``budget`` (default budget when None)."""
        if budget is None:
            budget = self.controller.effective if self.controller else self.default_budget
        if self.calibration is None:  # uncalibrated: full depth is the only honest choice
            return np.append(np.full(self.num_exits - 1, 1e9), ALWAYS)
        return np.asarray(point_for_budget(self.calibration, budget).thresholds, dtype=np.float64)

    def expected_accuracy(self, budget: float) -> float | None:
        if self.calibration is None:
            return None
        return point_for_budget(self.calibration, budget).expected_accuracy

    # ------------------------------------------------------------------ running
    def _run_stage(self, k: int, carried: list, keep: np.ndarray | None):
        started = time.perf_counter()
        out = self.staged.run_stage(k, carried, keep)
        elapsed = (time.perf_counter() - started) * 1000
        self.latency[k].observe(len(out.probs), elapsed)
        self.last_stage_ms[k] = elapsed
        return out

    def run(
        self, images: np.ndarray, thresholds: np.ndarray, deadlines: np.ndarray | None = None
    ) -> list[ExitResult]:
        """Threshold policy. ``images``: N x C x H x W normalized; ``thresholds``: N x K;
        ``deadlines``: N absolute ``time.perf_counter()`` seconds (inf: none)."""
        n = len(images)
        self.last_stage_ms: dict[int, float] = {}
        results: list[ExitResult | None] = [None] * n
        best_conf = np.full(n, -np.inf)
        best_exit = np.zeros(n, dtype=np.int64)
        best_probs = np.zeros((n, len(self.manifest.labels)), dtype=np.float32)
        rows = np.arange(n)  # original index of each row of ``carried``
        carried: list = [images]
        keep: np.ndarray | None = None
        for k in range(self.num_exits):
            if k > 0 and deadlines is not None:
                running = rows[keep]
                predicted = time.perf_counter() + self.latency[k].predict_ms(len(running)) / 1000
                late = deadlines[running] < predicted
                for i in running[late]:
                    results[i] = ExitResult(int(best_exit[i]), k, best_probs[i], float(best_conf[i]),
                                            float(self.costs[k - 1]), deadline_hit=True)
                keep = keep[~late]
            if keep is not None and len(keep) == 0:
                break
            out = self._run_stage(k, carried, keep)
            if keep is not None:
                rows = rows[keep]
            conf = confidence(out.probs, self.rule)
            better = conf > best_conf[rows]
            best_conf[rows[better]] = conf[better]
            best_exit[rows[better]] = k
            best_probs[rows[better]] = out.probs[better]
            leave = np.ones(len(rows), bool) if k == self.num_exits - 1 else conf >= thresholds[rows, k]
            for j in np.flatnonzero(leave):
                results[rows[j]] = ExitResult(k, k + 1, out.probs[j], float(conf[j]), float(self.costs[k]))
            keep = np.flatnonzero(~leave)
            carried = out.carried
        return results  # every image has a result: it left, or its deadline came

    def run_budgeted(self, images: np.ndarray, budget: float) -> list[ExitResult]:
        """Budgeted batch: spend at most ``budget`` x N x full cost on the whole batch.

        After each stage the images the calibrated thresholds would continue are
        continued least confident first, as long as the remaining budget pays for them.
        """
        if budget < self.min_budget - 1e-12:
            raise ValueError(f"budget {budget} is below the cost of the first exit ({self.min_budget:.4f})")
        n = len(images)
        self.last_stage_ms = {}
        thresholds = self.thresholds_for(budget)
        allowance = budget * n
        spent = 0.0
        results: list[ExitResult | None] = [None] * n
        rows = np.arange(n)
        carried: list = [images]
        keep: np.ndarray | None = None
        for k in range(self.num_exits):
            out = self._run_stage(k, carried, keep)
            if keep is not None:
                rows = rows[keep]
            spent += len(rows) * (self.costs[k] - (self.costs[k - 1] if k else 0.0))
            conf = confidence(out.probs, self.rule)
            cont = np.zeros(len(rows), bool)
            if k < self.num_exits - 1:
                step = self.costs[k + 1] - self.costs[k]
                affordable = int(math.floor((allowance - spent) / step + 1e-9))
                wanting = np.flatnonzero(conf < thresholds[k])
                chosen = wanting[np.argsort(conf[wanting], kind="stable")][: max(affordable, 0)]
                cont[chosen] = True
            for j in np.flatnonzero(~cont):
                results[rows[j]] = ExitResult(k, k + 1, out.probs[j], float(conf[j]), float(self.costs[k]))
            keep = np.flatnonzero(cont)
            carried = out.carried
            if len(keep) == 0:
                break
        return results  # every image left at some exit

    def warm_up(self, batches: int = 2) -> None:
        """Run every stage a few times so the first request does not pay for lazy init."""
        spec = self.manifest.input
        images = np.zeros((4, spec.channels, spec.size, spec.size), dtype=spec.dtype)
        never = np.full((4, self.num_exits), 1e9)
        for _ in range(max(batches, 1)):
            self.run(images, never)
