"""Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware): the body limits,
and the request metrics of the classify and v2 inference routes."""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http import phases
from server.http.errors import request_has_body, send_error
from server.metrics import Metrics
from server.service import InferenceService

MEASURED_ROUTES = {"/classify", "/classify/batch"}
V2_INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer$")
V2_INFER_ROUTE = "/v2/models/{name}/infer"  # one label, whatever the model and version: labels stay few
RESOLVED_MODEL = "exitserve.model"  # scope key: the model a route resolved the request to
ARRIVED = "exitserve.arrived"  # scope key: perf_counter when the request reached the app


def arrival(scope: Scope) -> float | None:
    """When the request reached the app (RequestMetrics, the outermost timed layer): under
    load, the event loop may take a while to bring it from there to its route."""
    return scope.get(ARRIVED)


def measured_route(path: str) -> tuple[str, str | None] | None:
    """(route label, model named by the path) of a request whose metrics are kept, else None."""
    if path in MEASURED_ROUTES:
        return path, None
    if match := V2_INFER.match(path):
        return V2_INFER_ROUTE, match["model"]
    return None


def record_model(scope: Scope, name: str) -> None:
    """Routes call this once they know which model serves the request."""
    scope[RESOLVED_MODEL] = name


class _BodyRefused(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status, self.code, self.detail = status, code, detail


class BodyLimits:
    """Guards on the request body, before any route reads it:

    * over ``max_bytes`` (announced by Content-Length, or counted while streaming): 413;
    * not all received within ``timeout_s`` of the first read (a slow client): 408;
    * a response that starts before the body was read to the end (a 4xx refusal, a 405)
      says ``Connection: close``, so the server does not drain a large body it refused;
    * while draining, every response says ``Connection: close``: clients move to
      another replica instead of sending more requests on this connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, service: InferenceService) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.service = service

    @staticmethod
    async def _refuse(send: Send, status: int, code: str, detail: str) -> None:
        await send_error(send, status, code, detail, [(b"connection", b"close")])

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
                    await self._refuse(send, 413, "payload_too_large",
                                       f"request body is over the limit of {self.max_bytes} bytes")
                    return
        has_body = request_has_body(scope)
        received = 0
        body_done = not has_body
        deadline: float | None = None
        started = False
        loop = asyncio.get_running_loop()

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if body_done:
                return await receive()  # after the body: disconnect notices, no deadline
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):  # unlike wait_for, no task per message
                    message = await receive()
            except TimeoutError:
                raise _BodyRefused(408, "body_timeout", f"the request body did not arrive within "
                                                        f"{self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyRefused(413, "payload_too_large",
                                       f"request body is over the limit of {self.max_bytes} bytes")
                body_done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done or self.service.draining:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused as refused:
            if not started:
                await self._refuse(send, refused.status, refused.code, refused.detail)


class RequestMetrics:
    """Latency and status counts of the classify and v2 inference routes, 413s from the size
    limit included.

    Latency is labelled with the model the request resolved to (a ``model`` form field
    included); a request refused before that (413, 415) is labelled with the model its
    query names, or the default model. With ``phase_metrics`` it also times each request's
    phases (``server.http.phases``), sending the response included."""

    def __init__(self, app: ASGIApp, metrics: Metrics, service: InferenceService, phase_metrics: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.service = service
        self.phase_metrics = phase_metrics

    def _model(self, scope: Scope, named: str | None) -> str:
        if RESOLVED_MODEL in scope:
            return scope[RESOLVED_MODEL]
        if named is None:  # the classify routes name it in the query, the v2 routes in the path
            query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
            named = (query.get("model") or [self.service.default_model or "unknown"])[0]
        return named if named in self.service.engines else "unknown"  # never a label per junk value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        measured = measured_route(scope["path"]) if scope["type"] == "http" else None
        if measured is None:
            await self.app(scope, receive, send)
            return
        route, named = measured
        started = time.perf_counter()
        scope[ARRIVED] = started
        status = 500
        timed = phases.start(scope) if self.phase_metrics else None

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if timed is None:
                await send(message)
                return
            sending = time.perf_counter()
            await send(message)
            timed["send"] = timed.get("send", 0.0) + time.perf_counter() - sending

        self.service.requests_in_flight += 1
        try:
            await self.app(scope, receive, capture)
        finally:
            self.service.requests_in_flight -= 1
            total = time.perf_counter() - started
            self.metrics.request_latency.labels(route, self._model(scope, named)).observe(total)
            self.metrics.requests.labels(route, str(status)).inc()
            if status == 503:
                self.metrics.refusal_latency.labels(route).observe(total)
            if timed is not None and 200 <= status < 300 and route == "/classify":
                self._observe_phases(route, timed, total)

    def _observe_phases(self, route: str, timed: dict[str, float], total: float) -> None:
        inside = sum(timed.get(p, 0.0) for p in phases.PARTITION)
        self.metrics.observe_phases(route, {**timed, phases.FRAMEWORK: max(total - inside, 0.0), "app": total})


class IdentityHeader:
    """Headers that say who answered, on every response: the worker when several share the
    port (``X-Exitserve-Worker: N``), the replica and node under Ray Serve."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, tagged)
