"""GET /v1/models and GET /v1/models/{name}."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from fastapi import APIRouter

from exitserve.server.engine import ModelEngine
from exitserve.server.http.routes.deps import Service
from exitserve.server.http.schemas import ErrorResponse

router = APIRouter(prefix="/v1")


def summary(engine: ModelEngine, default: bool) -> dict[str, Any]:
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
    return {"models": [summary(m.engine, name == catalog.default) for name, m in sorted(catalog.models.items())]}


@router.get("/models/{name}", summary="A model's manifest, calibration summary, provider and budget in force",
            responses={404: {"model": ErrorResponse, "description": "no such model"},
                       503: {"model": ErrorResponse, "description": "models are still loading"}})
async def model_detail(name: str, service: Service) -> dict[str, Any]:
    engine = service.catalog.get(name).engine
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
        objective_report = {
            "objective_ms": state.objective_ms,
            "floor_budget": state.floor_budget,
            "budget_cap": state.budget_cap,
            "step": state.step,
            "ladder": objective.ladder,
            "signal_ms": None if state.signal_ms is None else round(state.signal_ms, 3),
            "shedding": state.shedding,
            "attainment": round(objective.within / answered, 6) if answered else None,
            "answered": answered,
        }
    return {
        **summary(engine, name == service.catalog.default),
        "measured_mean_cost": measured,
        "latency_objective": objective_report,
        "stage_latency_ms": [round(lat.predict_ms(1), 4) for lat in engine.policy.latency],
        "manifest": public_manifest(engine),
        "calibration": calibration_summary,
    }
