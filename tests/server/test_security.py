"""server.http.security: request ids, API-key auth and log setup, on a tiny FastAPI app
(no model)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitserve.server.http import security
from exitserve.server.http.security import (
    UVICORN_LOGGERS,
    ApiKeyAuth,
    RequestIdLogFilter,
    RequestIdMiddleware,
    configure_logging,
    request_id,
    request_id_var,
)

HEX32 = re.compile(r"[0-9a-f]{32}")
KEYS = ("key-one", "s3cret-two", "third")
OPEN_PATHS = ("/healthz", "/metrics")
UNAUTHORIZED = {"error": "unauthorized", "detail": ApiKeyAuth.UNAUTHORIZED_DETAIL}
log = logging.getLogger("exitserve.test_security")


def make_app(calls: list[str] | None = None) -> FastAPI:
    """A few routes standing in for the server's: open probes and a protected classify."""
    calls = [] if calls is None else calls
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        calls.append("healthz")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> dict[str, str]:
        calls.append("metrics")
        return {"metrics": "here"}

    @app.post("/classify")
    async def classify(request: Request) -> dict[str, int]:
        calls.append("classify")
        return {"bytes": len(await request.body())}

    @app.get("/ids")
    async def ids(request: Request) -> dict[str, Any]:
        return {"var": request_id_var.get(), "scope": request_id(request.scope)}

    @app.get("/ids-sync")
    def ids_sync(request: Request) -> dict[str, Any]:  # runs in the threadpool
        return {"var": request_id_var.get(), "scope": request_id(request.scope)}

    @app.get("/log")
    async def log_something() -> dict[str, str]:
        log.info("handling %s", "log")
        return {}

    @app.get("/fail")
    async def log_failure() -> dict[str, str]:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
        return {}

    return app


class Probe:
    """Outermost layer: what the contextvar holds after the inner layers returned, and
    whether anything read the request body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.var_after: list[str | None] = []
        self.receive_calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting_receive() -> Message:
            self.receive_calls += 1
            return await receive()

        await self.app(scope, counting_receive, send)
        if scope["type"] == "http":
            self.var_after.append(request_id_var.get())


# -- request ids ---------------------------------------------------------------------


@pytest.fixture
def id_client() -> Iterator[tuple[TestClient, Probe]]:
    probe = Probe(RequestIdMiddleware(make_app()))
    with TestClient(probe) as client:
        yield client, probe


def test_generated_ids_are_unique_and_returned(id_client: tuple[TestClient, Probe]) -> None:
    client, _ = id_client
    seen = []
    for _ in range(5):
        r = client.get("/ids")
        rid = r.headers["x-request-id"]
        assert HEX32.fullmatch(rid)
        assert r.json() == {"var": rid, "scope": rid}
        seen.append(rid)
    assert len(set(seen)) == 5


@pytest.mark.parametrize("client_id", ["abc", "req-1_2.3:4", "A" * 128, "0"])
def test_valid_client_id_is_echoed(id_client: tuple[TestClient, Probe], client_id: str) -> None:
    client, _ = id_client
    r = client.get("/ids", headers={"X-Request-ID": client_id})
    assert r.headers["x-request-id"] == client_id
    assert r.json() == {"var": client_id, "scope": client_id}


@pytest.mark.parametrize("client_id", ["A" * 129, "has space", "semi;colon", "slash/", "quote\"", "", "caf\u00e9"])
def test_invalid_client_id_is_replaced(id_client: tuple[TestClient, Probe], client_id: str) -> None:
    client, _ = id_client
    r = client.get("/ids", headers={"X-Request-ID": client_id.encode("utf-8")})
    rid = r.headers["x-request-id"]
    assert HEX32.fullmatch(rid) and rid != client_id
    assert r.json() == {"var": rid, "scope": rid}


async def _call_raw(app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    """Calls an ASGI app directly: for header values no HTTP client would send."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/ids", "raw_path": b"/ids", "root_path": "", "query_string": b"", "headers": headers,
             "client": ("test", 1), "server": ("test", 80)}
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("raw", [b"evil\r\nset-cookie: x=1", b"line\nbreak", b"tab\there", b"\xff\xfe"])
def test_id_with_control_or_binary_bytes_is_replaced(raw: bytes) -> None:
    import anyio

    sent = anyio.run(_call_raw, RequestIdMiddleware(make_app()), [(b"x-request-id", raw)])
    start = sent[0]
    assert start["status"] == 200
    ids = [v for k, v in start["headers"] if k == b"x-request-id"]
    assert len(ids) == 1 and HEX32.fullmatch(ids[0].decode())
    assert json.loads(sent[1]["body"])["var"] == ids[0].decode()


def test_inner_x_request_id_header_is_replaced_not_duplicated() -> None:
    import anyio

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [(b"x-request-id", b"inner")]})
        await send({"type": "http.response.body", "body": b""})

    sent = anyio.run(_call_raw, RequestIdMiddleware(inner), [(b"x-request-id", b"outer")])
    assert [v for k, v in sent[0]["headers"] if k == b"x-request-id"] == [b"outer"]


def test_contextvar_visible_in_sync_handler(id_client: tuple[TestClient, Probe]) -> None:
    client, _ = id_client
    r = client.get("/ids-sync", headers={"X-Request-ID": "sync-1"})
    assert r.json() == {"var": "sync-1", "scope": "sync-1"}


def test_contextvar_reset_after_request(id_client: tuple[TestClient, Probe]) -> None:
    client, probe = id_client
    client.get("/ids", headers={"X-Request-ID": "first"})
    client.get("/healthz")
    assert probe.var_after == [None, None]
    assert request_id_var.get() is None


def test_sets_the_shared_request_context_variable() -> None:
    """The batcher reads server.request_context: the middleware must set that variable."""
    from exitserve.server import request_context

    assert request_id_var is request_context.request_id_var


def test_request_id_helper_without_middleware() -> None:
    assert request_id({"type": "http"}) is None


def test_log_filter_sets_request_id_and_keeps_record() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    assert RequestIdLogFilter().filter(record) is True
    assert record.request_id == "-"
    token = request_id_var.set("abc")
    try:
        assert RequestIdLogFilter().filter(record) is True
        assert record.request_id == "abc"
    finally:
        request_id_var.reset(token)


# -- API keys ------------------------------------------------------------------------


def auth_client(keys: tuple[str, ...], calls: list[str]) -> tuple[TestClient, Probe]:
    probe = Probe(RequestIdMiddleware(ApiKeyAuth(make_app(calls), keys=keys, open_paths=OPEN_PATHS)))
    return TestClient(probe), probe


def assert_unauthorized(r: Any, *, closes: bool) -> None:
    assert r.status_code == 401
    body = r.json()
    assert body == {**UNAUTHORIZED, "request_id": body["request_id"]}
    assert body["request_id"] in (None, r.headers.get("x-request-id"))  # quoted when the middleware runs
    assert r.headers["content-type"] == "application/json"
    assert r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <key>" in r.json()["detail"] and "X-API-Key" in r.json()["detail"]
    assert HEX32.fullmatch(r.headers["x-request-id"])  # refusals are traceable too
    if closes:
        assert r.headers["connection"] == "close"
    else:
        assert "connection" not in r.headers


def test_no_keys_means_open() -> None:
    calls: list[str] = []
    client, _ = auth_client((), calls)
    assert client.post("/classify", content=b"abc").json() == {"bytes": 3}
    assert client.get("/healthz").status_code == 200
    assert calls == ["classify", "healthz"]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic key-one"},
    {"Authorization": "key-one"},
    {"X-API-Key": "wrong"},
    {"X-API-Key": "key-one-and-more"},
    {"X-API-Key": "key-on"},
    {"X-Api-Key": ""},
])
def test_missing_or_wrong_key_is_refused(headers: dict[str, str]) -> None:
    calls: list[str] = []
    client, _ = auth_client(KEYS, calls)
    assert_unauthorized(client.get("/classify", headers=headers), closes=False)
    assert calls == []


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("style", ["bearer", "bearer-lowercase", "x-api-key"])
def test_right_key_passes(key: str, style: str) -> None:
    calls: list[str] = []
    client, _ = auth_client(KEYS, calls)
    headers = {"bearer": {"Authorization": f"Bearer {key}"}, "bearer-lowercase": {"authorization": f"bearer {key}"},
               "x-api-key": {"X-API-Key": key}}[style]
    r = client.post("/classify", content=b"12345", headers=headers)
    assert r.status_code == 200 and r.json() == {"bytes": 5}
    assert calls == ["classify"]


def test_right_key_in_either_header_passes_even_if_the_other_is_wrong() -> None:
    client, _ = auth_client(KEYS, [])
    r = client.get("/ids", headers={"Authorization": "Bearer wrong", "X-API-Key": "third"})
    assert r.status_code == 200


def test_open_paths_stay_open_with_keys() -> None:
    calls: list[str] = []
    client, _ = auth_client(KEYS, calls)
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 200
    assert calls == ["healthz", "metrics"]
    # exact match only: neither a prefix nor a sub-path of an open path is open
    assert client.get("/healthz/extra").status_code == 401
    assert client.get("/healthzz").status_code == 401


def test_open_paths_match_below_root_path() -> None:
    calls: list[str] = []
    app = ApiKeyAuth(make_app(calls), keys=KEYS, open_paths=OPEN_PATHS)
    client = TestClient(app, root_path="/api")
    assert client.get("/healthz").status_code == 200
    assert client.get("/classify").status_code == 401


@pytest.mark.parametrize("kind", ["content-length", "chunked"])
def test_post_with_body_is_refused_unread_and_closed(kind: str) -> None:
    calls: list[str] = []
    client, probe = auth_client(KEYS, calls)
    content: Any = b"x" * 10_000 if kind == "content-length" else iter([b"abc", b"def"])
    r = client.post("/classify", content=content, headers={"X-API-Key": "wrong"})
    assert_unauthorized(r, closes=True)
    assert calls == []
    assert probe.receive_calls == 0  # not a byte of the body was read


def test_every_key_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: a match on the first key costs as many comparisons as no match."""
    compared = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    client, _ = auth_client(KEYS, [])
    for key in (KEYS[0], KEYS[-1], "nope"):
        compared.clear()
        client.get("/ids", headers={"X-API-Key": key})
        assert len(compared) == len(KEYS)


def test_lifespan_passes_through() -> None:
    started = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        started.append(True)
        yield

    inner = make_app()
    inner.router.lifespan_context = lifespan
    app = RequestIdMiddleware(ApiKeyAuth(inner, keys=KEYS, open_paths=OPEN_PATHS))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
    assert started == [True]


def test_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    client, _ = auth_client(KEYS, [])
    with caplog.at_level(logging.DEBUG):
        client.get("/classify", headers={"X-API-Key": "wrong-secret-value"})
        client.get("/ids", headers={"Authorization": "Bearer s3cret-two"})
    assert "wrong-secret-value" not in caplog.text and "s3cret-two" not in caplog.text


# -- logging -------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the other tests."""
    names = ["", *UVICORN_LOGGERS]
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.filters[:], logger.level, logger.propagate, logger.disabled)
    yield
    for name, (handlers, filters, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.filters[:] = filters
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_the_request_id_of_their_request() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    client = TestClient(RequestIdMiddleware(make_app()))
    ids = [client.get("/log").headers["x-request-id"], client.get("/log", headers={"X-Request-ID": "mine"}).headers[
        "x-request-id"]]
    log.info("outside")
    records = [r for r in json_lines(stream) if r["logger"] == log.name]
    assert [r["message"] for r in records] == ["handling log", "handling log", "outside"]
    assert [r["request_id"] for r in records] == [ids[0], "mine", "-"]
    for r in records:
        assert r["level"] == "INFO"
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", r["time"])
        assert "exception" not in r


@pytest.mark.usefixtures("restore_logging")
def test_json_line_carries_exception_text() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    r = TestClient(RequestIdMiddleware(make_app())).get("/fail", headers={"X-Request-ID": "f-1"})
    assert r.status_code == 200
    (record,) = [x for x in json_lines(stream) if x["logger"] == log.name]
    assert record["level"] == "ERROR" and record["message"] == "it failed" and record["request_id"] == "f-1"
    assert "Traceback" in record["exception"] and "ValueError: boom" in record["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_text_format_and_level() -> None:
    stream = io.StringIO()
    configure_logging("WARNING", "text", stream=stream)
    client = TestClient(RequestIdMiddleware(make_app()))
    client.get("/log")  # INFO: below the level
    token = request_id_var.set("t-1")
    try:
        log.warning("careful")
    finally:
        request_id_var.reset(token)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING exitserve\.test_security \[t-1\]: careful",
                        lines[0])


@pytest.mark.usefixtures("restore_logging")
def test_configure_replaces_root_handlers_and_routes_uvicorn_through_root() -> None:
    root = logging.getLogger()
    root.addHandler(logging.NullHandler())
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.StreamHandler(io.StringIO()))
    access.propagate = False
    stream = io.StringIO()
    handler = configure_logging("info", "json", stream=stream)
    assert root.handlers == [handler]
    assert isinstance(handler, logging.StreamHandler) and handler.stream is stream
    assert any(isinstance(f, RequestIdLogFilter) for f in handler.filters)
    for name in UVICORN_LOGGERS:
        assert logging.getLogger(name).handlers == [] and logging.getLogger(name).propagate
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", 200)
    (record,) = json_lines(stream)
    assert record["logger"] == "uvicorn.access" and record["request_id"] == "-"
    assert record["message"] == '127.0.0.1:1 - "GET /healthz HTTP/1.1" 200'


@pytest.mark.usefixtures("restore_logging")
def test_default_stream_is_stderr() -> None:
    import sys

    assert configure_logging().stream is sys.stderr


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt, level", [("xml", "info"), ("JSON ", "info"), ("text", "loud")])
def test_unknown_format_or_level_is_refused_without_change(fmt: str, level: str) -> None:
    before = logging.getLogger().handlers[:]
    with pytest.raises(ValueError):
        configure_logging(level, fmt)
    assert logging.getLogger().handlers == before
