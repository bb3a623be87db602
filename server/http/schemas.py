"""Response bodies of the HTTP API (also what /docs shows)."""

from __future__ import annotations

from pydantic import BaseModel


class ExitInfo(BaseModel):
    index: int
    name: str
    stages_run: int
    cost_fraction: float
    deadline_hit: bool = False


class TopK(BaseModel):
    label: str
    class_index: int
    probability: float


class Timings(BaseModel):
    queue: float
    decode: float
    inference: float
    total: float


class Classification(BaseModel):
    model: str
    label: str
    class_index: int
    confidence: float
    exit: ExitInfo
    top_k: list[TopK]


class ClassifyResponse(Classification):
    budget: float | None
    budget_applied: float | None = None  # the budget the thresholds came from: never below the first exit's cost
    budget_note: str | None = None  # why budget_applied differs from budget
    policy: str  # "budget" | "thresholds"
    timings_ms: Timings


class BatchItem(BaseModel):
    index: int
    filename: str | None
    result: Classification | None = None
    error: str | None = None
    detail: str | None = None


class BatchSummary(BaseModel):
    count: int
    classified: int
    failed: int
    budget: float
    mean_cost_fraction: float
    spent_fraction: float  # of the batch's allowance, budget x images
    exit_histogram: list[int]
    expected_accuracy: float | None  # held-out accuracy at this budget: see expected_accuracy_basis
    expected_accuracy_basis: str | None = None  # "calibration": measured offline on held-out images
    estimated_accuracy: float | None = None  # estimated without labels on the recent images (null until enough)


class BatchResponse(BaseModel):
    model: str
    results: list[BatchItem]
    summary: BatchSummary
    timings_ms: Timings


class ErrorResponse(BaseModel):
    error: str
    detail: str
    request_id: str | None = None  # quote it when asking what went wrong
