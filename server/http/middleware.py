"""Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware): the body size
limit, and the request metrics of the classify routes."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import error_body
from server.metrics import Metrics
from server.service import InferenceService

MEASURED_ROUTES = {"/classify", "/classify/batch"}
RESOLVED_MODEL = "exitserve.model"  # scope key: the model a route resolved the request to


def record_model(scope: Scope, name: str) -> None:
    """Routes call this once they know which model serves the request."""
    scope[RESOLVED_MODEL] = name


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuses request bodies over the limit with 413, whether the client announces the
    size (Content-Length) or streams it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        body = error_body("payload_too_large", f"request body is over the limit of {self.max_bytes} bytes")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = -1
                if announced > self.max_bytes:
                    await self._refuse(send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)


class RequestMetrics:
    """Latency and status counts of the classify routes, 413s from the size limit included.

    Latency is labelled with the model the request resolved to (a ``model`` form field
    included); a request refused before that (413, 415) is labelled with the model its
    query names, or the default model."""

    def __init__(self, app: ASGIApp, metrics: Metrics, service: InferenceService) -> None:
        self.app = app
        self.metrics = metrics
        self.service = service

    def _model(self, scope: Scope) -> str:
        if RESOLVED_MODEL in scope:
            return scope[RESOLVED_MODEL]
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        model = (query.get("model") or [self.service.default_model or "unknown"])[0]
        return model if model in self.service.engines else "unknown"  # never a label per junk value

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
            self.metrics.request_latency.labels(scope["path"], self._model(scope)).observe(time.perf_counter() - started)
            self.metrics.requests.labels(scope["path"], str(status)).inc()
