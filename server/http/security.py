"""Request ids, API-key authentication and log setup: pure ASGI middleware (no
BaseHTTPMiddleware, so no extra task per request and contextvars set here are seen by the
route handler), plus the logging configuration that prints each line's request id."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import re
import secrets
import sys
from collections.abc import Collection
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitserve.server.http.context import SCOPE_KEY, context_of
from exitserve.server.http.errors import request_has_body, send_error
from exitserve.server.request_context import RequestContext, request_id_var  # the batcher and logs read it

__all__ = ["ApiKeyAuth", "RequestIdLogFilter", "RequestIdMiddleware", "configure_logging", "request_id",
           "request_id_var"]

REQUEST_ID_HEADER = b"x-request-id"
# What a client may choose as its request id: short and free of anything that could
# split or forge a log line or a response header (no spaces, no CR/LF, no quotes).
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
LOG_FORMATS = ("text", "json")


class _RequestIds:
    """Fresh request ids: 32 hex digits, like a uuid4's, made of a random per-process prefix
    and a counter. Unique within the process and, with 64 random bits, across processes;
    a third of the cost of ``uuid.uuid4().hex`` on every request."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)  # forked workers must not share the sequence

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count(int.from_bytes(secrets.token_bytes(4)))

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = _RequestIds()


def request_id(scope: Scope) -> str | None:
    """The id RequestIdMiddleware gave this request, or None when it did not run."""
    return context_of(scope).request_id if SCOPE_KEY in scope else None


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (ASGI header names are lower case)."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


class RequestIdMiddleware:
    """Gives every HTTP request its ``RequestContext`` and an id: the client's ``X-Request-ID``
    when it is safe to echo and log, otherwise a fresh one (``new_request_id``). The id goes
    into the context (in the scope), into
    ``request_id_var`` for the duration of the request (so log lines carry it) and into
    the response's ``x-request-id`` header."""

    def __init__(self, app: ASGIApp, send_header: bool = True) -> None:
        """``send_header=False`` behind a proxy that sets the response header itself (Ray
        Serve's passes the id it chose in the request and adds it to the response)."""
        self.app = app
        self.send_header = send_header

    @staticmethod
    def choose(scope: Scope) -> str:
        """The client's id when it is a valid one, else a new one (the gRPC layer passes its
        metadata in a scope's shape)."""
        raw = _header(scope, REQUEST_ID_HEADER)
        if raw is not None:
            try:
                candidate = raw.decode("ascii")
            except UnicodeDecodeError:
                candidate = ""
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
        return new_request_id()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = self.choose(scope)
        scope[SCOPE_KEY] = RequestContext(request_id=rid)
        header = (REQUEST_ID_HEADER, rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # replace, not add: an inner layer may have set its own
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                headers.append(header)
                message = {**message, "headers": headers}
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id if self.send_header else send)
        finally:
            request_id_var.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` ("-" outside a request) so formats can print it. Attach
    it to handlers, not loggers: a logger's filters do not see records that propagate up
    from its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


def _digest(value: bytes) -> bytes:
    # Comparing fixed-size digests keeps compare_digest's time independent of the
    # lengths of both the presented and the configured keys.
    return hashlib.sha256(value).digest()


class ApiKeyAuth:
    """Requires an API key (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``) on
    every HTTP path outside ``open_paths``; with no keys configured it does nothing.

    A refused request gets 401 before any of its body is read; if it announced a body the
    response says ``connection: close`` so the server drops it instead of reading it.
    Paths are matched exactly, against the full path and against the path below the
    scope's root_path. Non-HTTP scopes (lifespan, websocket) pass through unchecked.
    Keys are never logged."""

    UNAUTHORIZED_DETAIL = "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"

    def __init__(self, app: ASGIApp, keys: Collection[str], open_paths: Collection[str]) -> None:
        self.app = app
        self._key_digests = [_digest(k.encode("utf-8")) for k in keys]
        self.open_paths = frozenset(open_paths)

    @property
    def enabled(self) -> bool:
        return bool(self._key_digests)

    def _is_open(self, scope: Scope) -> bool:
        path: str = scope.get("path", "")
        if path in self.open_paths:
            return True
        root = scope.get("root_path", "")
        return bool(root) and path.startswith(root) and (path[len(root):] or "/") in self.open_paths

    @staticmethod
    def _presented(scope: Scope) -> list[bytes]:
        """Every credential the request carries, from either header."""
        found: list[bytes] = []
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer" and token.strip():
                    found.append(token.strip())
            elif name == b"x-api-key" and value.strip():
                found.append(value.strip())
        return found

    def authorized(self, scope: Scope) -> bool:
        """Whether the request presents a configured key (the gRPC layer passes its metadata
        in a scope's shape)."""
        ok = False
        # no early exit: every presented value is compared with every key
        for candidate in self._presented(scope):
            presented = _digest(candidate)
            for key in self._key_digests:
                ok |= hmac.compare_digest(presented, key)
        return ok

    async def _refuse(self, scope: Scope, send: Send) -> None:
        headers = [(b"www-authenticate", b"Bearer")]
        if request_has_body(scope):
            headers.append((b"connection", b"close"))
        await send_error(send, 401, "unauthorized", self.UNAUTHORIZED_DETAIL, headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled or self._is_open(scope) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, send)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    mapping = logging.getLevelNamesMapping()
    try:
        return mapping[level.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: use one of debug, info, warning, error, critical") from None


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    if fmt == "json":
        # time: ISO 8601 in UTC; exc_info (the traceback text) appears only when there is one
        return JsonFormatter("%(levelname)s %(name)s %(message)s %(request_id)s", timestamp="time",
                             rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"})
    raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(LOG_FORMATS)}")


def configure_logging(level: str | int = "info", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Sends all logging, uvicorn's included, through one stderr handler (``stream`` for
    tests) on the root logger, in ``fmt`` ("text" or "json"), each line with its request
    id. Returns the handler. For uvicorn's lines to keep this format, start uvicorn with
    ``log_config=None`` or it installs its own handlers again."""
    formatter = _formatter(fmt)  # validate both before touching any logger
    numeric_level = _level(level)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in UVICORN_LOGGERS:
        log = logging.getLogger(name)
        for old in log.handlers[:]:
            log.removeHandler(old)
        log.propagate = True
        log.setLevel(logging.NOTSET)  # the root's level decides
    return handler
