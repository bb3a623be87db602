"""A request's early-exit options, parsed once and strictly for every protocol.

Values come as text (query strings, form fields) or as JSON scalars (the Open Inference
Protocol's ``parameters``). Text must be a plain decimal number as the published schema
writes it: Python's ``float`` would also take ``1_0``, ``" 1 "``, ``nan`` and ``infinity``.
An empty value is an error, never "absent".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from exitserve.server.errors import InvalidOptions

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
INTEGER = re.compile(r"[-+]?\d+")
MAX_DEADLINE_MS = 600_000
Policy = Literal["budget", "thresholds", "batch_budget"]


@dataclass(frozen=True)
class InferenceOptions:
    policy: Policy = "budget"
    budget: float | None = None  # None: the model's default (for batch_budget too)
    thresholds: tuple[float, ...] | None = None
    deadline_ms: float | None = None
    top_k: int = 1

    @property
    def default_budget(self) -> bool:
        """The request leaves the budget to the server (and so may feed its controller)."""
        return self.policy == "budget" and self.budget is None


def _text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value == "":
            raise InvalidOptions(f"{name} is empty: give a value or leave it out", code=f"invalid_{name}")
        return value
    return None


def parse_number(name: str, value: object, integer: bool = False) -> float | int | None:
    """A finite number from text or a JSON scalar (never a bool); None when absent."""
    kind = "an integer" if integer else "a number"
    text = _text(name, value)
    if text is not None:
        if not (INTEGER if integer else NUMBER).fullmatch(text):
            raise InvalidOptions(f"{name} must be {kind}, got {text!r}", code=f"invalid_{name}")
        number: float | int = int(text) if integer else float(text)
    elif value is None:
        return None
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InvalidOptions(f"{name} must be {kind}, got {value!r}", code=f"invalid_{name}")
    else:
        number = value
    if not math.isfinite(number):
        raise InvalidOptions(f"{name} must be finite, got {value!r}", code=f"invalid_{name}")
    return number


def parse_budget(name: str, value: object) -> float | None:
    budget = parse_number(name, value)
    if budget is not None and not 0 < budget <= 1:
        raise InvalidOptions(f"{name} must be in (0, 1] (fraction of full cost), got {budget}", code=f"invalid_{name}")
    return None if budget is None else float(budget)


def parse_deadline(value: object) -> float | None:
    deadline = parse_number("deadline_ms", value)
    if deadline is not None and not 0 < deadline <= MAX_DEADLINE_MS:
        raise InvalidOptions(f"deadline_ms must be in (0, {MAX_DEADLINE_MS}], got {deadline}",
                             code="invalid_deadline_ms")
    return None if deadline is None else float(deadline)


def parse_thresholds(value: object) -> tuple[float, ...] | None:
    text = _text("thresholds", value)
    if text is None:
        if value is not None:
            raise InvalidOptions(f"thresholds must be comma-separated numbers, got {value!r}",
                                 code="invalid_thresholds")
        return None
    parts = text.split(",")
    if not all(NUMBER.fullmatch(p) for p in parts):
        raise InvalidOptions(f"thresholds must be comma-separated numbers: {text!r}", code="invalid_thresholds")
    values = tuple(float(p) for p in parts)
    if not all(math.isfinite(v) for v in values):
        raise InvalidOptions("thresholds must be finite", code="invalid_thresholds")
    return values


def parse_model(value: object) -> str | None:
    """The model a request names; None for the server's default."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidOptions(f"model must name a model (GET /v1/models lists them), got {value!r}",
                             code="invalid_model")
    return value


def parse_options(raw: Mapping[str, object], *, whole_batch: bool = False) -> InferenceOptions:
    """``raw``: option name -> text or JSON scalar, absent names left out. ``whole_batch``:
    the request's ``budget`` is one budget for all its images (the batch endpoint)."""
    budget = parse_budget("budget", raw.get("budget"))
    batch_budget = parse_budget("batch_budget", raw.get("batch_budget"))
    deadline = parse_deadline(raw.get("deadline_ms"))
    thresholds = parse_thresholds(raw.get("thresholds"))
    top_k = parse_number("top_k", raw.get("top_k"), integer=True)
    top_k = 1 if top_k is None else int(top_k)
    if whole_batch:
        if thresholds is not None or deadline is not None:
            raise InvalidOptions("the batch endpoint takes a budget for the whole batch, not thresholds or deadlines")
        return InferenceOptions("batch_budget", budget, top_k=top_k)
    if batch_budget is not None:
        if budget is not None or deadline is not None or thresholds is not None:
            raise InvalidOptions("batch_budget is one budget for the whole request: give it without budget, "
                                 "thresholds or deadline_ms", code="conflicting_options")
        return InferenceOptions("batch_budget", batch_budget, top_k=top_k)
    if thresholds is not None:
        if budget is not None:
            raise InvalidOptions("give either budget or thresholds, not both", code="conflicting_options")
        return InferenceOptions("thresholds", thresholds=thresholds, deadline_ms=deadline, top_k=top_k)
    return InferenceOptions("budget", budget, deadline_ms=deadline, top_k=top_k)
