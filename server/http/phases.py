"""Per-request phase timings: where one request's time goes inside the server.

Off by default (``EXITSERVE_PHASE_METRICS``): when on, ``RequestMetrics`` gives each
classify request a dict in its scope, the route and the batcher's outcome add the
seconds of each phase to it, and the middleware observes them into
``exitserve_request_phase_seconds{route, phase}`` when the response is sent. The phases
that partition a request's time in the app are ``PARTITION``; what they leave of the
app's total is the framework's own share (middleware, routing), observed as
``framework``; the whole is ``app``. ``stage_<k>`` (the wall time of stage k of the batch
that carried the request) is observed beside them, inside ``inference``.
"""

from __future__ import annotations

from starlette.types import Scope

SCOPE_KEY = "exitserve.phases"

# in the order a request meets them
PARTITION = ("body", "multipart", "options", "decode", "queue", "inference", "resume", "respond", "send")
FRAMEWORK = "framework"


def start(scope: Scope) -> dict[str, float]:
    phases: dict[str, float] = {}
    scope[SCOPE_KEY] = phases
    return phases


def add(scope: Scope, phase: str, seconds: float) -> None:
    """Add ``seconds`` to ``phase`` when this request is being timed (a no-op otherwise)."""
    phases = scope.get(SCOPE_KEY)
    if phases is not None:
        phases[phase] = phases.get(phase, 0.0) + seconds


def get(scope: Scope, phase: str) -> float:
    """Seconds recorded for ``phase`` so far (0 when not timing)."""
    phases = scope.get(SCOPE_KEY)
    return phases.get(phase, 0.0) if phases is not None else 0.0


def timing(scope: Scope) -> bool:
    return SCOPE_KEY in scope
