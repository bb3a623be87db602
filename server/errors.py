"""Domain errors: what went wrong, in the service's terms. No HTTP here.

Each carries a stable ``code`` (the ``error`` field clients see) and a human ``detail``.
``server.http.errors`` maps each class to a status code and headers, in one place.
"""

from __future__ import annotations

from exitserve.errors import ExitserveError


class ServingError(ExitserveError):
    """Base class: a request the service cannot answer, and why."""

    code = "error"

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class NotReady(ServingError):
    """Models are loading, failed to load, or the server is draining."""

    code = "not_ready"


class UnknownModel(ServingError):
    """The request names a model the repository does not hold."""

    code = "unknown_model"


class Overloaded(ServingError):
    """The model's queue is full: retry later."""

    code = "overloaded"


class TooManyImages(ServingError):
    """More images in one request than the model's queue can ever hold: no retry helps."""

    code = "too_many_images"


class InvalidOptions(ServingError):
    """Options that cannot be honoured (bad budget, thresholds, top_k, conflicts); the
    code names which (``invalid_budget``, ``conflicting_options``, ...)."""

    code = "invalid_request"


class InvalidInput(ServingError):
    """An input tensor that does not fit the model (datatype, shape, values)."""

    code = "invalid_input"


class BadImage(ServingError):
    """An upload that is not a usable image; ``index``: which of the request's images."""

    code = "bad_image"
    index: int | None = None


class EmptyImage(BadImage):
    code = "empty_file"


class NotAnImage(BadImage):
    code = "not_an_image"


class ImageTooLarge(BadImage):
    """Over the pixel limit (decompression bombs), refused before decoding."""

    code = "image_too_large"


class CorruptImage(BadImage):
    code = "corrupt_image"


class InferenceFailed(ServingError):
    """The model failed on the batch holding this request (logged once, with the batch's
    request ids); the server goes on."""

    code = "inference_failed"
