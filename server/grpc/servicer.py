"""``inference.GRPCInferenceService``: each RPC translates its message with ``server.oip`` (the
protocol's meaning, shared with v2 over HTTP), awaits the data plane once, and translates
the answer back. Around every call, what HTTP's middleware does for a request: the request
id (metadata ``x-request-id``, echoed in the trailing metadata), the API key (metadata
``authorization: Bearer KEY`` or ``x-api-key``, the same check as HTTP's), admission and
the in-flight count, the request metrics, and the domain errors as status codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

import exitserve
from exitserve.server import dataplane, oip
from exitserve.server.errors import InvalidInput, NotReady, ServingError
from exitserve.server.grpc import grpc_predict_v2_pb2 as pb
from exitserve.server.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from exitserve.server.grpc import tensors
from exitserve.server.grpc.errors import RETRY_AFTER, RETRYABLE, http_status, status_of
from exitserve.server.http.security import REQUEST_ID_HEADER, ApiKeyAuth, RequestIdMiddleware
from exitserve.server.metrics import Metrics
from exitserve.server.request_context import RequestContext, request_id_var
from exitserve.server.service import InferenceService
from exitserve.server.settings import Settings

log = logging.getLogger("exitserve.grpc")
EXTENSIONS = ["classification", "parameters"]
INFER_ROUTE = "grpc:ModelInfer"  # the request metrics' route label, beside /v2/models/{name}/infer
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # as /v2/health/*: no key unless EXITSERVE_PROTECT_HEALTH
UNAUTHENTICATED_DETAIL = "missing or invalid API key: send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'"
Metadata = Sequence[tuple[str, str | bytes]]
Handler = Callable[[Any, RequestContext], Awaitable[Message]]


def as_headers(metadata: Metadata | None) -> dict[str, Any]:
    """A call's metadata in the shape of an ASGI scope with its headers (lower-case names,
    bytes), so HTTP's request-id choice and API-key check read it unchanged."""
    return {"headers": [(key.lower().encode(), value if isinstance(value, bytes) else value.encode())
                        for key, value in metadata or ()]}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService, settings: Settings, metrics: Metrics) -> None:
        self.service = service
        self.settings = settings
        self.metrics = metrics
        # HTTP's own key check (header parsing, constant-time compare), used without its middleware role
        self.keys = ApiKeyAuth(None, settings.api_keys, ()) if settings.api_keys else None  # type: ignore[arg-type]
        self.open_methods = frozenset() if settings.protect_health else OPEN_METHODS

    # ------------------------------------------------------------------ health and metadata
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return await self._serve("ServerLive", context, self._live, request)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return await self._serve("ServerReady", context, self._ready, request)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return await self._serve("ModelReady", context, self._model_ready, request)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return await self._serve("ServerMetadata", context, self._server_metadata, request)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return await self._serve("ModelMetadata", context, self._model_metadata, request)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._serve("ModelInfer", context, self._model_infer, request, measured=True)

    async def _live(self, request: pb.ServerLiveRequest, call: RequestContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _ready(self, request: pb.ServerReadyRequest, call: RequestContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.readiness()[0])  # False while loading or draining

    async def _model_ready(self, request: pb.ModelReadyRequest, call: RequestContext) -> pb.ModelReadyResponse:
        try:
            oip.check_model_ready(self.service, _model_name(request.name), request.version or None)
        except NotReady:  # the answer has a place for "no"; an unknown model is still NOT_FOUND
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def _server_metadata(self, request: pb.ServerMetadataRequest,
                               call: RequestContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=exitserve.__version__, extensions=EXTENSIONS)

    async def _model_metadata(self, request: pb.ModelMetadataRequest, call: RequestContext) -> pb.ModelMetadataResponse:
        model = oip.resolve(self.service.catalog, _model_name(request.name), request.version or None)
        metadata = oip.model_metadata(model.engine, self.settings.max_files)

        def described(tensor: oip.TensorMetadata) -> pb.ModelMetadataResponse.TensorMetadata:
            return pb.ModelMetadataResponse.TensorMetadata(name=tensor.name, datatype=tensor.datatype,
                                                           shape=tensor.shape)

        return pb.ModelMetadataResponse(name=metadata.name, versions=metadata.versions, platform=metadata.platform,
                                        inputs=[described(t) for t in metadata.inputs],
                                        outputs=[described(t) for t in metadata.outputs])

    # ------------------------------------------------------------------ inference
    async def _model_infer(self, request: pb.ModelInferRequest, call: RequestContext) -> pb.ModelInferResponse:
        name = _model_name(request.model_name)
        plane = self.service.plane
        with self.service.state.request():  # what HTTP's admission gate does before the body is read
            line = plane.admit_early(name, 1)
            entered = await line.enter() if line is not None else 0.0
            try:
                return await self._infer(request, name, call)
            finally:
                if line is not None:
                    line.leave(entered)

    async def _infer(self, request: pb.ModelInferRequest, name: str, call: RequestContext) -> pb.ModelInferResponse:
        model = oip.resolve(self.service.catalog, name, request.model_version or None)
        engine = model.engine
        headers = tensors.input_headers(request)
        # every option and output checked before any image is decoded, as over HTTP
        options = oip.parse_parameters(tensors.parameters(request.parameters, "request parameters"))
        outputs = [tensors.OutputRequest(o.name, tensors.parameters(o.parameters, f"output {o.name!r}"))
                   for o in request.outputs]
        wanted = oip.requested_outputs(outputs, len(engine.manifest.labels))
        tensor = oip.the_input(headers, engine, self.settings.max_files)
        inputs = oip.model_inputs(tensor.name, tensors.input_array(request, 0))
        result = await oip.infer(self.service.plane, dataplane.InferenceRequest(inputs, options, model.name, call))

        response = pb.ModelInferResponse(model_name=engine.name, model_version=oip.VERSION, id=request.id)
        tensors.set_parameters(response.parameters, oip.answer_parameters(result))
        for output in oip.output_arrays(engine, result, wanted):
            response.outputs.add(name=output.name, datatype=output.datatype, shape=output.array.shape)
            response.raw_output_contents.append(tensors.raw_bytes(output.datatype, output.array))
        return response

    # ------------------------------------------------------------------ around every call
    async def _serve(self, method: str, context: grpc.aio.ServicerContext, handle: Handler, request: Any,
                     measured: bool = False) -> Any:
        """``handle(request, call)`` with HTTP's edges around it: request id, key, errors as
        status codes; ``measured``: an inference call, counted in the request metrics."""
        metadata = as_headers(context.invocation_metadata())
        call = RequestContext(request_id=RequestIdMiddleware.choose(metadata))
        if measured:
            call.route = INFER_ROUTE
        trailing: list[tuple[str, str]] = [(REQUEST_ID_HEADER.decode(), call.request_id or "")]
        token = request_id_var.set(call.request_id)
        code = grpc.StatusCode.OK
        try:
            if method not in self.open_methods and self.keys is not None and not self.keys.authorized(metadata):
                code = grpc.StatusCode.UNAUTHENTICATED
                await context.abort(code, UNAUTHENTICATED_DETAIL, tuple(trailing))
            try:
                response = await handle(request, call)
            except ServingError as exc:
                code = status_of(exc)
                if isinstance(exc, RETRYABLE):
                    trailing.append((RETRY_AFTER, str(self.settings.retry_after_s)))
                await context.abort(code, exc.detail, tuple(trailing))
            except Exception as exc:  # a bug: logged with the request id, and the call says where to look
                log.error("unexpected error in %s (request id %s)", method, call.request_id, exc_info=exc)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, f"{type(exc).__name__}: the server failed; see its log", tuple(trailing))
            context.set_trailing_metadata(tuple(trailing))
            return response
        except BaseException:
            if code == grpc.StatusCode.OK:  # not one of ours: the client cancelled, or the server is stopping
                code = grpc.StatusCode.CANCELLED
            raise
        finally:
            request_id_var.reset(token)
            if measured:
                self._observe(call, code, getattr(request, "model_name", ""))

    def _observe(self, call: RequestContext, code: grpc.StatusCode, named: str) -> None:
        """The request metrics, as HTTP's middleware keeps them (status: v2 over HTTP's for the
        same outcome), labelled with the model the request resolved to."""
        total = time.perf_counter() - call.arrived
        catalog = self.service.catalog
        model = call.model or (named if named in catalog else "unknown")  # never a label per junk value
        status = str(http_status(code))
        self.metrics.request_latency.labels(INFER_ROUTE, model).observe(total)
        self.metrics.requests.labels(INFER_ROUTE, status).inc()
        if status == "503":
            self.metrics.refusal_latency.labels(INFER_ROUTE).observe(total)


def _model_name(name: str) -> str:
    """The protocol requires a model name (over HTTP it is in the path); empty must not mean
    the default model."""
    if not name:
        raise InvalidInput("name the model: model_name (or name) is empty")
    return name
