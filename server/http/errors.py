"""The one place errors become HTTP: status, JSON body ``{"error": CODE, "detail": TEXT}``
and headers (Retry-After where a retry can help)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Scope, Send

from exitserve.server.errors import (
    BadImage,
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    InferenceFailed,
    InvalidInput,
    InvalidOptions,
    NotAnImage,
    NotReady,
    Overloaded,
    ServingError,
    TooManyImages,
    UnknownModel,
)
from exitserve.server.request_context import current_request_id

# most specific class first: the first match wins
STATUS: list[tuple[type[ServingError], int]] = [
    (NotReady, 503),
    (Overloaded, 503),
    (TooManyImages, 413),
    (UnknownModel, 404),
    (InvalidOptions, 422),
    (InvalidInput, 422),
    (NotAnImage, 415),
    (ImageTooLarge, 413),
    (EmptyImage, 422),
    (CorruptImage, 422),
    (BadImage, 422),
    (InferenceFailed, 500),
    (ServingError, 503),
]
# the Open Inference Protocol's statuses (the /v2 routes): a request the client got wrong is
# 400 whatever the reason, an unknown model 404, "try again later" 503
PROTOCOL_STATUS: list[tuple[type[ServingError], int]] = [
    (NotReady, 503),
    (Overloaded, 503),
    (TooManyImages, 400),
    (UnknownModel, 404),
    (InvalidOptions, 400),
    (InvalidInput, 400),
    (BadImage, 400),
    (InferenceFailed, 500),
    (ServingError, 503),
]
RETRYABLE = (NotReady, Overloaded)
log = logging.getLogger("exitserve.http")
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
CLIENT_CLOSED_REQUEST = 499  # nginx's convention: the client went away before the answer


class RequestProblem(Exception):
    """The HTTP request itself is unusable (media type, multipart, file count): raised by
    the routes before the service is involved."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def error_body(code: str, detail: str) -> bytes:
    """The JSON body of every error response (pure ASGI middleware sends it as bytes),
    with the request id to quote when asking what went wrong."""
    return json.dumps({"error": code, "detail": detail, "request_id": current_request_id()}).encode()


def request_has_body(scope: Scope) -> bool:
    """Whether the request announces a body (Content-Length above 0 or unparsable, or any
    Transfer-Encoding): a refusal that leaves it unread must close the connection."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value) > 0
            except ValueError:
                return True  # unparsable: assume a body rather than read it
        if name == b"transfer-encoding":
            return True
    return False


async def send_error(send: Send, status: int, code: str, detail: str,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error response from pure ASGI middleware (before or instead of the app)."""
    body = error_body(code, detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(code, detail), status_code=status, headers=headers, media_type="application/json")


def status_of(exc: ServingError) -> int:
    return next(status for kind, status in STATUS if isinstance(exc, kind))


def retry_headers(exc: ServingError, retry_after_s: int) -> dict[str, str] | None:
    return {"Retry-After": str(retry_after_s)} if isinstance(exc, RETRYABLE) else None


def protocol_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error as the Open Inference Protocol sends it: ``{"error": MESSAGE}``."""
    return Response(json.dumps({"error": message}), status_code=status, headers=headers,
                    media_type="application/json")


def protocol_error_of(exc: ServingError, retry_after_s: int) -> Response:
    status = next(status for kind, status in PROTOCOL_STATUS if isinstance(exc, kind))
    return protocol_error_response(status, exc.detail, retry_headers(exc, retry_after_s))


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(ServingError)
    async def _serving(_: Request, exc: ServingError) -> Response:
        return error_response(status_of(exc), exc.code, exc.detail, retry_headers(exc, retry_after_s))

    @app.exception_handler(RequestProblem)
    async def _request(_: Request, exc: RequestProblem) -> Response:
        return error_response(exc.status, exc.code, exc.detail)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        # nobody is left to read this; answering keeps it out of the 500s and the error log
        log.info("client disconnected before the request was read (request id %s)", current_request_id())
        return error_response(CLIENT_CLOSED_REQUEST, "client_closed_request", "the client disconnected")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("unexpected error (request id %s)", current_request_id(), exc_info=exc)
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server failed; see its log")
