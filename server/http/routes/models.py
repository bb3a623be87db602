"""GET /v1/models, GET /v1/models/{name} and POST /v1/models/{name}/labels."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, StrictInt

from exitserve.server.dataplane import EXPECTED_ACCURACY_BASIS
from exitserve.server.engine import ModelEngine
from exitserve.server.http.routes.deps import Service
from exitserve.server.http.schemas import ErrorResponse
from exitserve.server.quality import MAX_LABELS, Label

router = APIRouter(prefix="/v1")


def summary(engine: ModelEngine, default: bool, estimated_accuracy: float | None = None) -> dict[str, Any]:
    policy = engine.policy
    return {
        "name": engine.name,
        "default": default,
        "exits": engine.num_exits,
        "labels": len(engine.manifest.labels),
        "provider": engine.runtime.provider,
        "io_binding": engine.runtime.use_binding,
        "budget": policy.default_budget,
        "effective_budget": policy.effective_budget,
        "expected_accuracy": policy.expected_accuracy(policy.effective_budget),
        "expected_accuracy_basis": EXPECTED_ACCURACY_BASIS,
        "estimated_accuracy": None if estimated_accuracy is None else round(estimated_accuracy, 6),
        "calibrated": engine.calibration is not None,
    }


def public_manifest(engine: ModelEngine) -> dict[str, Any]:
    """The manifest as clients see it: the source checkpoint by file name, not by the path
    it had on the machine that exported it."""
    manifest = engine.manifest.model_dump()
    manifest["source"]["checkpoint"] = PurePath(manifest["source"]["checkpoint"]).name
    return manifest


@router.get("/models", summary="The models this server serves",
            responses={503: {"model": ErrorResponse, "description": "models are still loading"}})
async def list_models(service: Service) -> dict[str, Any]:
    catalog = service.catalog
    catalog.get(None)  # 503 while loading
    quality = service.quality
    return {"models": [summary(m.engine, name == catalog.default, quality.estimated_accuracy(name))
                       for name, m in sorted(catalog.models.items())]}


@router.get("/models/{name}", summary="A model's manifest, calibration summary, provider and budget in force",
            responses={404: {"model": ErrorResponse, "description": "no such model"},
                       503: {"model": ErrorResponse, "description": "models are still loading"}})
async def model_detail(name: str, service: Service) -> dict[str, Any]:
    served = service.catalog.get(name)
    engine = served.engine
    calibration = engine.calibration
    calibration_summary = None
    if calibration is not None:
        calibration_summary = {
            "rule": calibration.rule,
            "heldout": calibration.heldout,
            "exit_accuracy": calibration.exit_accuracy,
            "curve": [
                {"budget": p.budget, "expected_accuracy": p.expected_accuracy, "expected_cost": p.expected_cost,
                 "method": p.method}
                for p in calibration.curve
            ],
        }
    measured = controller.measured if (controller := engine.policy.controller) else None
    objective = engine.policy.objective
    objective_report = None
    if objective is not None:
        state = objective.state()
        answered = objective.within + objective.missed
        admission = served.line
        line = admission.state() if admission is not None else None
        objective_report = {
            "objective_ms": state.objective_ms,
            "floor_budget": state.floor_budget,
            "budget_cap": state.budget_cap,
            "step": state.step,
            "ladder": objective.ladder,
            "signal_ms": None if state.signal_ms is None else round(state.signal_ms, 3),
            "shedding": bool(line and line.engaged),  # the admission line limits (and may refuse)
            "admission": None if admission is None or line is None else {
                "limit": None if not line.engaged else round(line.limit, 1),
                "inside": line.inside,
                "waiting": line.waiting,
                "refused_waiting": admission.refused_waiting,
                "refused_full": admission.refused_full,
            },
            "attainment": round(objective.within / answered, 6) if answered else None,
            "answered": answered,
        }
    monitoring = service.quality.report(name)
    return {
        **summary(engine, name == service.catalog.default, monitoring and monitoring["estimated_accuracy"]),
        "measured_mean_cost": measured,
        "monitoring": monitoring,
        "latency_objective": objective_report,
        "stage_latency_ms": [round(lat.predict_ms(1), 4) for lat in engine.policy.latency],
        "manifest": public_manifest(engine),
        "calibration": calibration_summary,
    }


class LabelIn(BaseModel):
    request_id: str = Field(min_length=1, max_length=256, description="the X-Request-ID of the answer")
    label: StrictInt | str = Field(description="the true class: its index or its name")
    image: int = Field(0, ge=0, description="which image of the request (the batch endpoint answers several)")


class LabelsIn(BaseModel):
    labels: list[LabelIn] = Field(min_length=1, max_length=MAX_LABELS)


class LabelsOut(BaseModel):
    model: str
    matched: int  # labels scored against a remembered answer
    correct: int
    unknown: list[str]  # request ids this server never answered (or another worker did)
    expired: list[str]  # answered, but longer ago than the memory holds (EXITSERVE_LABEL_MEMORY requests)
    invalid: list[dict[str, str]]  # {"request_id", "error"}: a bad class, image index, or a second label
    labelled_accuracy: float | None  # over the last EXITSERVE_MONITOR_WINDOW labelled images
    labelled_images: int


@router.post("/models/{name}/labels", summary="True classes for answers already given, by request id",
             response_model=LabelsOut,
             responses={404: {"model": ErrorResponse, "description": "no such model"},
                        422: {"model": ErrorResponse, "description": "not a list of labels"},
                        503: {"model": ErrorResponse, "description": "models are still loading"}})
async def post_labels(name: str, body: LabelsIn, service: Service) -> LabelsOut:
    service.catalog.get(name)  # 404, 503
    report = service.quality.label(name, [Label(item.request_id, item.label, item.image) for item in body.labels])
    return LabelsOut(model=report.model, matched=report.matched, correct=report.correct, unknown=report.unknown,
                     expired=report.expired, invalid=report.invalid, labelled_accuracy=report.labelled_accuracy,
                     labelled_images=report.labelled_images)
