"""The protocol's protobuf tensors and parameters, to and from NumPy. No model knowledge:
``server.oip`` decides what the tensors mean.

An input's data comes either typed (``InferTensorContents``: one repeated field per
datatype, such as ``uint_contents`` for UINT8) or raw (``raw_input_contents``: one bytes
value per input, in input order, little-endian and row-major; a BYTES tensor is its
elements one after another, each a 4-byte little-endian length and then the bytes), never
both in one request. Answers are always raw (``raw_output_contents``), as Triton's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import numpy as np

from exitserve.server.errors import InvalidInput, InvalidOptions
from exitserve.server.grpc import grpc_predict_v2_pb2 as pb
from exitserve.server.oip import NUMPY_TYPES, Parameter, join_length_prefixed, split_length_prefixed

MAX_RANK = 8  # as v2 over HTTP
# the typed field of each datatype (FP16 has none: raw only)
CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class InputHeader:
    """An input's name, datatype and shape (``server.oip.InputTensor``)."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class OutputRequest:
    """An output asked for, its parameters as plain values (``server.oip.OutputRequest``)."""

    name: str
    parameters: dict[str, Parameter] = field(default_factory=dict)


# ---------------------------------------------------------------------------- parameters


def parameter_value(name: str, value: pb.InferParameter, where: str) -> Parameter:
    choice = value.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidOptions(f"{where}: parameter {name!r} has no value")
    return getattr(value, choice)


def parameters(values: Mapping[str, pb.InferParameter], where: str) -> dict[str, Parameter]:
    return {name: parameter_value(name, value, where) for name, value in values.items()}


def set_parameters(target: MutableMapping[str, pb.InferParameter], values: Mapping[str, Parameter | None]) -> None:
    """``values`` into a protobuf parameter map (None: left out)."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):  # before int: a bool is an int
            target[name].bool_param = value
        elif isinstance(value, int):
            target[name].int64_param = value
        elif isinstance(value, float):
            target[name].double_param = value
        else:
            target[name].string_param = str(value)


# ---------------------------------------------------------------------------- requests


def input_headers(request: pb.ModelInferRequest) -> list[InputHeader]:
    """Every input's header, the request's framing checked: raw contents for every input or
    for none, shapes of at most ``MAX_RANK`` sizes >= 0, no shared memory."""
    raw = len(request.raw_input_contents)
    if raw and raw != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {raw} entries for {len(request.inputs)} inputs: "
                           "send one per input, in input order")
    headers = []
    for tensor in request.inputs:
        if any(key.startswith("shared_memory") for key in tensor.parameters):
            raise InvalidInput(f"input {tensor.name!r}: shared memory is not supported; send the data in the request")
        if raw and tensor.HasField("contents"):
            raise InvalidInput(f"input {tensor.name!r} has typed contents in a request with raw_input_contents: "
                               "send one or the other")
        shape = list(tensor.shape)
        if len(shape) > MAX_RANK or any(size < 0 for size in shape):
            raise InvalidInput(f"input {tensor.name!r} has shape {shape}: at most {MAX_RANK} sizes, none negative")
        headers.append(InputHeader(tensor.name, tensor.datatype, shape))
    return headers


def input_array(request: pb.ModelInferRequest, index: int) -> np.ndarray:
    """Input ``index``'s data as an array of its shape: numbers, or ``bytes`` objects for BYTES."""
    tensor = request.inputs[index]
    shape = list(tensor.shape)
    if request.raw_input_contents:
        return _from_raw(tensor.name, tensor.datatype, shape, request.raw_input_contents[index])
    if not tensor.HasField("contents"):
        raise InvalidInput(f"input {tensor.name!r} has no data: send its contents or raw_input_contents")
    return _from_typed(tensor.name, tensor.datatype, shape, tensor.contents)


def _from_raw(name: str, datatype: str, shape: list[int], blob: bytes) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        elements = split_bytes(name, blob)
        if len(elements) != count:
            raise InvalidInput(f"input {name!r} has {len(elements)} elements, its shape {shape} needs {count}")
        return _object_array(elements, shape)
    dtype = _dtype(name, datatype)
    if len(blob) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {len(blob)} bytes of raw contents, but shape {shape} of {datatype} "
                           f"needs {count * dtype.itemsize}")
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def _from_typed(name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents) -> np.ndarray:
    wanted = CONTENTS.get(datatype)
    if wanted is None:
        _dtype(name, datatype)  # an unknown datatype says so
        raise InvalidInput(f"input {name!r}: {datatype} has no typed contents; send it as raw_input_contents")
    stray = [f.name for f, _ in contents.ListFields() if f.name != wanted]
    if stray:
        raise InvalidInput(f"input {name!r} is {datatype}: its contents go in {wanted}, not {', '.join(stray)}")
    values = getattr(contents, wanted)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name!r} has {len(values)} values, its shape {shape} needs {count}")
    if datatype == "BYTES":
        return _object_array(list(values), shape)
    dtype = _dtype(name, datatype)
    wide = np.array(list(values))  # bool, int64, uint64 or float64: what the protobuf field holds, exactly
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"input {name!r}: {datatype} contents must be integers in [{info.min}, {info.max}]")
    return wide.astype(dtype).reshape(shape)


def _dtype(name: str, datatype: str) -> np.dtype:
    if datatype not in NUMPY_TYPES:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r} "
                           f"(the protocol's are {', '.join([*NUMPY_TYPES, 'BYTES'])})")
    return np.dtype(NUMPY_TYPES[datatype])


def _object_array(elements: list[bytes], shape: list[int]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


def split_bytes(name: str, blob: bytes) -> list[bytes]:
    """A raw BYTES tensor's elements."""
    try:
        return split_length_prefixed(blob)
    except ValueError as exc:
        raise InvalidInput(f"input {name!r}: raw BYTES contents: {exc}") from None


# ---------------------------------------------------------------------------- answers


def raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    """An output tensor as raw contents."""
    if datatype == "BYTES":
        return join_length_prefixed(list(array.ravel()))
    return np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype]).tobytes()
