"""POST /classify and POST /classify/batch: validate, decode, await the service."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic_core import to_json
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from server.http import phases
from server.engine import ModelEngine
from server.errors import BadImage, InvalidOptions
from server.http.errors import RequestProblem
from server.http.middleware import arrival, record_model
from server.http.routes.deps import AppSettings, Service
from server.http.schemas import (
    BatchItem,
    BatchResponse,
    BatchSummary,
    Classification,
    ClassifyResponse,
    ErrorResponse,
    Timings,
)
from server.policy import ExitResult
from server.batcher import BatchOutcome
from server.service import InferenceService, RequestOptions

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    **{code: {"model": ErrorResponse} for code in (401, 404, 408, 413, 415, 422, 500, 503)},
    "default": {"model": ErrorResponse, "description": "any other refusal, with the same JSON body"},
}
OPTIONS: dict[str, dict[str, Any]] = {  # the bounds parse_options enforces, for the schema
    "budget": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
               "description": "mean cost per image, fraction of the full network"},
    "deadline_ms": {"type": "number", "exclusiveMinimum": 0, "maximum": 600_000},
    "top_k": {"type": "integer", "minimum": 1, "maximum": 10},
    "model": {"type": "string", "description": "a model of GET /v1/models (default: the server's default)"},
    "thresholds": {"type": "string", "pattern": r"^[-+0-9.eE]+(,[-+0-9.eE]+)*$",
                   "description": "comma-separated confidences, exactly one per exit but the last"},
}
BATCH_OPTIONS = ("budget", "model", "top_k")


def _parameters(names) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": False, "schema": OPTIONS[name]} for name in names]


SINGLE_BODY = {
    "parameters": _parameters(OPTIONS),
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary"}, **OPTIONS}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    },
}
BATCH_BODY = {
    "parameters": _parameters(BATCH_OPTIONS),
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["files"], "properties": {
                    "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
                    **{name: OPTIONS[name] for name in BATCH_OPTIONS}}}
            }
        },
        "required": True,
    },
}


# ---------------------------------------------------------------------------- parsing


def parse_number(name: str, raw: str | None, kind: type = float) -> Any:
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidOptions(f"{name} must be a number, got {raw!r}", code=f"invalid_{name}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidOptions(f"{name} must be finite, got {raw!r}", code=f"invalid_{name}")
    return value


def check_budget(budget: float | None, name: str = "budget") -> float | None:
    if budget is not None and not 0 < budget <= 1:
        raise InvalidOptions(f"{name} must be in (0, 1] (fraction of full cost), got {budget}", code=f"invalid_{name}")
    return budget


def check_deadline(deadline: float | None) -> float | None:
    if deadline is not None and not 0 < deadline <= 600_000:
        raise InvalidOptions(f"deadline_ms must be in (0, 600000], got {deadline}", code="invalid_deadline_ms")
    return deadline


def _option(name: str, form: FormData | None, request: Request) -> str | None:
    from_form = form.get(name) if form is not None else None
    if isinstance(from_form, UploadFile):
        raise InvalidOptions(f"{name} must be a form field, not a file")
    from_query = request.query_params.get(name)
    if from_form is not None and from_query is not None and from_form != from_query:
        raise InvalidOptions(f"{name} given in both the query and the form, differently", code="conflicting_options")
    return from_form if from_form is not None else from_query


def parse_options(form: FormData | None, request: Request, engine: ModelEngine, max_top_k: int) -> RequestOptions:
    budget = check_budget(parse_number("budget", _option("budget", form, request)))
    deadline = check_deadline(parse_number("deadline_ms", _option("deadline_ms", form, request)))
    top_k = parse_number("top_k", _option("top_k", form, request), int)
    classes = len(engine.manifest.labels)
    if top_k is None:
        top_k = 1
    elif not 1 <= top_k <= min(max_top_k, classes):
        raise InvalidOptions(f"top_k must be between 1 and {min(max_top_k, classes)}", code="invalid_top_k")
    thresholds = None
    raw = _option("thresholds", form, request)
    if raw:
        try:
            thresholds = [float(v) for v in raw.split(",")]
        except ValueError:
            raise InvalidOptions(f"thresholds must be comma-separated numbers: {raw!r}", code="invalid_thresholds") from None
        if not all(math.isfinite(v) for v in thresholds):
            raise InvalidOptions("thresholds must be finite", code="invalid_thresholds")
    return RequestOptions(budget=budget, deadline_ms=deadline, top_k=top_k, thresholds=thresholds)


async def read_form(request: Request, max_files: int) -> FormData:
    """The multipart form, refused unless the body ends with its closing boundary: the
    parser would otherwise drop a cut-off last part and answer as if it was never sent."""
    reading = time.perf_counter()
    body = await request.body()  # bounded by the body size limit; the form parser reads this copy
    phases.add(request.scope, "body", time.perf_counter() - reading)
    boundary = _boundary(request)
    if boundary is None:
        raise RequestProblem(422, "invalid_multipart", "multipart/form-data needs a boundary parameter")
    if b"--" + boundary + b"--" not in body[-(len(boundary) + 512):]:
        raise RequestProblem(422, "invalid_multipart",
                             "the multipart body ends before its closing boundary: the upload was cut off")
    try:
        return await request.form(max_files=max_files, max_fields=64)
    except (MultiPartException, StarletteHTTPException) as exc:  # Starlette wraps the former in a 400
        message = str(getattr(exc, "message", None) or getattr(exc, "detail", exc))
        if "Too many files" in message:
            raise RequestProblem(413, "too_many_files", f"{message} (at most {max_files} per request)") from None
        raise RequestProblem(422, "invalid_multipart", message) from None


def _boundary(request: Request) -> bytes | None:
    """The multipart boundary, parsed as Starlette's own form parser parses it."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    return params.get(b"boundary") or None


def describe(engine: ModelEngine, result: ExitResult, top_k: int) -> dict[str, Any]:
    """The classification part of an answer (``Classification``'s fields), as plain data:
    built once per image on the hot path, so no model is validated for it."""
    labels = engine.manifest.labels
    probs = result.probs
    order = np.argsort(-probs, kind="stable")[:top_k].tolist()
    best = order[0]
    return {
        "model": engine.name,
        "label": labels[best],
        "class_index": best,
        "confidence": round(float(probs[best]), 6),
        "exit": {"index": result.exit_index, "name": engine.manifest.stages[result.exit_index].exit_name,
                 "stages_run": result.stages_run, "cost_fraction": round(result.cost_fraction, 6),
                 "deadline_hit": result.deadline_hit},
        "top_k": [{"label": labels[i], "class_index": i, "probability": round(float(probs[i]), 6)} for i in order],
    }


def resolve_engine(request: Request, service: InferenceService, form: FormData | None) -> ModelEngine:
    """The model the request names (query or form), recorded for the request metrics."""
    engine = service.engine(_option("model", form, request))
    record_model(request.scope, engine.name)
    return engine


def admit_before_reading(request: Request, service: InferenceService, images: int) -> None:
    """Refuse a full model's requests before their body is read and decoded, so that
    refusing is cheap. The model is the one the query names (a form field is not known
    yet); the real admission happens when the decoded image is queued."""
    name = request.query_params.get("model")
    engine = service.engine(name) if name is None or name in service.engines else None
    if engine is not None:
        service.check_admission(engine, images, arrival(request.scope))


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# ---------------------------------------------------------------------------- routes


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=SINGLE_BODY,
             summary="Classify one image (multipart field `file`, or the raw image as the body)")
async def classify(request: Request) -> Response:
    # the service and settings straight from the app: FastAPI's dependency solving costs
    # more than the rest of the request's routing on this path (docs/design.md)
    arrived = time.perf_counter()
    scope = request.scope
    service: InferenceService = request.app.state.service
    settings = request.app.state.settings
    kind = _content_type(request)
    admit_before_reading(request, service, images=1)
    form = None
    if kind == "multipart/form-data":
        form = await read_form(request, max_files=1)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestProblem(422, "missing_file", "multipart field 'file' with the image is required")
        data = await upload.read()
        phases.add(scope, "multipart", time.perf_counter() - arrived - phases.get(scope, "body"))
    elif kind.startswith("image/") or kind == "application/octet-stream":
        data = await request.body()
        phases.add(scope, "body", time.perf_counter() - arrived)
    else:
        raise RequestProblem(415, "unsupported_media_type",
                             "send multipart/form-data with a 'file' field, or the image bytes with an image/* type")
    read = time.perf_counter()
    engine = resolve_engine(request, service, form)
    options = parse_options(form, request, engine, settings.max_top_k)
    thresholds, budget = service.thresholds(engine, options)  # validate before decoding
    phases.add(scope, "options", time.perf_counter() - read)
    image, decode_ms = await service.decode(data, engine)
    phases.add(scope, "decode", decode_ms / 1000)
    # deadlines and the latency objective count from when the request reached the app
    outcome = await service.classify(engine, image, thresholds, options, arrival(scope) or arrived)
    answered = time.perf_counter()
    if phases.timing(scope):
        _add_outcome_phases(scope, outcome, answered)
    applied, note = budget_applied(engine, budget, options, settings.slo_lowers_request_budgets)
    body = describe(engine, outcome.result, options.top_k)
    body |= {
        "budget": budget, "budget_applied": applied, "budget_note": note,
        "policy": "thresholds" if options.thresholds else "budget",
        "timings_ms": {"queue": round(outcome.queue_ms, 3), "decode": round(decode_ms, 3),
                       "inference": round(outcome.inference_ms, 3),
                       "total": round((time.perf_counter() - arrived) * 1000, 3)},
    }
    response = Response(to_json(body), media_type="application/json")  # ClassifyResponse's shape (tests pin it)
    phases.add(scope, "respond", time.perf_counter() - answered)
    return response


def budget_applied(engine: ModelEngine, budget: float | None, options: RequestOptions,
                   may_lower: bool) -> tuple[float | None, str | None]:
    """The budget the thresholds came from, and why it differs from ``budget`` if it does."""
    if budget is None:  # explicit thresholds
        return None, None
    policy = engine.policy
    if budget < policy.min_budget:
        return policy.min_budget, (f"below the cost of {engine.name}'s first exit ({policy.min_budget:.4f}): no "
                                   "image can cost less, so that is what was spent")
    used = policy.effective_budget if options.budget is None else policy.request_budget(budget, may_lower)
    cap = policy.objective.budget_cap if policy.objective else None
    if cap is not None and used <= cap < budget:
        return used, f"lowered to {used:g} by the {policy.objective.objective_ms:g} ms latency objective under load"
    return budget, None


def _add_outcome_phases(scope: dict[str, Any], outcome: BatchOutcome, answered: float) -> None:
    """Queue, the batch's run, each of its stages, and the hop back to this coroutine."""
    phases.add(scope, "queue", outcome.queue_ms / 1000)
    phases.add(scope, "inference", outcome.inference_ms / 1000)
    phases.add(scope, "resume", answered - outcome.finished)
    for stage, ms in outcome.stage_ms.items():
        phases.add(scope, f"stage_{stage}", ms / 1000)


@router.post("/classify/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY,
             summary="Classify many images within one budget for the whole batch")
async def classify_batch(request: Request, service: Service, settings: AppSettings) -> BatchResponse:
    arrived = time.perf_counter()
    if _content_type(request) != "multipart/form-data":
        raise RequestProblem(415, "unsupported_media_type", "send multipart/form-data with repeated 'files' fields")
    admit_before_reading(request, service, images=1)
    form = await read_form(request, max_files=settings.max_files)
    uploads = form.getlist("files")
    if not uploads:
        raise RequestProblem(422, "missing_files", "multipart field 'files' (repeated, one per image) is required")
    if not all(isinstance(u, UploadFile) for u in uploads):
        raise RequestProblem(422, "invalid_request", "every 'files' field must be a file")
    engine = resolve_engine(request, service, form)
    options = parse_options(form, request, engine, settings.max_top_k)
    if options.thresholds is not None or options.deadline_ms is not None:
        raise InvalidOptions("the batch endpoint takes a budget for the whole batch, not thresholds or deadlines")
    budget = options.budget if options.budget is not None else engine.policy.default_budget
    engine.policy.check_batch_budget(budget)  # before reading and decoding every file
    started = time.perf_counter()
    blobs = [await u.read() for u in uploads]
    decoded = await asyncio.gather(*(service.decode(b, engine) for b in blobs), return_exceptions=True)
    decode_ms = (time.perf_counter() - started) * 1000
    items: list[BatchItem] = []
    good: list[int] = []
    for i, (upload, outcome) in enumerate(zip(uploads, decoded)):
        if isinstance(outcome, BadImage):
            items.append(BatchItem(index=i, filename=upload.filename, error=outcome.code, detail=outcome.detail))
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            items.append(BatchItem(index=i, filename=upload.filename))
            good.append(i)
    histogram = [0] * engine.num_exits
    results: list[ExitResult] = []
    inference_started = time.perf_counter()
    if good:
        images = np.stack([decoded[i][0] for i in good])
        results = await service.classify_budgeted(engine, images, budget)
        for i, result in zip(good, results, strict=True):
            items[i].result = Classification.model_validate(describe(engine, result, options.top_k))
            histogram[result.exit_index] += 1
    inference_ms = (time.perf_counter() - inference_started) * 1000
    mean_cost = float(np.mean([r.cost_fraction for r in results])) if results else 0.0
    summary = BatchSummary(
        count=len(items), classified=len(good), failed=len(items) - len(good), budget=budget,
        mean_cost_fraction=round(mean_cost, 6), spent_fraction=round(mean_cost / budget, 6) if results else 0.0,
        exit_histogram=histogram, expected_accuracy=engine.policy.expected_accuracy(budget),
    )
    total = (time.perf_counter() - arrived) * 1000
    return BatchResponse(model=engine.name, results=items, summary=summary,
                         timings_ms=Timings(queue=0.0, decode=round(decode_ms, 3), inference=round(inference_ms, 3),
                                            total=round(total, 3)))
