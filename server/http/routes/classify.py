"""POST /classify and POST /classify/batch: the HTTP form of an inference request, in and out.

Each route reads its body, gathers the options from the query and the form, awaits the
data plane once (``server.dataplane``) and writes its answer from the result.
"""

from __future__ import annotations

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

from exitserve.server.dataplane import (
    EXPECTED_ACCURACY_BASIS,
    DataPlane,
    EncodedImages,
    InferenceRequest,
    InferenceResult,
)
from exitserve.server.errors import InvalidOptions
from exitserve.server.http.context import context_of
from exitserve.server.http.errors import RequestProblem
from exitserve.server.http.schemas import BatchResponse, ClassifyResponse, ErrorResponse
from exitserve.server.options import parse_model, parse_options
from exitserve.server.policy import ExitResult

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


# ---------------------------------------------------------------------------- the request


def gather_options(form: FormData | None, request: Request, names: tuple[str, ...]) -> dict[str, str]:
    """Each option the query or the form gives (a form field and a query parameter that
    disagree are refused), as text."""
    found = {}
    for name in names:
        from_form = form.get(name) if form is not None else None
        if isinstance(from_form, UploadFile):
            raise InvalidOptions(f"{name} must be a form field, not a file")
        from_query = request.query_params.get(name)
        if from_form is not None and from_query is not None and from_form != from_query:
            raise InvalidOptions(f"{name} given in both the query and the form, differently",
                                 code="conflicting_options")
        value = from_form if from_form is not None else from_query
        if value is not None:
            found[name] = value
    return found


async def read_form(request: Request, max_files: int) -> FormData:
    """The multipart form, refused unless the body ends with its closing boundary: the
    parser would otherwise drop a cut-off last part and answer as if it was never sent."""
    context = context_of(request.scope)
    reading = time.perf_counter()
    body = await request.body()  # bounded by the body size limit; the form parser reads this copy
    context.add_phase("body", time.perf_counter() - reading)
    boundary = _boundary(request)
    if boundary is None:
        raise RequestProblem(422, "invalid_multipart", "multipart/form-data needs a boundary parameter")
    if b"--" + boundary + b"--" not in body[-(len(boundary) + 512):]:
        raise RequestProblem(422, "invalid_multipart",
                             "the multipart body ends before its closing boundary: the upload was cut off")
    parsing = time.perf_counter()
    try:
        form = await request.form(max_files=max_files, max_fields=64)
    except (MultiPartException, StarletteHTTPException) as exc:  # Starlette wraps the former in a 400
        message = str(getattr(exc, "message", None) or getattr(exc, "detail", exc))
        if "Too many files" in message:
            raise RequestProblem(413, "too_many_files", f"{message} (at most {max_files} per request)") from None
        raise RequestProblem(422, "invalid_multipart", message) from None
    context.add_phase("multipart", time.perf_counter() - parsing)
    return form


def _boundary(request: Request) -> bytes | None:
    """The multipart boundary, parsed as Starlette's own form parser parses it."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    return params.get(b"boundary") or None


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# ---------------------------------------------------------------------------- the answer


def describe(result: InferenceResult, answer: ExitResult) -> dict[str, Any]:
    """The classification part of an answer (``Classification``'s fields), as plain data:
    built once per image on the hot path, so no model is validated for it."""
    engine = result.model.engine
    labels = engine.manifest.labels
    probs = answer.probs
    order = np.argsort(-probs, kind="stable")[:result.top_k].tolist()
    best = order[0]
    return {
        "model": engine.name,
        "label": labels[best],
        "class_index": best,
        "confidence": round(float(probs[best]), 6),
        "exit": {"index": answer.exit_index, "name": engine.manifest.stages[answer.exit_index].exit_name,
                 "stages_run": answer.stages_run, "cost_fraction": round(answer.cost_fraction, 6),
                 "deadline_hit": answer.deadline_hit},
        "top_k": [{"label": labels[i], "class_index": i, "probability": round(float(probs[i]), 6)} for i in order],
    }


def _timings(result: InferenceResult, started: float) -> dict[str, float]:
    return {"queue": round(result.queue_ms, 3), "decode": round(result.decode_ms, 3),
            "inference": round(result.inference_ms, 3), "total": round((time.perf_counter() - started) * 1000, 3)}


def _plane(request: Request) -> DataPlane:
    # straight from the app: FastAPI's dependency solving costs more than the rest of the
    # request's routing on this path (docs/design.md)
    return request.app.state.service.plane


# ---------------------------------------------------------------------------- routes

OPTION_NAMES = ("model", "budget", "deadline_ms", "top_k", "thresholds")


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=SINGLE_BODY,
             summary="Classify one image (multipart field `file`, or the raw image as the body)")
async def classify(request: Request) -> Response:
    started = time.perf_counter()
    context = context_of(request.scope)
    kind = _content_type(request)
    form = None
    if kind == "multipart/form-data":
        form = await read_form(request, max_files=1)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestProblem(422, "missing_file", "multipart field 'file' with the image is required")
        data = await upload.read()
    elif kind.startswith("image/") or kind == "application/octet-stream":
        data = await request.body()
        context.add_phase("body", time.perf_counter() - started)
    else:
        raise RequestProblem(415, "unsupported_media_type",
                             "send multipart/form-data with a 'file' field, or the image bytes with an image/* type")
    parsing = time.perf_counter()
    raw = gather_options(form, request, OPTION_NAMES)
    model = parse_model(raw.pop("model", None))
    options = parse_options(raw)
    context.add_phase("options", time.perf_counter() - parsing)
    result = await _plane(request).infer(InferenceRequest(EncodedImages([data]), options, model, context))
    answered = time.perf_counter()
    decision = result.budget
    body = describe(result, result.results[0])
    body |= {
        "budget": decision.requested, "budget_applied": decision.applied, "budget_note": decision.note,
        "policy": decision.policy, "timings_ms": _timings(result, started),
    }
    response = Response(to_json(body), media_type="application/json")  # ClassifyResponse's shape (tests pin it)
    context.add_phase("respond", time.perf_counter() - answered)
    return response


@router.post("/classify/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY,
             summary="Classify many images within one budget for the whole batch")
async def classify_batch(request: Request) -> Response:
    started = time.perf_counter()
    context = context_of(request.scope)
    if _content_type(request) != "multipart/form-data":
        raise RequestProblem(415, "unsupported_media_type", "send multipart/form-data with repeated 'files' fields")
    form = await read_form(request, max_files=request.app.state.settings.max_files)
    uploads = form.getlist("files")
    if not uploads:
        raise RequestProblem(422, "missing_files", "multipart field 'files' (repeated, one per image) is required")
    if not all(isinstance(u, UploadFile) for u in uploads):
        raise RequestProblem(422, "invalid_request", "every 'files' field must be a file")
    raw = gather_options(form, request, OPTION_NAMES)
    model = parse_model(raw.pop("model", None))
    options = parse_options(raw, whole_batch=True)
    blobs = [await u.read() for u in uploads]
    result = await _plane(request).infer(InferenceRequest(EncodedImages(blobs), options, model, context,
                                                          bad_images="per_image"))
    items = []
    for i, (upload, answer) in enumerate(zip(uploads, result.images, strict=True)):
        item: dict[str, Any] = {"index": i, "filename": upload.filename, "result": None, "error": None,
                                "detail": None}
        if answer.error is not None:
            item |= {"error": answer.error.code, "detail": answer.error.detail}
        else:
            item["result"] = describe(result, answer.result)
        items.append(item)
    summary = {
        "count": len(items), "classified": len(items) - result.failed, "failed": result.failed,
        "budget": result.budget.requested, "mean_cost_fraction": round(result.mean_cost_fraction, 6),
        "spent_fraction": round(result.spent_fraction or 0.0, 6), "exit_histogram": result.exit_histogram,
        "expected_accuracy": result.expected_accuracy,
        "expected_accuracy_basis": EXPECTED_ACCURACY_BASIS if result.expected_accuracy is not None else None,
        "estimated_accuracy": None if result.estimated_accuracy is None else round(result.estimated_accuracy, 6),
    }
    body = {"model": result.model.name, "results": items, "summary": summary, "timings_ms": _timings(result, started)}
    return Response(to_json(body), media_type="application/json")  # BatchResponse's shape
