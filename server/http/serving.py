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
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import FrameType

import uvicorn

from server.http.app import create_app
from server.http.errors import error_body
from server.http.security import configure_logging
from server.service import InferenceService
from server.settings import Settings

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

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # nothing of ours is being written
                body = error_body("header_timeout", f"the request headers did not arrive within {timeout_s:g} s")
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: " + str(len(body)).encode() +
                                     b"\r\n\r\n" + body)
            self.transport.close()

    return HeaderTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain period before the listener closes."""

    def __init__(self, config: uvicorn.Config, service: InferenceService, grace_s: float) -> None:
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self.grace_s <= 0:
            self.service.draining = True
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.service.draining = True
        log.info("draining: /readyz answers 503 for %g s, then the listener closes", self.grace_s)
        timer = threading.Timer(self.grace_s, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


def serve(settings: Settings, log_level: str = "info") -> int:
    """Serve until stopped; the exit status (non-zero when the repository cannot be served)."""
    configure_logging(log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, log_config=None, access_log=False,
        http=header_timeout_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
    )
    server = DrainingServer(config, app.state.service, settings.drain_grace_s)
    server.run()
    return 0 if server.started else STARTUP_FAILURE
