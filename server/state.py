"""The server's own state, in one object that every layer is handed explicitly: whether
its models are loaded, the load error, draining, and the requests inside the app."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class ServerState:
    ready: bool = False  # every model loaded, warmed up and serving
    load_error: str | None = None  # why the models could not be served
    draining: bool = False  # shutting down: readiness says no, connections are closed after each answer
    in_flight: int = 0  # inference requests inside the app (admission's Little's-law bound reads it)
    shutdown_deadline: float | None = None  # time.monotonic() by which queued work is abandoned, once shutting down

    def begin_draining(self) -> bool:
        """Start draining; False when it had already started (a second signal)."""
        already = self.draining
        self.draining = True
        return not already

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count one inference request while it is inside the app."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
