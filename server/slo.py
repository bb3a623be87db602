"""A latency objective held by spending less per image before refusing anyone.

Under overload a plain server can only queue or refuse. An early-exit server can also
spend less per image, and its calibrated curve says what each step down costs in
accuracy. ``LatencyObjective`` walks that curve: a ladder of calibrated budgets from the
configured budget down to a floor. Every ``interval_s`` it looks at what decides latency:

* the p99 of the server-side latency of the requests answered in the last interval, and
* the predicted latency of a request arriving now: the images waiting times the measured
  time per image at the current step, plus one batch's run,

and takes the larger as the signal. The prediction includes the event loop's lag (how late
a timer fires on it): under a congested loop a new request waits there before anything
else. Latencies count from when a request reached the app, so the time the loop took to
bring it to its route is in them. Above ``high`` x the objective it steps down (two steps
when the objective is already missed, to the floor when missed twice over); below ``low`` x
the objective for ``hold`` intervals in a row, and no sooner than ``cooldown_s`` after the
last step down, it steps back up one.
The band between ``low`` and ``high`` and the cool-down are what keep it from oscillating.

Refusing comes last, and is not decided here: at the floor the objective engages the
model's admission line (``server.admission``), which limits how many requests are inside
at once and refuses by how long a request has waited. While requests wait in that line the
objective does not step back up (``pressure``): the demand it was cut for is still there.

Pure Python (no NumPy, no HTTP): the service feeds it, the policy reads its cap, the
unit tests drive it with synthetic latency traces and a fake clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class ObjectiveState:
    """What /v1/models and /metrics report."""

    objective_ms: float
    floor_budget: float
    budget_cap: float | None  # None: no pressure, the configured budget is in force
    step: int  # 0: the configured budget; len(ladder) - 1: the floor
    signal_ms: float | None  # the last signal the controller acted on


class LatencyObjective:
    HIGH = 0.8  # step down above this fraction of the objective
    LOW = 0.5  # step up below this fraction, ``HOLD`` intervals in a row
    HOLD = 5
    INTERVAL_S = 0.2
    COOLDOWN_S = 2.0
    SMOOTHING = 0.2  # weight of each new batch in the time-per-image estimate

    def __init__(self, objective_ms: float, ladder: Sequence[float], *, clock: Clock = time.monotonic,
                 interval_s: float = INTERVAL_S, cooldown_s: float = COOLDOWN_S, hold: int = HOLD) -> None:
        """``ladder``: the calibrated budgets it may use, from the configured budget down to
        the floor (at least one)."""
        if objective_ms <= 0:
            raise ValueError("the latency objective must be positive")
        self.ladder = sorted(set(ladder), reverse=True)
        if not self.ladder:
            raise ValueError("the ladder needs at least one budget")
        self.objective_ms = objective_ms
        self.clock = clock
        self.interval_s = interval_s
        self.cooldown_s = cooldown_s
        self.hold = hold
        self.step = 0
        self.calm_intervals = 0
        self.last_step_down = -math.inf
        self.window_started = clock()
        self.window: list[float] = []  # server-side latencies (ms) answered in this interval
        self.ms_per_image: list[float | None] = [None] * len(self.ladder)  # measured, per step
        self.run_ms: float | None = None  # one batch's run, recently
        self.signal_ms: float | None = None
        self.loop_lag_ms = 0.0
        self.within = 0
        self.missed = 0
        self._lock = threading.Lock()  # batches are observed on the inference thread

    # ------------------------------------------------------------------ what it reads
    @property
    def floor_budget(self) -> float:
        return self.ladder[-1]

    @property
    def at_floor(self) -> bool:
        return self.step == len(self.ladder) - 1

    @property
    def budget_cap(self) -> float | None:
        """The budget default-budget requests may use now; None when unconstrained."""
        return None if self.step == 0 else self.ladder[self.step]

    def state(self) -> ObjectiveState:
        return ObjectiveState(self.objective_ms, self.floor_budget, self.budget_cap, self.step, self.signal_ms)

    # ------------------------------------------------------------------ what it is fed
    def observe_batch(self, images: int, run_ms: float) -> None:
        """One engine run of ``images`` at the current step took ``run_ms``."""
        if images <= 0:
            return
        with self._lock:
            per_image = run_ms / images
            current = self.ms_per_image[self.step]
            self.ms_per_image[self.step] = per_image if current is None else \
                current + self.SMOOTHING * (per_image - current)
            self.run_ms = run_ms if self.run_ms is None else self.run_ms + self.SMOOTHING * (run_ms - self.run_ms)

    def observe_loop_lag(self, lag_ms: float) -> None:
        """How late the event loop ran a timer just now: the wait before a new request is
        even read, under a backlog the app cannot see."""
        self.loop_lag_ms = max(lag_ms, 0.0)

    def observe_request(self, latency_ms: float, waiting_images: int, pressure: bool = False) -> None:
        """A request was answered ``latency_ms`` after it arrived; ``waiting_images`` are
        queued behind it now; ``pressure``: requests wait in the admission line."""
        if latency_ms <= self.objective_ms:
            self.within += 1
        else:
            self.missed += 1
        self.window.append(latency_ms)
        self.tick(waiting_images, pressure)

    def tick(self, waiting_images: int, pressure: bool = False) -> None:
        """Act once per interval (called on every answer; cheap otherwise). ``pressure``:
        requests wait in the admission line, so the budget may not step back up."""
        now = self.clock()
        if now - self.window_started < self.interval_s:
            return
        window, self.window = self.window, []
        self.window_started = now
        observed = _p99(window) if window else 0.0  # from when each request reached the app
        self.signal_ms = max(observed, self._predicted_ms(waiting_images))
        self._act(self.signal_ms, now, pressure)

    # ------------------------------------------------------------------ inside
    def _predicted_ms(self, waiting_images: int) -> float:
        """A new request's latency: the event loop's lag, the queue ahead of it at the
        measured time per image, then a batch's run when there is a queue (0 before
        anything was measured). An idle server's prediction is its loop lag alone (the
        observed p99 says the rest)."""
        per_image = self.ms_per_image[self.step]
        if per_image is None:
            measured = [m for m in self.ms_per_image if m is not None]
            per_image = min(measured) if measured else 0.0  # a cheaper step's rate: optimistic
        own_batch = (self.run_ms or 0.0) if waiting_images else 0.0
        return self.loop_lag_ms + waiting_images * per_image + own_batch

    def _act(self, signal_ms: float, now: float, pressure: bool = False) -> None:
        high, low = self.HIGH * self.objective_ms, self.LOW * self.objective_ms
        if signal_ms > high:
            self.calm_intervals = 0
            # one step when at risk, two when missed, straight to the floor when missed twice over
            steps = 1 if signal_ms <= self.objective_ms else 2 if signal_ms <= 2 * self.objective_ms else len(self.ladder)
            lowered = min(self.step + steps, len(self.ladder) - 1)
            if lowered != self.step:
                self.step = lowered
                self.last_step_down = now
        elif signal_ms < low and not pressure:
            self.calm_intervals += 1
            if self.step > 0 and self.calm_intervals >= self.hold and now - self.last_step_down >= self.cooldown_s:
                self.step -= 1
                self.calm_intervals = 0
        else:
            self.calm_intervals = 0


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def ladder_for(curve_budgets: Sequence[float], configured: float, floor: float | None) -> list[float]:
    """The calibrated budgets from ``configured`` down to ``floor`` (default: the cheapest
    calibrated point), the configured budget itself first."""
    cheapest = min(curve_budgets)
    floor = cheapest if floor is None else floor
    steps = [b for b in curve_budgets if floor - 1e-9 <= b < configured - 1e-9]
    return [configured, *sorted(set(steps), reverse=True)]
