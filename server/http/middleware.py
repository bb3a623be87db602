"""Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware): the body limits,
admission before the body is read, and the request metrics of the inference routes."""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitserve.server.catalog import ModelCatalog
from exitserve.server.dataplane import DataPlane
from exitserve.server.errors import ServingError
from exitserve.server.http import phases
from exitserve.server.http.context import context_of
from exitserve.server.http.errors import error_response, protocol_error_of, request_has_body, retry_headers, send_error, status_of
from exitserve.server.metrics import Metrics
from exitserve.server.state import ServerState

MEASURED_ROUTES = {"/classify", "/classify/batch"}
V2_INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer$")
V2_INFER_ROUTE = "/v2/models/{name}/infer"  # one label, whatever the model and version: labels stay few


def inference_route(path: str) -> tuple[str, str | None] | None:
    """(route label, model named by the path) of an inference request, else None."""
    if path in MEASURED_ROUTES:
        return path, None
    if match := V2_INFER.match(path):
        return V2_INFER_ROUTE, match["model"]
    return None


def query_model(scope: Scope) -> str | None:
    """The model a request's query names (the classify routes), None when it names none."""
    query = parse_qs(scope.get("query_string", b"").decode(errors="replace"), keep_blank_values=True)
    return (query.get("model") or [None])[0]


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

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, state: ServerState) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.state = state

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
                if not body_done or self.state.draining:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused as refused:
            if not started:
                await self._refuse(send, refused.status, refused.code, refused.detail)


class AdmissionGate:
    """Inference requests pass the model's admission before their body is read:

    * refused at once (503) when the model's queue is full, or 413 when the request can
      never fit it (the data plane decides);
    * with a latency objective, through the model's admission line (``server.admission``):
      a place inside, or a wait, or a 503 once the wait is over.

    A refusal of a small body reads the body first (it is already in the server's buffer),
    so the connection stays open: a closed one costs the client a reconnect and the server
    an accept, which under a retrying client is more than the refusal itself. It also counts
    the inference requests inside the app and sends refusals in the route's own format."""

    KEEP_ALIVE_BODY = 64 * 1024  # refusals read bodies up to this size to keep the connection

    def __init__(self, app: ASGIApp, plane: DataPlane, state: ServerState, retry_after_s: int) -> None:
        self.app = app
        self.plane = plane
        self.state = state
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = inference_route(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        label, named = route
        with self.state.request():
            try:
                line = self.plane.admit_early(named if named is not None else query_model(scope), 1)
                entered = await line.enter() if line is not None else 0.0
            except ServingError as exc:
                await self._refuse(exc, label, scope, receive, send)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                if line is not None:
                    line.leave(entered)

    async def _refuse(self, exc: ServingError, label: str, scope: Scope, receive: Receive, send: Send) -> None:
        if _announced_length(scope) <= self.KEEP_ALIVE_BODY:
            await _read_body(receive)
        if label == V2_INFER_ROUTE:
            response = protocol_error_of(exc, self.retry_after_s)
        else:
            response = error_response(status_of(exc), exc.code, exc.detail, retry_headers(exc, self.retry_after_s))
        await response(scope, receive, send)


def _announced_length(scope: Scope) -> int:
    """The request's Content-Length; a very large number when it announces none (chunked)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                break
    return 1 << 62


async def _read_body(receive: Receive) -> None:
    """Read (and drop) the rest of a request's body; a slow or broken one ends it early
    (the body guards outside say how)."""
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
    except _BodyRefused:
        return


class RequestMetrics:
    """Latency and status counts of the inference routes, 413s from the size limit included.

    Latency is labelled with the model the request resolved to (a ``model`` form field
    included); a request refused before that (413, 415) is labelled with the model its
    query names, or the default model. With ``phase_metrics`` it also times each request's
    phases (``server.http.phases``), sending the response included."""

    def __init__(self, app: ASGIApp, metrics: Metrics, catalog: ModelCatalog, phase_metrics: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.catalog = catalog
        self.phase_metrics = phase_metrics

    def _model(self, resolved: str | None, scope: Scope, named: str | None) -> str:
        if resolved is not None:
            return resolved
        if named is None:  # the classify routes name it in the query, the v2 routes in the path
            named = query_model(scope) or self.catalog.default or "unknown"
        return named if named in self.catalog else "unknown"  # never a label per junk value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        measured = inference_route(scope["path"]) if scope["type"] == "http" else None
        if measured is None:
            await self.app(scope, receive, send)
            return
        route, named = measured
        context = context_of(scope)
        context.route = route
        started = context.arrived
        status = 500
        timed = context.phases = {} if self.phase_metrics else None

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

        try:
            await self.app(scope, receive, capture)
        finally:
            total = time.perf_counter() - started
            self.metrics.request_latency.labels(route, self._model(context.model, scope, named)).observe(total)
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
