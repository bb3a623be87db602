"""What the server knows about the request being served, in one typed object.

``RequestContext`` is made once per request by the outermost layer of the protocol that
received it, handed explicitly to the data plane inside the request, and read back by the
layers that report on it (metrics, phase timings). The request id also lives in a context
variable: log lines and the batcher's failure log pick it up without being handed it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

request_id_var: ContextVar[str | None] = ContextVar("exitserve_request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


@dataclass
class RequestContext:
    request_id: str | None = None
    arrived: float = field(default_factory=time.perf_counter)  # when it reached the server (deadlines count from it)
    route: str | None = None  # the metrics label of an inference route; None for the others
    model: str | None = None  # the model it resolved to, once known
    phases: dict[str, float] | None = None  # seconds per phase, when phase timing is on

    def add_phase(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase`` when this request is being timed (a no-op otherwise)."""
        if self.phases is not None:
            self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def phase(self, name: str) -> float:
        """Seconds recorded for ``name`` so far (0 when not timing)."""
        return self.phases.get(name, 0.0) if self.phases is not None else 0.0
