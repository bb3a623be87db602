"""Every exit decision, in NumPy: who leaves after each stage, and what a budget buys.

The engine runs stages; this module decides. A *schedule* is one run's decisions: before
stage ``k`` the engine asks it which images run (``keep``), after the stage it hands
over their probabilities (``observe``). Three schedules:

* ``ThresholdSchedule``: an image leaves at the first exit whose confidence reaches its
  threshold (per image, so one batch mixes budgets);
* the same with deadlines: before a stage, an image whose deadline the stage would pass
  (by the latency predictor) is answered with its best exit so far;
* ``BudgetedSchedule``: the whole batch spends at most ``budget`` x N x full cost; after
  each stage the images the thresholds would continue go on least confident first, as
  long as the remaining allowance pays for them.

``ExitPolicy`` is a model's long-lived policy state: calibrated budget -> thresholds
lookup, the online budget controller and the per-stage latency predictors. No ONNX
Runtime and no HTTP here: it is tested on synthetic probabilities.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from exitserve.repository.confidence import (
    ALWAYS,
    DEFAULT_RULE,
    ConfidenceRule,
    confidence,
    full_depth_thresholds,
    leaves,
)
from exitserve.repository.format import BudgetPoint, Calibration, Manifest
from exitserve.server.errors import InvalidOptions
from exitserve.server.slo import LatencyObjective, ladder_for

Clock = Callable[[], float]
BUDGET_EPSILON = 1e-12


@dataclass
class ExitResult:
    """What one image got: the exit it left at, and what it cost."""

    exit_index: int
    stages_run: int
    probs: np.ndarray
    confidence: float
    cost_fraction: float  # cumulative cost of the stages run / full network
    deadline_hit: bool = False


# ---------------------------------------------------------------------------- per run


class Schedule:
    """Bookkeeping shared by every schedule: which original image each running row is,
    and each image's result once it has one."""

    def __init__(self, n: int, costs: np.ndarray, rule: ConfidenceRule) -> None:
        self.costs = np.asarray(costs, dtype=np.float64)
        self.rule = rule
        self.num_exits = len(self.costs)
        self._results: list[ExitResult | None] = [None] * n
        self.rows = np.arange(n)  # original index of each row that ran the last stage
        self.continuing: np.ndarray | None = None  # positions in ``rows`` that go on

    def keep(self, k: int) -> np.ndarray | None:
        """Indices, into the rows that ran stage ``k - 1``, of the images that run stage
        ``k``; None at stage 0 (every image runs it)."""
        return None if k == 0 else self.continuing

    def observe(self, k: int, probs: np.ndarray) -> None:
        """Stage ``k`` ran on the rows ``keep(k)`` chose; ``probs``: their N_kept x classes."""
        if k > 0:
            self.rows = self.rows[self.continuing]
        conf = confidence(probs, self.rule)
        self._seen(k, conf, probs)
        go_on = self._decide(k, conf) if k < self.num_exits - 1 else np.zeros(len(conf), bool)
        for j in np.flatnonzero(~go_on):
            self._results[self.rows[j]] = ExitResult(k, k + 1, probs[j], float(conf[j]), float(self.costs[k]))
        self.continuing = np.flatnonzero(go_on)

    def _seen(self, k: int, conf: np.ndarray, probs: np.ndarray) -> None:
        """Hook: stage ``k``'s confidences for ``self.rows``, before anyone leaves."""

    def _decide(self, k: int, conf: np.ndarray) -> np.ndarray:
        """Which rows (of those that ran stage ``k``, not the last) continue."""
        raise NotImplementedError

    def results(self) -> list[ExitResult]:
        missing = [i for i, r in enumerate(self._results) if r is None]
        if missing:
            raise RuntimeError(f"{len(missing)} images have no exit: the run stopped before they left")
        return self._results  # type: ignore[return-value]


class ThresholdSchedule(Schedule):
    """Per-image thresholds (N x K), optionally per-image deadlines (N absolute clock seconds,
    inf: none) checked against the predicted latency of the next stage."""

    def __init__(self, thresholds: np.ndarray, costs: np.ndarray, rule: ConfidenceRule,
                 deadlines: np.ndarray | None = None, latency: Sequence[StageLatency] = (),
                 clock: Clock = time.perf_counter) -> None:
        super().__init__(len(thresholds), costs, rule)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.deadlines = deadlines if deadlines is not None and np.isfinite(deadlines).any() else None
        if self.deadlines is not None and len(latency) != self.num_exits:
            raise ValueError("deadlines need one latency predictor per stage")
        self.latency = latency
        self.clock = clock
        n = len(thresholds)
        self.best_conf = np.full(n, -np.inf)
        self.best_exit = np.zeros(n, dtype=np.int64)
        self.best_probs: np.ndarray | None = None

    def keep(self, k: int) -> np.ndarray | None:
        keep = super().keep(k)
        if keep is None or self.deadlines is None or len(keep) == 0:
            return keep
        running = self.rows[keep]
        predicted_end = self.clock() + self.latency[k].predict_ms(len(running)) / 1000
        late = self.deadlines[running] < predicted_end
        for i in running[late]:
            self._results[i] = ExitResult(int(self.best_exit[i]), k, self.best_probs[i], float(self.best_conf[i]),
                                          float(self.costs[k - 1]), deadline_hit=True)
        self.continuing = keep[~late]
        return self.continuing

    def _seen(self, k: int, conf: np.ndarray, probs: np.ndarray) -> None:
        if self.deadlines is None:
            return
        if self.best_probs is None:  # each image's most confident exit so far: its answer if time runs out
            self.best_probs = np.zeros((len(self.best_conf), probs.shape[1]), dtype=probs.dtype)
        better = conf > self.best_conf[self.rows]
        self.best_conf[self.rows[better]] = conf[better]
        self.best_exit[self.rows[better]] = k
        self.best_probs[self.rows[better]] = probs[better]

    def _decide(self, k: int, conf: np.ndarray) -> np.ndarray:
        return ~leaves(conf, self.thresholds[self.rows, k])


class BudgetedSchedule(Schedule):
    """The whole batch within ``budget`` x N x full cost (the batch endpoint)."""

    def __init__(self, n: int, budget: float, thresholds: np.ndarray, costs: np.ndarray,
                 rule: ConfidenceRule) -> None:
        super().__init__(n, costs, rule)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.allowance = budget * n
        self.spent = 0.0

    def observe(self, k: int, probs: np.ndarray) -> None:
        ran = len(probs)
        self.spent += ran * (self.costs[k] - (self.costs[k - 1] if k else 0.0))
        super().observe(k, probs)

    def _decide(self, k: int, conf: np.ndarray) -> np.ndarray:
        step = self.costs[k + 1] - self.costs[k]
        affordable = max(int(math.floor((self.allowance - self.spent) / step + 1e-9)), 0)
        wanting = np.flatnonzero(~leaves(conf, self.thresholds[k]))
        chosen = wanting[np.argsort(conf[wanting], kind="stable")][:affordable]  # least confident first
        go_on = np.zeros(len(conf), bool)
        go_on[chosen] = True
        return go_on


# ---------------------------------------------------------------------------- per model


class StageLatency:
    """Predicts a stage's latency for a batch size from the manifest's batch-1 and
    batch-64 measurements, scaled by a running ratio of measured to predicted."""

    MAX_RATIO = 20.0  # one stalled run (a page fault, a noisy neighbour) moves the ratio at most this far

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
            self.ratio += self.smoothing * (min(ratio, self.MAX_RATIO) - self.ratio)


@dataclass
class BudgetController:
    """Holds the *measured* mean cost of default-budget traffic at the configured budget
    by nudging the budget it looks thresholds up with (the exit mix drifts from the
    held-out mix). An integral controller on an exponential average of the cost."""

    target: float
    floor: float
    gain: float = 0.005  # budget change per image per unit of cost error
    smoothing: float = 0.01  # weight of each new image in the measured mean
    effective: float = field(init=False)
    measured: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.effective = self.target

    def observe(self, costs: Sequence[float]) -> None:
        for cost in costs:
            self.measured = cost if self.measured is None else self.measured + self.smoothing * (cost - self.measured)
        if self.measured is not None:
            adjusted = self.effective + self.gain * (self.target - self.measured) * len(costs)
            self.effective = float(min(1.0, max(self.floor, adjusted)))


def point_index_for_budget(budgets: Sequence[float], budget: float) -> int:
    """Index of the calibrated point with the largest budget not above ``budget`` (never
    overspend); below the cheapest point, the cheapest. ``budgets`` ascending (the curve is
    sorted by budget on load)."""
    return max(bisect.bisect_right(budgets, budget + BUDGET_EPSILON) - 1, 0)


def point_for_budget(calibration: Calibration, budget: float) -> BudgetPoint:
    """The calibrated point ``budget`` is served with (``point_index_for_budget``)."""
    return calibration.curve[point_index_for_budget([p.budget for p in calibration.curve], budget)]


def _read_only(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    array.flags.writeable = False  # shared by every request served at this point
    return array


class ExitPolicy:
    """One model's exit policy: thresholds for a budget, the controller, the predictors."""

    def __init__(self, manifest: Manifest, calibration: Calibration | None, *, default_budget: float,
                 online_budget: bool = True, clock: Clock = time.perf_counter) -> None:
        self.costs = np.asarray(manifest.cost_fractions(), dtype=np.float64)
        self.calibration = calibration
        self.budgets = [p.budget for p in calibration.curve] if calibration else []  # looked up per request
        self._thresholds = [_read_only(p.thresholds) for p in calibration.curve] if calibration else []
        self.rule: ConfidenceRule = calibration.rule if calibration else DEFAULT_RULE
        self.default_budget = default_budget
        self.controller = BudgetController(default_budget, self.min_budget) if online_budget else None
        self.latency = [
            StageLatency(s.latency.batch_1_ms, s.latency.batch_64_ms) if s.latency else StageLatency(1.0, 10.0)
            for s in manifest.stages
        ]
        self.clock = clock
        self.objective: LatencyObjective | None = None

    @property
    def num_exits(self) -> int:
        return len(self.costs)

    @property
    def min_budget(self) -> float:
        """The cost of the first exit: no image can cost less."""
        return float(self.costs[0])

    @property
    def effective_budget(self) -> float:
        """What default-budget requests look thresholds up with now: the online
        controller's budget, capped by the latency objective under pressure."""
        budget = self.controller.effective if self.controller else self.default_budget
        cap = self.objective.budget_cap if self.objective else None
        return budget if cap is None else min(budget, cap)

    def attach_objective(self, objective_ms: float, floor: float | None = None) -> LatencyObjective:
        """Hold ``objective_ms`` by stepping the default budget down the calibrated curve
        (``server.slo``); without a calibration there is no curve to step down."""
        if self.calibration is None:
            raise InvalidOptions("a latency objective needs a calibrated model (calibration.json)")
        if floor is not None and floor > self.default_budget:
            raise InvalidOptions(f"the objective's floor budget {floor} is above the default budget "
                                 f"{self.default_budget}")
        budgets = [p.budget for p in self.calibration.curve]
        self.objective = LatencyObjective(objective_ms, ladder_for(budgets, self.default_budget, floor))
        return self.objective

    def request_budget(self, budget: float, may_lower: bool) -> float:
        """The budget a request that named ``budget`` gets: its own, unless the operator lets
        the objective lower it (``may_lower``) and the objective caps budgets now."""
        cap = self.objective.budget_cap if self.objective and may_lower else None
        return budget if cap is None else min(budget, cap)

    def thresholds_for(self, budget: float | None) -> np.ndarray:
        """Thresholds of the calibrated point for ``budget`` (the effective default when None)."""
        if budget is None:
            budget = self.effective_budget
        if self.calibration is None:  # uncalibrated: full depth is the only honest choice
            return full_depth_thresholds(self.num_exits)
        return self._thresholds[point_index_for_budget(self.budgets, budget)]

    def point(self, budget: float) -> BudgetPoint:
        """The calibrated point ``budget`` is served with (``point_index_for_budget``)."""
        assert self.calibration is not None
        return self.calibration.curve[point_index_for_budget(self.budgets, budget)]

    def expected_accuracy(self, budget: float) -> float | None:
        if self.calibration is None:
            return None
        return self.point(budget).expected_accuracy

    def explicit_thresholds(self, values: Sequence[float]) -> np.ndarray:
        """A client's own thresholds: exactly one per exit but the last (everyone left
        leaves at the last exit). Any other count is refused, never silently cut."""
        if len(values) != self.num_exits - 1:
            raise InvalidOptions(f"this model has {self.num_exits} exits: give exactly {self.num_exits - 1} "
                                 f"thresholds, not {len(values)}", code="invalid_thresholds")
        return np.append(np.asarray(values, dtype=np.float64), ALWAYS)

    def check_batch_budget(self, budget: float) -> None:
        if budget < self.min_budget - BUDGET_EPSILON:
            raise InvalidOptions(f"budget {budget} is below the cost of the first exit ({self.min_budget:.4f})",
                                 code="invalid_budget")

    def threshold_schedule(self, thresholds: np.ndarray, deadlines: np.ndarray | None = None) -> ThresholdSchedule:
        return ThresholdSchedule(thresholds, self.costs, self.rule, deadlines, self.latency, self.clock)

    def budgeted_schedule(self, n: int, budget: float) -> BudgetedSchedule:
        self.check_batch_budget(budget)
        return BudgetedSchedule(n, budget, self.thresholds_for(budget), self.costs, self.rule)

    def observe_default_budget_costs(self, costs: Sequence[float]) -> None:
        """Feed the online controller: only traffic at the default budget may move it, and
        not while the latency objective caps the budget (it would wind up against a cost
        it is not allowed to reach)."""
        if self.controller is None:
            return
        cap = self.objective.budget_cap if self.objective else None
        if cap is None or cap >= self.controller.effective:
            self.controller.observe(costs)
