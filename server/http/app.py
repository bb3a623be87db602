"""``create_app(settings)``: the FastAPI application. Nothing happens at import time."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import exitserve
from server.http.errors import install_error_handlers
from server.http.schemas import ErrorResponse
from server.http.middleware import BodyLimits, IdentityHeader, RequestMetrics
from server.http.security import ApiKeyAuth, RequestIdMiddleware
from server.http.routes import classify, health, models, v2
from server.metrics import Metrics
from server.service import InferenceService, StartupError
from server.settings import Settings
from server.workers import WorkerGroup

log = logging.getLogger("exitserve")
# under Ray Serve (server/http/ray_serve.py): every replica's metrics listener, for Prometheus
METRICS_TARGETS_PATH = "/ray/metrics-targets"


def create_app(settings: Settings | None = None, workers: WorkerGroup | None = None, *,
               identity: dict[str, str] | None = None, request_id_header: bool = True) -> FastAPI:
    """The app for ``settings``; ``workers``: this process's place among several on one port;
    ``identity``: more headers that say who answered (a Ray Serve replica and node);
    ``request_id_header=False`` when a proxy in front adds ``X-Request-ID`` itself."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service: InferenceService = app.state.service
        # the inference thread needs the GIL back after every stage; by default the event loop
        # may keep it 5 ms, a stall per stage under load (BENCHMARKS.md, "GIL switch interval")
        sys.setswitchinterval(settings.switch_interval_us / 1e6)
        try:
            engines = await service.load()  # a repository that cannot be served fails the start
        except StartupError as exc:
            log.error("%s", exc.detail)
            raise
        warming = asyncio.create_task(service.warm_up_and_serve(engines))  # /healthz answers meanwhile
        app.state.loading = warming
        try:
            yield
        finally:
            if not warming.done():
                warming.cancel()
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
    metrics = Metrics(workers.metrics_dir if workers else None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = InferenceService(settings, metrics, workers)
    install_error_handlers(app, settings.retry_after_s)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(v2.router)  # the Open Inference Protocol

    # added innermost first: the request id sees everything, metrics see the 401s and 413s
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       service=app.state.service)
    if settings.api_keys:  # without keys it would only add a layer to every request
        app.add_middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=open_paths(settings))
    if settings.cors_origins:  # outside the key check: browsers send preflights without credentials
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])
    app.add_middleware(RequestMetrics, metrics=metrics, service=app.state.service,
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
