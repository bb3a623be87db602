"""``create_app(settings)``: the FastAPI application. Nothing happens at import time, and
nothing here changes the process (``server.process`` does, where a process starts serving)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware

import exitserve
from exitserve.server.http.errors import install_error_handlers
from exitserve.server.http.direct import DirectRoutes
from exitserve.server.http.middleware import AdmissionGate, BodyLimits, IdentityHeader, RequestMetrics
from exitserve.server.http.routes import classify, health, models, v2
from exitserve.server.http.schemas import ErrorResponse
from exitserve.server.http.security import ApiKeyAuth, RequestIdMiddleware
from exitserve.server.metrics import Metrics
from exitserve.server.service import InferenceService, StartupError
from exitserve.server.settings import Settings
from exitserve.server.workers import WorkerGroup

log = logging.getLogger("exitserve")
# under Ray Serve (server/deployments/ray_serve.py): every replica's metrics listener, for Prometheus
METRICS_TARGETS_PATH = "/ray/metrics-targets"
WhileReady = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(settings: Settings | None = None, workers: WorkerGroup | None = None, *,
               identity: dict[str, str] | None = None, request_id_header: bool = True,
               routers: Sequence[APIRouter] = (), ready_before_startup: bool = False,
               while_ready: WhileReady | None = None) -> FastAPI:
    """The app for ``settings``.

    ``workers``: this process's place among several on one port; ``identity``: more headers
    that say who answered (a Ray Serve replica and node); ``request_id_header=False`` when a
    proxy in front adds ``X-Request-ID`` itself; ``routers``: more routes;
    ``ready_before_startup``: the ASGI startup waits for the warm-up and fails unless every
    model is ready (a platform that routes to an app once its startup is done);
    ``while_ready(app)``: a context entered once every model is warm and serving, left at
    shutdown (a metrics listener, a registration, freezing the heap)."""
    settings = settings or Settings()
    metrics = Metrics(workers.metrics_dir if workers else None)
    service = InferenceService(settings, metrics, workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            loaded = await service.load()  # a repository that cannot be served fails the start
        except StartupError as exc:
            log.error("%s", exc.detail)
            raise
        async with AsyncExitStack() as serving:
            if settings.grpc_port is not None:  # imported only then: grpc is the optional 'grpc' extra
                from exitserve.server.grpc.server import grpc_listener

                # left before service.stop(): calls in flight finish while the batchers still run
                await serving.enter_async_context(grpc_listener(service, settings, metrics,
                                                                shared_port=workers is not None))

            async def serve_when_warm() -> None:
                await service.warm_up_and_serve(loaded)
                if service.state.ready and while_ready is not None:
                    await serving.enter_async_context(while_ready(app))

            warming = asyncio.create_task(serve_when_warm())  # /healthz answers meanwhile
            if ready_before_startup:
                await warming
                ready, body = service.readiness()
                if not ready:
                    raise RuntimeError(f"exitserve is not ready after its warm-up: {body}")
            try:
                yield
            finally:
                warming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warming
                await serving.aclose()
                await service.stop()

    app = FastAPI(
        title="exitserve",
        summary="Adaptive early-exit image classification on ONNX Runtime",
        version=exitserve.__version__,
        lifespan=lifespan,
        # every refusal (401 with keys, 503 while loading, ...) has the same JSON body
        responses={"default": {"model": ErrorResponse, "description": "an error: `error` code, `detail`, "
                                                                       "`request_id`"}},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    install_error_handlers(app, settings.retry_after_s)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(v2.router)  # the Open Inference Protocol
    for router in routers:
        app.include_router(router)

    # added innermost first: the request id sees everything, metrics see the 401s, 413s and early refusals
    app.add_middleware(DirectRoutes, routes={("POST", "/classify"): classify.classify})  # past the router
    app.add_middleware(AdmissionGate, plane=service.plane, state=service.state, retry_after_s=settings.retry_after_s)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       state=service.state)
    if settings.api_keys:  # without keys it would only add a layer to every request
        app.add_middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=open_paths(settings))
    if settings.cors_origins:  # outside the key check: browsers send preflights without credentials
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])
    app.add_middleware(RequestMetrics, metrics=metrics, catalog=service.catalog,
                       phase_metrics=settings.phase_metrics)
    app.add_middleware(RequestIdMiddleware, send_header=request_id_header)
    who = {"x-exitserve-worker": str(workers.index)} if workers else {}
    if who or identity:
        app.add_middleware(IdentityHeader, headers={**who, **(identity or {})})
    return app


def open_paths(settings: Settings) -> set[str]:
    """Paths that need no API key (when keys are set): health and metrics unless protected,
    and the API's own documentation."""
    paths = {"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
    if not settings.protect_health:
        paths |= {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
    if not settings.protect_metrics:
        paths |= {"/metrics", METRICS_TARGETS_PATH}
    return paths
