"""Where an HTTP request keeps its ``RequestContext``: one key in the ASGI scope, set by the
outermost of our layers (``RequestIdMiddleware``) and read by the others and the routes."""

from __future__ import annotations

from starlette.types import Scope

from exitserve.server.request_context import RequestContext, current_request_id

SCOPE_KEY = "exitserve.context"


def context_of(scope: Scope) -> RequestContext:
    """The request's context, made here when no outer layer made one (a bare app in tests)."""
    context = scope.get(SCOPE_KEY)
    if context is None:
        context = scope[SCOPE_KEY] = RequestContext(request_id=current_request_id())
    return context
