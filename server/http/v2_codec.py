"""The Open Inference Protocol's HTTP bodies (KServe v2 / Triton): JSON tensors and the
binary tensor extension, to and from NumPy. No model knowledge here: the v2 routes decide
what the tensors mean.

Binary tensor extension: the body is the JSON header, whose length the
``Inference-Header-Content-Length`` header gives, followed by the raw bytes of every input
whose parameters carry ``binary_data_size``, in input order. Numbers are little-endian and
row-major; a BYTES tensor is its elements one after another, each a 4-byte little-endian
length and then the bytes. Answers do the same for outputs asked for with ``binary_data``.

In JSON a BYTES element is a string; JSON cannot carry raw image bytes, so exitserve reads
JSON BYTES elements as base64 (KServe's convention for images in v2 JSON).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from exitserve.server.http.errors import RequestProblem
from exitserve.server.oip import NUMPY_TYPES, join_length_prefixed, split_length_prefixed

HEADER_LENGTH = "Inference-Header-Content-Length"
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # deflate: zlib-wrapped, as HTTP means it

# the protocol's $parameter: a bool, a number or a string
Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = dict[str, Parameter]


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: Any = None  # JSON tensor data, nested or flat; absent when the tensor is binary


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


@dataclass
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray  # numbers, or bytes objects for BYTES
    binary: bool


def bad(message: str) -> RequestProblem:
    return RequestProblem(400, "invalid_request", message)


# ---------------------------------------------------------------------------- requests


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding`` (gzip or deflate, what Triton's clients
    offer), refused past ``limit`` bytes inflated: a small body must not inflate into a
    large one (a zip bomb)."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ENCODINGS:
        raise bad(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    inflater = zlib.decompressobj(ENCODINGS[name])
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad(f"the {name} body cannot be inflated ({exc})") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise RequestProblem(413, "payload_too_large", f"the inflated request body is over the limit of {limit} bytes")
    if not inflater.eof:
        raise bad(f"the {name} body ends before its end of stream: the upload was cut off")
    return inflated


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, list[bytes | None]]:
    """The JSON header and, for each input, its binary data (None where the data is JSON)."""
    if header_length is None:
        header, rest = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise bad(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < length <= len(body):
            raise bad(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
        header, rest = body[:length], body[length:]
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        raise bad(f"not an inference request: {_summary(exc)}") from None
    blobs: list[bytes | None] = []
    offset = 0
    for tensor in request.inputs:
        if any(key.startswith("shared_memory") for key in tensor.parameters):
            raise bad(f"input {tensor.name!r}: shared memory is not supported; send the data in the body")
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise bad(f"input {tensor.name!r} has neither data nor a binary_data_size parameter")
            blobs.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"input {tensor.name!r}: binary_data_size must be a byte count, got {size!r}")
        if tensor.data is not None:
            raise bad(f"input {tensor.name!r} has both JSON data and a binary_data_size parameter")
        if header_length is None:
            raise bad(f"input {tensor.name!r} is binary, but the request has no {HEADER_LENGTH} header")
        if offset + size > len(rest):
            raise bad(f"input {tensor.name!r}: its {size} bytes of binary data go past the end of the body")
        blobs.append(rest[offset:offset + size])
        offset += size
    if offset != len(rest):
        raise bad(f"{len(rest) - offset} bytes after the JSON header belong to no input")
    return request, blobs


def _summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def to_array(tensor: RequestInput, blob: bytes | None) -> np.ndarray:
    """The tensor's data as an array of its shape: numbers, or ``bytes`` objects for BYTES."""
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        elements = _length_prefixed(tensor.name, blob) if blob is not None else _base64_elements(tensor)
        if len(elements) != count:
            raise bad(f"input {tensor.name!r} has {len(elements)} elements, its shape {tensor.shape} needs {count}")
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(tensor.shape)
    dtype = NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise bad(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r} "
                  f"(the protocol's are {', '.join([*NUMPY_TYPES, 'BYTES'])})")
    if blob is not None:
        itemsize = np.dtype(dtype).itemsize
        if len(blob) != count * itemsize:
            raise bad(f"input {tensor.name!r}: {len(blob)} bytes of binary data, but shape {tensor.shape} of "
                      f"{tensor.datatype} needs {count * itemsize}")
        return np.frombuffer(blob, dtype=dtype).reshape(tensor.shape)
    values = _json_numbers(tensor, np.dtype(dtype))
    if values.size != count:
        raise bad(f"input {tensor.name!r} has {values.size} values, its shape {tensor.shape} needs {count}")
    return values.reshape(tensor.shape)


def _json_numbers(tensor: RequestInput, dtype: np.dtype) -> np.ndarray:
    """JSON data (nested or flat lists) as ``dtype``, refusing what would change in the cast:
    strings, fractions for integer types, values out of the type's range."""
    try:
        values = np.asarray(tensor.data)
    except ValueError:  # ragged nesting
        raise bad(f"input {tensor.name!r}: data must be a flat or evenly nested list of numbers") from None
    kind = values.dtype.kind
    if values.size == 0:
        return values.astype(dtype).ravel()
    if dtype.kind == "b":
        ok, what = kind == "b", "true or false"
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        ok = kind in "iu" and info.min <= values.min() and values.max() <= info.max
        what = f"integers in [{info.min}, {info.max}]"
    else:
        ok, what = kind in "iuf", "numbers"
    if not ok:
        raise bad(f"input {tensor.name!r}: {tensor.datatype} data must be {what}")
    return values.astype(dtype).ravel()


def _length_prefixed(name: str, blob: bytes) -> list[bytes]:
    try:
        return split_length_prefixed(blob)
    except ValueError as exc:
        raise bad(f"input {name!r}: binary BYTES data: {exc}") from None


def _base64_elements(tensor: RequestInput) -> list[bytes]:
    flat: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item)
        else:
            flat.append(value)

    walk(tensor.data)
    elements = []
    for i, value in enumerate(flat):
        if not isinstance(value, str):
            raise bad(f"input {tensor.name!r} element {i}: BYTES data in JSON must be base64 strings")
        try:
            elements.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise bad(f"input {tensor.name!r} element {i} is not base64 (in JSON, encoded images are base64 "
                      "strings; or send them raw with the binary tensor extension)") from None
    return elements


# ---------------------------------------------------------------------------- answers


def encode_response(header: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON header's length when binary outputs follow it (the
    value of ``Inference-Header-Content-Length``), else None."""
    entries = []
    blobs = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.array.shape)}
        if output.binary:
            raw = _raw(output)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif output.datatype == "BYTES":
            entry["data"] = [e.decode("utf-8", errors="replace") for e in output.array.ravel()]
        else:
            entry["data"] = output.array.ravel().tolist()
        entries.append(entry)
    head = json.dumps({**header, "outputs": entries}, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _raw(output: OutputTensor) -> bytes:
    if output.datatype == "BYTES":
        return join_length_prefixed(list(output.array.ravel()))
    return np.ascontiguousarray(output.array, dtype=NUMPY_TYPES[output.datatype]).tobytes()
