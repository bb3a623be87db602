"""The request id of the request being served, for logs and error bodies.

A context variable, so it follows the request through ``await`` and into the batcher's
``submit`` (which records it with the image) without the service knowing about HTTP. The
HTTP layer sets it (``server.http.security.RequestIdMiddleware``).
"""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("exitserve_request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()
