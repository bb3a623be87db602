"""``create_app(settings)``: the FastAPI application. Nothing happens at import time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import exitserve
from server.http.errors import install_error_handlers
from server.http.middleware import BodySizeLimit, RequestMetrics
from server.http.routes import classify, health, models
from server.metrics import Metrics
from server.service import InferenceService
from server.settings import Settings


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
        version=exitserve.__version__,
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = InferenceService(settings, metrics)
    install_error_handlers(app, settings.retry_after_s)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, service=app.state.service)  # outermost: sees the 413s
    return app

