"""What answers feed back into the budget, and the gauges that show it.

Two controllers move a model's default budget: the online controller (the measured mean
cost of default-budget traffic pulls the thresholds toward the budget) and the latency
objective (under pressure it caps the budget, stepping down the calibrated curve, and at
its floor it engages the model's admission line, ``server.admission``). This module feeds both from
answers, batches and a ticker, and publishes what they decide. The controllers themselves
(``server.policy``, ``server.slo``) stay pure and clocked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from exitserve.server.catalog import ServedModel
from exitserve.server.engine import ModelEngine
from exitserve.server.metrics import Metrics
from exitserve.server.policy import ExitResult


class BudgetFeedback:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.engines: dict[str, ModelEngine] = {}
        self._ticker: asyncio.Task | None = None

    def start(self, models: dict[str, ServedModel]) -> None:
        """Publish every model's budgets and, for models with a latency objective, start the
        ticker (on the running loop)."""
        self.engines = {name: m.engine for name, m in models.items()}
        for name, engine in self.engines.items():
            self.metrics.budget.labels(name).set(engine.policy.default_budget)
            self.publish_budget(engine)
            if (objective := engine.policy.objective) is not None:
                self.metrics.latency_objective.labels(name).set(objective.objective_ms / 1000)
        objectives = {name: m for name, m in models.items() if m.engine.policy.objective is not None}
        if objectives:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(objectives))

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    def publish_budget(self, engine: ModelEngine) -> None:
        budget = engine.policy.effective_budget
        self.metrics.effective_budget.labels(engine.name).set(budget)
        accuracy = engine.policy.expected_accuracy(budget)
        if accuracy is not None:
            self.metrics.expected_accuracy.labels(engine.name).set(accuracy)

    # ------------------------------------------------------------------ answers
    def on_batch(self, model: str, images: int, stage_ms: dict[int, float]) -> None:
        """The batcher's observer: every engine run, single images and whole jobs."""
        self.metrics.observe_batch(model, images, stage_ms)
        engine = self.engines.get(model)
        if engine is not None and engine.policy.objective is not None:
            engine.policy.objective.observe_batch(images, sum(stage_ms.values()))

    def on_answers(self, model: ServedModel, results: Sequence[ExitResult], default_budget: bool) -> None:
        """A request's answers: the exit and cost counters, and the online controller when
        the request left the budget to the server."""
        engine = model.engine
        costs = [r.cost_fraction for r in results]
        self.metrics.observe_results(model.name, [r.exit_index for r in results], costs,
                                     sum(r.deadline_hit for r in results))
        if default_budget and engine.policy.controller is not None:
            engine.policy.observe_default_budget_costs(costs)
            self.publish_budget(engine)

    def on_latency(self, model: ServedModel, latency_ms: float) -> None:
        """One answer's server-side latency, for the latency objective."""
        objective = model.engine.policy.objective
        if objective is None:
            return
        cap = objective.budget_cap
        objective.observe_request(latency_ms, model.queue.waiting_images, model.line is not None and model.line.pressure)
        within = "within" if latency_ms <= objective.objective_ms else "missed"
        self.metrics.slo_requests.labels(model.name, within).inc()
        if objective.budget_cap != cap:
            self.publish_budget(model.engine)
            self._sync_line(model)

    async def _tick(self, models: dict[str, ServedModel]) -> None:
        """Latency objectives act on answers; this lets them act when answers stop coming
        too (load gone: step back up; everything stuck: the prediction still sees the
        queue), and measures the event loop's lag for them: how late this timer fires is
        how long a request that just arrived waits before the app sees it."""
        loop = asyncio.get_running_loop()
        interval = min(m.engine.policy.objective.interval_s for m in models.values())
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            lag_ms = (loop.time() - due) * 1000
            for model in models.values():
                objective = model.engine.policy.objective
                cap = objective.budget_cap
                objective.observe_loop_lag(lag_ms)
                objective.tick(model.queue.waiting_images, model.line is not None and model.line.pressure)
                if objective.budget_cap != cap:
                    self.publish_budget(model.engine)
                self._sync_line(model)
                if model.line is not None:
                    model.line.adjust(objective.loop_lag_ms)
                    self.metrics.admission_limit.labels(model.name).set(
                        model.line.limit if model.line.engaged else -1)
                    self.metrics.admission_waiting.labels(model.name).set(len(model.line.line))

    @staticmethod
    def _sync_line(model: ServedModel) -> None:
        """The admission line limits only while the budget is at its floor."""
        line, objective = model.line, model.engine.policy.objective
        if line is None or objective is None:
            return
        if objective.at_floor:
            line.engage()
        elif line.engaged:
            line.release()
