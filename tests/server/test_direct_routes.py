"""POST /classify answered straight from the innermost middleware: the same answers and
errors as through the framework's router, and the router still owns everything else."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from exitserve.server.errors import InvalidOptions, UnknownModel
from exitserve.server.http.direct import DirectRoutes


class App:
    """Stands in for what Starlette hands the middleware: the app's handlers in the scope."""

    def __init__(self) -> None:
        self.exception_handlers = {
            InvalidOptions: lambda request, exc: _json(422, exc),
            Exception: lambda request, exc: _json(500, exc),  # the outer error middleware's
        }
        self.routed: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        self.routed.append(scope["path"])
        await Response("routed")(scope, receive, send)


async def _json(status: int, exc: Exception) -> Response:
    return JSONResponse({"error": type(exc).__name__}, status)


def call(middleware: DirectRoutes, app: App, method: str, path: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"", "app": app}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def endpoint(raises: Exception | None = None):
    async def handle(request: Request) -> Response:
        if raises is not None:
            raise raises
        return Response(f"direct {request.url.path}")
    return handle


def test_the_route_is_answered_directly_and_the_rest_is_routed() -> None:
    app = App()
    direct = DirectRoutes(app, {("POST", "/classify"): endpoint()})
    assert call(direct, app, "POST", "/classify") == (200, b"direct /classify")
    assert call(direct, app, "GET", "/classify") == (200, b"routed")  # 405 and the rest: the router's
    assert call(direct, app, "POST", "/classify/batch") == (200, b"routed")
    assert app.routed == ["/classify", "/classify/batch"]


def test_errors_go_through_the_apps_own_handlers() -> None:
    app = App()
    refused = DirectRoutes(app, {("POST", "/classify"): endpoint(InvalidOptions("bad budget"))})
    assert call(refused, app, "POST", "/classify") == (422, b'{"error":"InvalidOptions"}')


def test_an_error_no_handler_takes_goes_on_to_the_outer_error_middleware() -> None:
    app = App()
    for exc in (RuntimeError("bug"), UnknownModel("no such model")):  # UnknownModel: no handler in this app
        failing = DirectRoutes(app, {("POST", "/classify"): endpoint(exc)})
        with pytest.raises(type(exc)):
            call(failing, app, "POST", "/classify")
