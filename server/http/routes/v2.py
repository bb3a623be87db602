"""The Open Inference Protocol (KServe v2 / Triton HTTP) beside /classify: the same service,
engines, batchers and metrics, with the early-exit options in the request's ``parameters``.

What the protocol's inputs, outputs and parameters mean is ``server.oip``'s, shared with
the gRPC transport (``server/grpc/``); this module is HTTP's half: the routes, the JSON
and binary bodies (``v2_codec``), and errors as ``{"error": MESSAGE}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

import exitserve
from exitserve.server import dataplane, oip
from exitserve.server.errors import ServingError
from exitserve.server.http.context import context_of
from exitserve.server.http.errors import RequestProblem, protocol_error_of, protocol_error_response
from exitserve.server.http.routes.deps import AppSettings, Service
from exitserve.server.http.v2_codec import (
    HEADER_LENGTH,
    OutputTensor,
    decompress,
    encode_response,
    parse_request,
    to_array,
)
from exitserve.server.oip import ModelMetadata
from exitserve.server.service import InferenceService

VERSION = oip.VERSION
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


# ---------------------------------------------------------------------------- health and metadata


@router.get("", response_model=ServerMetadata, summary="Server metadata", responses=_errors())
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=oip.SERVER_NAME, version=exitserve.__version__, extensions=EXTENSIONS)


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
    model = oip.check_model_ready(service, name, version)  # 503 while loading, 404 for an unknown model
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
    return oip.model_metadata(oip.resolve(service.catalog, name, None).engine, settings.max_files)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata,
            summary="Model metadata (one version)", responses=_errors(404, 503))
async def model_version(name: str, version: str, service: Service, settings: AppSettings) -> ModelMetadata:
    return oip.model_metadata(oip.resolve(service.catalog, name, version).engine, settings.max_files)


# ---------------------------------------------------------------------------- inference


async def _infer(request: Request, service: InferenceService, max_images: int, max_body_bytes: int, name: str,
                 version: str | None) -> Response:
    model = oip.resolve(service.catalog, name, version)  # metadata only: the data plane resolves it again to run it
    engine = model.engine
    body = decompress(await request.body(), request.headers.get("content-encoding"), max_body_bytes)
    parsed, blobs = parse_request(body, request.headers.get(HEADER_LENGTH))
    # every option and output checked before any image is decoded
    options = oip.parse_parameters(parsed.parameters)
    default_binary = oip.flag(parsed.parameters, "binary_data_output", False, "request parameters")
    wanted = oip.requested_outputs(parsed.outputs, len(engine.manifest.labels), default_binary)
    tensor = oip.the_input(parsed.inputs, engine, max_images)
    inputs = oip.model_inputs(tensor.name, to_array(tensor, blobs[0]))
    result = await oip.infer(service.plane, dataplane.InferenceRequest(inputs, options, model.name,
                                                                        context_of(request.scope)))
    header: dict[str, Any] = {"model_name": engine.name, "model_version": VERSION}
    if parsed.id is not None:
        header["id"] = parsed.id
    header["parameters"] = oip.answer_parameters(result)
    outputs = [OutputTensor(array.name, array.datatype, array.array, output.binary)
               for output, array in zip(wanted, oip.output_arrays(engine, result, wanted), strict=True)]
    content, header_length = encode_response(header, outputs)
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
