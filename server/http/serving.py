"""Running the app under uvicorn with bounded time everywhere.

* **Headers**: a connection must send a request's headers within ``header_timeout_s``
  (uvicorn has no such limit: a client that sends half a request line holds its
  connection for ever). Late: 408 and the connection is closed.
* **Body**: ``BodyLimits`` cuts off a body that takes over ``body_timeout_s``.
* **Shutdown**: the first SIGTERM (or SIGINT) marks the service draining: ``/readyz``
  answers 503 and responses say ``Connection: close`` for ``drain_grace_s``, while the
  listener still accepts (Kubernetes ``preStop`` semantics: load balancers see the 503
  before connections are refused). Then uvicorn shuts down, giving in-flight requests
  ``shutdown_timeout_s`` before it cancels them and the process exits. A second signal
  skips the grace period.
* **Start-up**: the repository's files are checked before uvicorn starts; a mistake there
  (or a stage that will not load) is one line naming the file, and exit status 3.
* **Workers**: ``workers`` > 1 runs that many processes on one socket (``serve_workers``).
* **Malformed requests** that the HTTP parser itself refuses (a bad header, a duplicate
  Content-Length, Content-Length beside chunked encoding) get the same JSON error body
  and ``X-Request-ID`` as every other answer, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitserve.repository.format import RepositoryError
from exitserve.server.http.app import create_app
from exitserve.server.http.errors import error_body
from exitserve.server.http.security import REQUEST_ID_HEADER, configure_logging, new_request_id
from exitserve.server.process import configure_process, freeze_heap_when_ready
from exitserve.server.repository import check_repository, relative_to_repository
from exitserve.server.request_context import request_id_var
from exitserve.server.settings import Settings, default_intra_op_threads
from exitserve.server.state import ServerState
from exitserve.server.workers import WorkerGroup

log = logging.getLogger("exitserve")
STARTUP_FAILURE = 3  # uvicorn's exit code when the app's startup fails


def header_timeout_protocol(timeout_s: float) -> type | str:
    """uvicorn's httptools protocol, with a deadline on each request's headers."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools (not a Linux x86-64 wheel): uvicorn's default, without the deadline
        log.warning("httptools is not installed: no header read timeout")
        return "auto"

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # the next request on a keep-alive connection

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def send_400_response(self, msg: str) -> None:
            """The parser refused the request: our JSON error and a request id, then close."""
            rid = new_request_id()
            token = request_id_var.set(rid)
            try:
                body = error_body("bad_request", f"{msg.rstrip('.')}: the request is not valid HTTP/1.1")
            finally:
                request_id_var.reset(token)
            self._write_error(b"400 Bad Request", body, REQUEST_ID_HEADER + b": " + rid.encode() + b"\r\n")
            self.transport.close()

        def _write_error(self, status: bytes, body: bytes, extra_headers: bytes = b"") -> None:
            """A JSON error written straight to the connection, which then closes (no ASGI
            cycle exists to answer through)."""
            self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                 + extra_headers + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                 + body)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # nothing of ours is being written
                self._write_error(b"408 Request Timeout", error_body(
                    "header_timeout", f"the request headers did not arrive within {timeout_s:g} s"))
            self.transport.close()

    return HeaderTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain period before the listener closes."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # one shutdown timeout for the whole shutdown: what uvicorn spends on open requests
        # is not given again to the models' queues when the lifespan stops them
        self.state.shutdown_deadline = time.monotonic() + (self.config.timeout_graceful_shutdown or 0)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = self.state.begin_draining()
        if not first or self.grace_s <= 0:  # a second signal, or no grace: go now
            super().handle_exit(sig, frame)
            return
        log.info("draining: /readyz answers 503 for %g s, then the listener closes", self.grace_s)
        timer = threading.Timer(self.grace_s, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


class OneLineStartupFailure:
    """The app, whose failed start leaves one log line: when the repository cannot be
    served the app has logged why, naming the file; the traceback Starlette hands uvicorn
    for that failure would only bury it. Any other failed start keeps its traceback."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_without_traceback(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.state.load_error is not None:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_without_traceback)


def _server(settings: Settings, log_level: str, workers: WorkerGroup | None = None) -> DrainingServer:
    """The app on uvicorn, with the header deadline, the drain period and the shutdown timeout."""
    configure_logging(log_level, settings.log_format)
    configure_process(settings)
    app = create_app(settings, workers=workers, while_ready=freeze_heap_when_ready)
    state = app.state.service.state
    config = uvicorn.Config(
        OneLineStartupFailure(app, state), host=settings.host, port=settings.port, log_level=log_level,
        log_config=None, access_log=False,
        http=header_timeout_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
    )
    return DrainingServer(config, state, settings.drain_grace_s)


def serve(settings: Settings, log_level: str = "info") -> int:
    """Serve until stopped; the exit status: ``STARTUP_FAILURE`` when the repository cannot
    be served, 1 when a worker died. The repository's files are checked first, in this
    process: an operator's mistake is one line on stderr naming the file, not a traceback."""
    try:
        check_repository(settings)
    except RepositoryError as exc:
        print(f"exitserve serve: {relative_to_repository(str(exc), settings.model_repository)}", file=sys.stderr)
        return STARTUP_FAILURE
    if settings.workers > 1:
        return serve_workers(settings, log_level)
    server = _server(settings, log_level)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


def run_worker(settings: Settings, log_level: str, sock: socket.socket, group: WorkerGroup) -> None:
    """One worker process: its own app, sessions and batchers, on the shared socket."""
    server = _server(settings, log_level, group)
    server.run(sockets=[sock])
    sys.exit(0 if server.started else STARTUP_FAILURE)


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve_workers(settings: Settings, log_level: str) -> int:
    """``settings.workers`` processes on one port (the listening socket is shared, the kernel
    spreads connections). Each gets ``default_intra_op_threads(workers)`` ONNX Runtime threads unless
    ``intra_op_threads`` is set. SIGTERM and SIGINT go to every worker, which drain as a
    single server does; a worker that dies on its own stops the group (exit 1), a start-up
    failure exits 3."""
    configure_logging(log_level, settings.log_format)
    count = settings.workers
    threads = settings.intra_op_threads or default_intra_op_threads(count)
    folder = Path(tempfile.mkdtemp(prefix="exitserve-workers-"))
    (folder / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder / "metrics")  # read by prometheus-client in each worker
    worker_settings = settings.model_copy(update={"intra_op_threads": threads})
    sock = _listening_socket(settings.host, settings.port)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=run_worker, name=f"exitserve-worker-{i}",
                                 args=(worker_settings, log_level, sock, WorkerGroup(i, count, folder)))
                 for i in range(count)]
    for process in processes:
        process.start()
    log.info("%d workers on %s:%d, %d ONNX Runtime threads each", count, settings.host, settings.port, threads)
    stopping: dict[str, float] = {}

    def forward(sig: int, frame: FrameType | None) -> None:
        stopping.setdefault("since", time.monotonic())
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    limit = settings.drain_grace_s + settings.shutdown_timeout_s + 10
    failed = False
    try:
        while any(p.is_alive() for p in processes):
            if not stopping and any(not p.is_alive() for p in processes):
                dead = [p.name for p in processes if not p.is_alive()]
                log.error("%s exited on its own: stopping the other workers", ", ".join(dead))
                failed = True
                forward(signal.SIGTERM, None)
            if stopping and time.monotonic() - stopping["since"] > limit:
                for process in processes:
                    if process.is_alive():
                        process.kill()
            time.sleep(0.1)
    finally:
        for process in processes:
            process.join(5)
            mark_process_dead(process.pid, str(folder / "metrics"))
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)
    if any(p.exitcode == STARTUP_FAILURE for p in processes):
        return STARTUP_FAILURE
    return 1 if failed else 0
