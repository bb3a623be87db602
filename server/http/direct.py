"""The hottest route straight to its endpoint, past the framework's routing.

``POST /classify`` takes only the ``Request``: no path parameters, no dependencies, no body
model. FastAPI still declares it (the OpenAPI schema, ``/docs``), but a request for it is
answered here, the innermost middleware, without the router's matching, the request-response
wrapper, the dependency solver and its exit stack, and Starlette's exception middleware:
at C=32 those took about a quarter of the event loop's busy samples (py-spy, BENCHMARKS.md).
The endpoint's errors go through the app's own exception handlers, looked up as Starlette
looks them up, so the answers are the same; an exception no handler takes goes on to the
outermost error middleware, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]


class DirectRoutes:
    def __init__(self, app: ASGIApp, routes: Mapping[tuple[str, str], Endpoint]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = _handler_for(scope, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler_for(scope: Scope, exc: Exception) -> Callable | None:
    """The app's handler for ``exc``'s class or its nearest base, as Starlette's exception
    middleware finds it; the catch-all ``Exception`` handler is the outer error
    middleware's, so it is left to that."""
    handlers = scope["app"].exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
