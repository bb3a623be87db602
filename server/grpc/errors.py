"""The one place errors become gRPC: the domain errors (``server.errors``) as status codes,
with the same meaning as v2 over HTTP's ``PROTOCOL_STATUS`` (``server/http/errors.py``):
whatever the client got wrong is INVALID_ARGUMENT, an unknown model or version NOT_FOUND,
"try again later" UNAVAILABLE with ``retry-after`` in the trailing metadata, a failed model
INTERNAL."""

from __future__ import annotations

from grpc import StatusCode

from exitserve.server.errors import (
    BadImage,
    InferenceFailed,
    InvalidInput,
    InvalidOptions,
    NotReady,
    Overloaded,
    ServingError,
    TooManyImages,
    UnknownModel,
)

# most specific class first: the first match wins
STATUS: list[tuple[type[ServingError], StatusCode]] = [
    (NotReady, StatusCode.UNAVAILABLE),
    (Overloaded, StatusCode.UNAVAILABLE),
    (TooManyImages, StatusCode.INVALID_ARGUMENT),  # no retry helps: send fewer images
    (UnknownModel, StatusCode.NOT_FOUND),
    (InvalidOptions, StatusCode.INVALID_ARGUMENT),
    (InvalidInput, StatusCode.INVALID_ARGUMENT),
    (BadImage, StatusCode.INVALID_ARGUMENT),
    (InferenceFailed, StatusCode.INTERNAL),
    (ServingError, StatusCode.UNAVAILABLE),
]
RETRYABLE = (NotReady, Overloaded)
RETRY_AFTER = "retry-after"  # trailing metadata: seconds, as HTTP's Retry-After

# The status v2 over HTTP gives the same outcome: the ``status`` label of the request metrics,
# so the alerts on 503s and on 5xx (deploy/prometheus/alerts.yml) count gRPC's as well.
HTTP_STATUS: dict[StatusCode, int] = {
    StatusCode.OK: 200,
    StatusCode.INVALID_ARGUMENT: 400,
    StatusCode.UNAUTHENTICATED: 401,
    StatusCode.NOT_FOUND: 404,
    StatusCode.RESOURCE_EXHAUSTED: 413,
    StatusCode.CANCELLED: 499,  # the client went away (nginx's convention, as server/http/errors.py)
    StatusCode.INTERNAL: 500,
    StatusCode.UNAVAILABLE: 503,
}


def status_of(exc: ServingError) -> StatusCode:
    return next(code for kind, code in STATUS if isinstance(exc, kind))


def http_status(code: StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)
