"""The budget decision of one request: which thresholds it gets, the budget they come from,
and why that differs from what it asked for. Made once, before any image runs, so every
protocol reports the budget that was actually applied."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exitserve.server.options import InferenceOptions, Policy
from exitserve.server.policy import ExitPolicy


@dataclass(frozen=True)
class BudgetDecision:
    policy: Policy
    requested: float | None  # the budget the request named, else the model's default; None with thresholds
    applied: float | None  # the budget the thresholds (or the batch's schedule) come from
    note: str | None = None  # why ``applied`` differs from ``requested``
    # the budget the thresholds were looked up with: ``applied``, or for the default budget
    # what the online controller nudged it to so the measured cost holds ``applied``
    lookup: float | None = None

    @property
    def lookup_budget(self) -> float | None:
        return self.applied if self.lookup is None else self.lookup


def decide_budget(model: str, policy: ExitPolicy, options: InferenceOptions,
                  may_lower: bool) -> tuple[BudgetDecision, np.ndarray | None]:
    """The decision and the per-image thresholds (None for a whole-batch budget, whose
    schedule is made when the batch runs). Raises ``InvalidOptions`` for thresholds that
    do not fit the model and a batch budget below its first exit."""
    if options.policy == "thresholds":
        assert options.thresholds is not None
        return BudgetDecision("thresholds", None, None), policy.explicit_thresholds(options.thresholds)
    if options.policy == "batch_budget":
        budget = policy.default_budget if options.budget is None else options.budget
        policy.check_batch_budget(budget)
        return BudgetDecision("batch_budget", budget, budget), None
    if options.budget is None:
        requested, used = policy.default_budget, policy.effective_budget
        thresholds = policy.thresholds_for(used)
    else:
        requested = options.budget
        used = policy.request_budget(requested, may_lower)
        thresholds = policy.thresholds_for(used)
    if requested < policy.min_budget:
        note = (f"below the cost of {model}'s first exit ({policy.min_budget:.4f}): no image can cost less, so "
                "that is what was spent")
        return BudgetDecision("budget", requested, policy.min_budget, note, used), thresholds
    cap = policy.objective.budget_cap if policy.objective else None
    if cap is not None and used <= cap < requested:
        note = f"lowered to {used:g} by the {policy.objective.objective_ms:g} ms latency objective under load"
        return BudgetDecision("budget", requested, used, note, used), thresholds
    return BudgetDecision("budget", requested, requested, lookup=used), thresholds
