"""The Open Inference Protocol (KServe v2 / Triton HTTP) beside /classify: the same service,
engines, batchers and metrics, with the early-exit options in the request's ``parameters``.

Inputs (exactly one per request; N images, 1 <= N <= ``EXITSERVE_MAX_FILES``):

* ``images`` BYTES [N]: encoded images, through the same decoder and limits as /classify;
* ``pixels`` UINT8 [N, H, W] or [N, H, W, C]: raw pixels (C: 1, 3 or 4), converted and
  normalized exactly as a decoded image of those pixels;
* ``normalized`` FP32 [N, C, H, W]: already normalized, the model's own input shape.

Outputs: ``probabilities`` FP32 [N, classes], ``class_index`` INT64 [N], ``exit_index``
INT32 [N], ``cost_fraction`` FP32 [N]. Parameters: ``budget`` (each image on its own, as
/classify), ``batch_budget`` (one budget for the whole request, as /classify/batch),
``deadline_ms``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

import exitserve
from exitserve.server.catalog import ServedModel
from exitserve.server import dataplane
from exitserve.server.dataplane import (
    EXPECTED_ACCURACY_BASIS,
    EncodedImages,
    InferenceResult,
    Inputs,
    NormalizedImages,
    PixelImages,
)
from exitserve.server.engine import ModelEngine
from exitserve.server.errors import BadImage, InvalidInput, InvalidOptions, NotReady, ServingError, UnknownModel
from exitserve.server.http.context import context_of
from exitserve.server.http.errors import RequestProblem, protocol_error_of, protocol_error_response
from exitserve.server.http.routes.deps import AppSettings, Service
from exitserve.server.options import parse_options
from exitserve.server.http.v2_codec import (
    HEADER_LENGTH,
    InferenceRequest,
    OutputTensor,
    Parameter,
    RequestInput,
    decompress,
    encode_response,
    parse_request,
    to_array,
)
from exitserve.server.service import InferenceService

VERSION = "1"  # a model folder is one version
PLATFORM = "exitserve_staged_onnx"
EXTENSIONS = ["binary_tensor_data", "classification", "parameters"]


class ProtocolRoute(APIRoute):
    """Errors as the protocol sends them, ``{"error": MESSAGE}`` with 400/404/503 (and 500
    when the model fails), instead of the server-wide error body of /classify."""

    def get_route_handler(self):  # noqa: ANN201 (Starlette's handler type)
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServingError as exc:
                return protocol_error_of(exc, request.app.state.settings.retry_after_s)
            except RequestProblem as exc:
                return protocol_error_response(exc.status, exc.detail)
            except RequestValidationError as exc:
                return protocol_error_response(400, "; ".join(str(e.get("msg")) for e in exc.errors()))

        return protocol_errors


router = APIRouter(prefix="/v2", route_class=ProtocolRoute, tags=["Open Inference Protocol (v2)"])


# ---------------------------------------------------------------------------- schemas (what /docs shows)


class ProtocolError(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool
    error: str | None = None


class ModelReadiness(BaseModel):
    name: str
    ready: bool


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    # 401, 408 and 413 come from the middleware, before the route: their body has `error` too
    return {code: {"model": ProtocolError} for code in (*codes, 401, 408, 413)}


PARAMETERS_SCHEMA = {"type": "object", "additionalProperties": {"type": ["boolean", "number", "string"]}}
INFER_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False,
                    "description": "binary tensor extension: the length of the JSON header at the body's start",
                    "schema": {"type": "integer", "minimum": 1}}],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {**PARAMETERS_SCHEMA, "description": "budget, batch_budget, deadline_ms, "
                                                                       "binary_data_output"},
                    "inputs": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["name", "shape", "datatype"],
                        "properties": {"name": {"type": "string"},
                                       "shape": {"type": "array", "maxItems": 8,
                                                 "items": {"type": "integer", "minimum": 0}},
                                       "datatype": {"type": "string"}, "parameters": PARAMETERS_SCHEMA, "data": {}}}},
                    "outputs": {"type": "array", "items": {
                        "type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"}, "parameters": PARAMETERS_SCHEMA}}},
                }}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                    "description": f"the JSON header ({HEADER_LENGTH} bytes), "
                                                                   "then the binary tensors"}},
        },
    },
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the outputs; with binary outputs the JSON header (its length in "
                         f"{HEADER_LENGTH}) and then their bytes",
          "content": {"application/json": {"schema": {
                          "type": "object", "required": ["model_name", "outputs"],
                          "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                                         "id": {"type": "string"}, "parameters": PARAMETERS_SCHEMA,
                                         "outputs": {"type": "array", "items": {"type": "object"}}}}},
                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **_errors(400, 404, 500, 503),
}


# ---------------------------------------------------------------------------- model description


INPUTS = {"images": "BYTES", "pixels": "UINT8", "normalized": "FP32"}
OUTPUTS = {"probabilities": "FP32", "class_index": "INT64", "exit_index": "INT32", "cost_fraction": "FP32"}
PARAMETERS = ("budget", "batch_budget", "deadline_ms")  # the request parameters that are early-exit options


def model_metadata(engine: ModelEngine, max_images: int) -> ModelMetadata:
    spec = engine.manifest.input
    classes = len(engine.manifest.labels)

    def tensor(name: str, shape: list[int], description: str) -> TensorMetadata:
        datatype = INPUTS.get(name) or OUTPUTS[name]
        return TensorMetadata(name=name, datatype=datatype, shape=shape, parameters={"description": description})

    return ModelMetadata(
        name=engine.name, versions=[VERSION], platform=PLATFORM,
        inputs=[
            tensor("images", [-1], "encoded images (PNG, JPEG, ...), one per element; base64 strings in JSON"),
            tensor("pixels", [-1, -1, -1, -1], "raw pixels N x H x W x C (C: 1, 3 or 4; N x H x W for grey), "
                                               f"resized to {spec.size}x{spec.size} as a decoded image would be"),
            tensor("normalized", [-1, spec.channels, spec.size, spec.size],
                   f"already normalized N x C x H x W (mean {spec.mean}, std {spec.std})"),
        ],
        outputs=[
            tensor("probabilities", [-1, classes], "softmax probabilities at the exit each image left by"),
            tensor("class_index", [-1], "the most probable class"),
            tensor("exit_index", [-1], f"the exit each image left by (0 to {engine.num_exits - 1})"),
            tensor("cost_fraction", [-1], "what each image cost, as a fraction of the full network"),
        ],
        parameters={"exits": engine.num_exits, "classes": classes, "labels_at": f"/v1/models/{engine.name}",
                    "default_budget": engine.policy.default_budget, "min_budget": engine.policy.min_budget,
                    "max_images": max_images},
    )


def resolve(service: InferenceService, name: str, version: str | None) -> ServedModel:
    model = service.catalog.get(name)
    if version is not None and version != VERSION:
        raise UnknownModel(f"model {name!r} has no version {version!r}; it has version {VERSION}")
    return model


# ---------------------------------------------------------------------------- health and metadata


@router.get("", response_model=ServerMetadata, summary="Server metadata", responses=_errors())
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="exitserve", version=exitserve.__version__, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness, summary="Liveness: the process answers", responses=_errors())
async def live() -> Liveness:
    return Liveness(live=True)


@router.get("/health/ready", response_model=Readiness, summary="Readiness: as /readyz",
            responses={503: {"model": Readiness}, **_errors()})
async def ready(service: Service) -> Response:
    is_ready, body = service.readiness()
    if is_ready:
        return JSONResponse({"ready": True})
    detail = body.get("detail") or body["status"]
    return JSONResponse({"ready": False, "error": f"{body['status']}: {detail}"}, status_code=503)


async def _model_ready(service: InferenceService, name: str, version: str | None) -> ModelReadiness:
    model = resolve(service, name, version)  # 503 while loading, 404 for an unknown model
    is_ready, body = service.readiness()
    if not is_ready and (body["status"] != "stalled" or model.name in body.get("models", [])):
        raise NotReady(f"{model.name} is not ready: {body.get('detail') or body['status']}")
    return ModelReadiness(name=model.name, ready=True)


@router.get("/models/{name}/ready", response_model=ModelReadiness, summary="Model readiness",
            responses=_errors(404, 503))
async def model_ready(name: str, service: Service) -> ModelReadiness:
    return await _model_ready(service, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReadiness,
            summary="Model readiness (one version)", responses=_errors(404, 503))
async def model_version_ready(name: str, version: str, service: Service) -> ModelReadiness:
    return await _model_ready(service, name, version)


@router.get("/models/{name}", response_model=ModelMetadata, summary="Model metadata: inputs, outputs, shapes",
            responses=_errors(404, 503))
async def model(name: str, service: Service, settings: AppSettings) -> ModelMetadata:
    return model_metadata(resolve(service, name, None).engine, settings.max_files)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata,
            summary="Model metadata (one version)", responses=_errors(404, 503))
async def model_version(name: str, version: str, service: Service, settings: AppSettings) -> ModelMetadata:
    return model_metadata(resolve(service, name, version).engine, settings.max_files)


# ---------------------------------------------------------------------------- inference


def _flag(parameters: dict[str, Any], name: str, default: bool, where: str) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidOptions(f"{where}: {name} must be true or false, got {value!r}")
    return value


def requested_outputs(request: InferenceRequest, classes: int) -> list[tuple[str, bool, int]]:
    """(name, binary, classification top-k or 0) of each output to send, in request order."""
    default_binary = _flag(request.parameters, "binary_data_output", False, "request parameters")
    if not request.outputs:
        return [(name, default_binary, 0) for name in OUTPUTS]
    chosen = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise InvalidInput(f"no output {output.name!r}; the outputs are {', '.join(OUTPUTS)}")
        if output.name in (c[0] for c in chosen):
            raise InvalidInput(f"output {output.name!r} is asked for twice")
        binary = _flag(output.parameters, "binary_data", default_binary, f"output {output.name!r}")
        top = output.parameters.get("classification", 0)
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= classes:
            raise InvalidInput(f"output {output.name!r}: classification must be a class count in [0, {classes}]")
        if top and output.name != "probabilities":
            raise InvalidInput("classification applies to the probabilities output only")
        chosen.append((output.name, binary, top))
    return chosen


def the_input(request: InferenceRequest, engine: ModelEngine, max_images: int) -> RequestInput:
    """The request's one input, its name, datatype, rank and batch size checked."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"send exactly one input, got {len(request.inputs)} "
                           f"({', '.join(repr(t.name) for t in request.inputs)})")
    tensor = request.inputs[0]
    if tensor.name not in INPUTS:
        raise InvalidInput(f"{engine.name} has no input {tensor.name!r}; its inputs are "
                           + ", ".join(f"{name} ({datatype})" for name, datatype in INPUTS.items()))
    if tensor.datatype != INPUTS[tensor.name]:
        raise InvalidInput(f"input {tensor.name!r} is {INPUTS[tensor.name]}, got {tensor.datatype}")
    ranks = {"images": (1,), "pixels": (3, 4), "normalized": (4,)}[tensor.name]
    if len(tensor.shape) not in ranks:
        expected = {"images": "[N]", "pixels": "[N, H, W] or [N, H, W, C]", "normalized": "[N, C, H, W]"}[tensor.name]
        raise InvalidInput(f"input {tensor.name!r} has shape {tensor.shape}; it takes {expected}")
    if not 1 <= tensor.shape[0] <= max_images:
        raise InvalidInput(f"input {tensor.name!r}: a request carries 1 to {max_images} images, got {tensor.shape[0]}")
    return tensor


def model_inputs(tensor: RequestInput, array: np.ndarray) -> Inputs:
    """The data plane's form of whichever input was sent."""
    if tensor.name == "images":
        return EncodedImages(list(array))
    if tensor.name == "pixels":
        return PixelImages(array[..., None] if array.ndim == 3 else array)
    return NormalizedImages(array)


def _outputs(engine: ModelEngine, result: InferenceResult, wanted: list[tuple[str, bool, int]]) -> list[OutputTensor]:
    results = result.results
    probs = np.stack([r.probs for r in results]).astype(np.float32)  # N x classes
    arrays = {
        "probabilities": probs,
        "class_index": probs.argmax(axis=1).astype(np.int64),  # the first of equals, as /classify's stable sort
        "exit_index": np.array([r.exit_index for r in results], dtype=np.int32),
        "cost_fraction": np.array([r.cost_fraction for r in results], dtype=np.float32),
    }
    tensors = []
    for name, binary, top in wanted:
        if top:  # Triton's classification extension: "probability:index:label", most probable first
            labels = engine.manifest.labels
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
            texts = [[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in idx] for row, idx in zip(probs, order)]
            array = np.empty((len(results), top), dtype=object)
            array[:] = texts
            tensors.append(OutputTensor(name, "BYTES", array, binary))
        else:
            tensors.append(OutputTensor(name, OUTPUTS[name], arrays[name], binary))
    return tensors


def answer_parameters(result: InferenceResult) -> dict[str, Parameter]:
    """The early-exit part of the answer: the budget decision and what was spent."""
    decision = result.budget
    answer: dict[str, Parameter] = {"policy": decision.policy, "budget": decision.requested}
    if decision.policy == "batch_budget":
        answer["spent_fraction"] = round(result.spent_fraction or 0.0, 6)
        if (expected := result.expected_accuracy) is not None:
            answer["expected_accuracy"] = expected
            answer["expected_accuracy_basis"] = EXPECTED_ACCURACY_BASIS
            if result.estimated_accuracy is not None:
                answer["estimated_accuracy"] = round(result.estimated_accuracy, 6)
    else:
        answer["budget_applied"] = decision.applied
        if decision.note is not None:
            answer["budget_note"] = decision.note
        answer["deadline_hits"] = result.deadline_hits
    answer["mean_cost_fraction"] = round(result.mean_cost_fraction, 6)
    return answer


async def _infer(request: Request, service: InferenceService, max_images: int, max_body_bytes: int, name: str,
                 version: str | None) -> Response:
    model = resolve(service, name, version)  # metadata only: the data plane resolves it again to run it
    engine = model.engine
    body = decompress(await request.body(), request.headers.get("content-encoding"), max_body_bytes)
    parsed, blobs = parse_request(body, request.headers.get(HEADER_LENGTH))
    # every option and output checked before any image is decoded
    options = parse_options({k: v for k, v in parsed.parameters.items() if k in PARAMETERS})
    wanted = requested_outputs(parsed, len(engine.manifest.labels))
    tensor = the_input(parsed, engine, max_images)
    inputs = model_inputs(tensor, to_array(tensor, blobs[0]))
    try:
        result = await service.plane.infer(dataplane.InferenceRequest(inputs, options, model.name,
                                                                     context_of(request.scope)))
    except BadImage as exc:
        raise type(exc)(f"input 'images' element {exc.index}: {exc.detail}") from None
    header: dict[str, Any] = {"model_name": engine.name, "model_version": VERSION}
    if parsed.id is not None:
        header["id"] = parsed.id
    header["parameters"] = answer_parameters(result)
    content, header_length = encode_response(header, _outputs(engine, result, wanted))
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


@router.post("/models/{name}/infer", summary="Classify a batch of images (the protocol's inference request)",
             openapi_extra=INFER_OPENAPI, responses=INFER_RESPONSES, response_class=Response)
async def infer(name: str, request: Request, service: Service, settings: AppSettings) -> Response:
    return await _infer(request, service, settings.max_files, settings.max_body_bytes, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Classify a batch of images (one version)",
             openapi_extra=INFER_OPENAPI, responses=INFER_RESPONSES, response_class=Response)
async def infer_version(name: str, version: str, request: Request, service: Service,
                        settings: AppSettings) -> Response:
    return await _infer(request, service, settings.max_files, settings.max_body_bytes, name, version)
