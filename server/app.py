"""``create_app(settings)``: the FastAPI application. Nothing happens at import time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import install_error_handlers
from server.limits import BodySizeLimit
from server.metrics import Metrics
from server.routes import classify, health, models
from server.service import InferenceService
from server.settings import Settings

MEASURED_ROUTES = {"/classify", "/classify/batch"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service: InferenceService = app.state.service
        loading = asyncio.create_task(service.start())  # /healthz answers while models load
        app.state.loading = loading
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await service.stop()

    app = FastAPI(
        title="exitserve",
        summary="Adaptive early-exit image classification on ONNX Runtime",
        version="0.1.0",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = InferenceService(settings, metrics)
    install_error_handlers(app)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, service=app.state.service)  # outermost: sees the 413s
    return app


class RequestMetrics:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): latency and status counts
    of the classify routes, 413s from the size limit included."""

    def __init__(self, app: ASGIApp, metrics: Metrics, service: InferenceService) -> None:
        self.app = app
        self.metrics = metrics
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in MEASURED_ROUTES:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
            model = (query.get("model") or [self.service.default_model or "unknown"])[0]
            if model not in self.service.engines:
                model = "unknown"  # never a label per junk value
            self.metrics.request_latency.labels(scope["path"], model).observe(time.perf_counter() - started)
            self.metrics.requests.labels(scope["path"], str(status)).inc()
