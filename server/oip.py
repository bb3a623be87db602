"""The Open Inference Protocol's meaning, shared by both of its transports: v2 over HTTP
(``server/http/routes/v2.py``) and gRPC (``server/grpc/``).

Here: the model's inputs and outputs by name, which input a request sends and which
outputs it wants, the early-exit parameters, the answer's tensors and parameters, the
model's metadata and readiness. Not here: the wire formats (JSON and the binary tensor
extension are ``server/http/v2_codec.py``'s, protobuf is ``server/grpc/``'s), and no web
framework, so a request means the same whichever transport carried it.

Inputs (exactly one per request; N images, 1 <= N <= ``EXITSERVE_MAX_FILES``):

* ``images`` BYTES [N]: encoded images, through the same decoder and limits as /classify;
* ``pixels`` UINT8 [N, H, W] or [N, H, W, C]: raw pixels (C: 1, 3 or 4), converted and
  normalized exactly as a decoded image of those pixels;
* ``normalized`` FP32 [N, C, H, W]: already normalized, the model's own input shape.

Outputs: ``probabilities`` FP32 [N, classes], ``class_index`` INT64 [N], ``exit_index``
INT32 [N], ``cost_fraction`` FP32 [N]. Parameters: ``budget`` (each image on its own, as
/classify), ``batch_budget`` (one budget for the whole request, as /classify/batch),
``deadline_ms``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from exitserve.server import dataplane
from exitserve.server.catalog import ModelCatalog, ServedModel
from exitserve.server.dataplane import (
    EXPECTED_ACCURACY_BASIS,
    DataPlane,
    EncodedImages,
    InferenceResult,
    Inputs,
    NormalizedImages,
    PixelImages,
)
from exitserve.server.engine import ModelEngine
from exitserve.server.errors import BadImage, InvalidInput, InvalidOptions, NotReady, UnknownModel
from exitserve.server.options import InferenceOptions, parse_options

if TYPE_CHECKING:
    from exitserve.server.service import InferenceService

# The wire: numbers little-endian and row-major; a BYTES tensor's elements one after
# another, each a 4-byte little-endian length and then its bytes (both transports).
NUMPY_TYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
LENGTH_PREFIX = struct.Struct("<I")


def split_length_prefixed(blob: bytes) -> list[bytes]:
    """A binary BYTES tensor's elements; ``ValueError`` saying where the data breaks."""
    elements = []
    offset = 0
    view = memoryview(blob)
    while offset < len(blob):
        if offset + LENGTH_PREFIX.size > len(blob):
            raise ValueError(f"the data ends inside the length of element {len(elements)}")
        (size,) = LENGTH_PREFIX.unpack_from(blob, offset)
        offset += LENGTH_PREFIX.size
        if offset + size > len(blob):
            raise ValueError(f"element {len(elements)} claims {size} bytes, past the end of the data")
        elements.append(bytes(view[offset:offset + size]))
        offset += size
    return elements


def join_length_prefixed(elements: Sequence[bytes]) -> bytes:
    return b"".join(LENGTH_PREFIX.pack(len(e)) + e for e in elements)


SERVER_NAME = "exitserve"
VERSION = "1"  # a model folder is one version
PLATFORM = "exitserve_staged_onnx"
INPUTS = {"images": "BYTES", "pixels": "UINT8", "normalized": "FP32"}
OUTPUTS = {"probabilities": "FP32", "class_index": "INT64", "exit_index": "INT32", "cost_fraction": "FP32"}
PARAMETERS = ("budget", "batch_budget", "deadline_ms")  # the request parameters that are early-exit options

# the protocol's $parameter: a bool, a number or a string
Parameter = StrictBool | StrictInt | StrictFloat | StrictStr


class InputTensor(Protocol):
    """What the protocol says of an input before its data is read (both transports have it)."""

    name: str
    datatype: str
    shape: Sequence[int]


class OutputRequest(Protocol):
    """An output a request asks for, with its parameters as plain values."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class WantedOutput:
    name: str
    binary: bool  # HTTP's binary tensor extension (``binary_data``); gRPC always sends raw bytes
    classification: int  # Triton's classification extension: the top k as strings, or 0 for the tensor


@dataclass(frozen=True)
class OutputArray:
    name: str
    datatype: str
    array: np.ndarray  # numbers, or ``bytes`` objects for BYTES


# ---------------------------------------------------------------------------- metadata (also /docs' schemas)


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Parameter] = Field(default_factory=dict)


def model_metadata(engine: ModelEngine, max_images: int) -> ModelMetadata:
    spec = engine.manifest.input
    classes = len(engine.manifest.labels)

    def tensor(name: str, shape: list[int], description: str) -> TensorMetadata:
        datatype = INPUTS.get(name) or OUTPUTS[name]
        return TensorMetadata(name=name, datatype=datatype, shape=shape, parameters={"description": description})

    return ModelMetadata(
        name=engine.name, versions=[VERSION], platform=PLATFORM,
        inputs=[
            tensor("images", [-1], "encoded images (PNG, JPEG, ...), one per element; base64 strings in JSON"),
            tensor("pixels", [-1, -1, -1, -1], "raw pixels N x H x W x C (C: 1, 3 or 4; N x H x W for grey), "
                                               f"resized to {spec.size}x{spec.size} as a decoded image would be"),
            tensor("normalized", [-1, spec.channels, spec.size, spec.size],
                   f"already normalized N x C x H x W (mean {spec.mean}, std {spec.std})"),
        ],
        outputs=[
            tensor("probabilities", [-1, classes], "softmax probabilities at the exit each image left by"),
            tensor("class_index", [-1], "the most probable class"),
            tensor("exit_index", [-1], f"the exit each image left by (0 to {engine.num_exits - 1})"),
            tensor("cost_fraction", [-1], "what each image cost, as a fraction of the full network"),
        ],
        parameters={"exits": engine.num_exits, "classes": classes, "labels_at": f"/v1/models/{engine.name}",
                    "default_budget": engine.policy.default_budget, "min_budget": engine.policy.min_budget,
                    "max_images": max_images},
    )


def resolve(catalog: ModelCatalog, name: str, version: str | None) -> ServedModel:
    """The model a request names (``NotReady`` while loading, ``UnknownModel`` for an unknown
    name or a version other than ``VERSION``)."""
    model = catalog.get(name)
    if version is not None and version != VERSION:
        raise UnknownModel(f"model {name!r} has no version {version!r}; it has version {VERSION}")
    return model


def check_model_ready(service: InferenceService, name: str, version: str | None) -> ServedModel:
    """The model, when it is ready; ``NotReady`` while loading or draining, or while this
    model is stalled (another model's stall leaves it ready)."""
    model = resolve(service.catalog, name, version)
    is_ready, body = service.readiness()
    if not is_ready and (body["status"] != "stalled" or model.name in body.get("models", [])):
        raise NotReady(f"{model.name} is not ready: {body.get('detail') or body['status']}")
    return model


# ---------------------------------------------------------------------------- the request


def parse_parameters(parameters: Mapping[str, object]) -> InferenceOptions:
    """The early-exit options among a request's parameters (others, such as Triton's own,
    are left to the transport)."""
    return parse_options({k: v for k, v in parameters.items() if k in PARAMETERS})


def flag(parameters: Mapping[str, object], name: str, default: bool, where: str) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidOptions(f"{where}: {name} must be true or false, got {value!r}")
    return value


def requested_outputs(outputs: Sequence[OutputRequest] | None, classes: int,
                      default_binary: bool = False) -> list[WantedOutput]:
    """Each output to send, in request order (all of them when the request names none)."""
    if not outputs:
        return [WantedOutput(name, default_binary, 0) for name in OUTPUTS]
    chosen: list[WantedOutput] = []
    for output in outputs:
        if output.name not in OUTPUTS:
            raise InvalidInput(f"no output {output.name!r}; the outputs are {', '.join(OUTPUTS)}")
        if any(c.name == output.name for c in chosen):
            raise InvalidInput(f"output {output.name!r} is asked for twice")
        binary = flag(output.parameters, "binary_data", default_binary, f"output {output.name!r}")
        top = output.parameters.get("classification", 0)
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= classes:
            raise InvalidInput(f"output {output.name!r}: classification must be a class count in [0, {classes}]")
        if top and output.name != "probabilities":
            raise InvalidInput("classification applies to the probabilities output only")
        chosen.append(WantedOutput(output.name, binary, top))
    return chosen


def the_input(inputs: Sequence[InputTensor], engine: ModelEngine, max_images: int) -> InputTensor:
    """The request's one input, its name, datatype, rank and batch size checked (before
    its data is read)."""
    if len(inputs) != 1:
        raise InvalidInput(f"send exactly one input, got {len(inputs)} "
                           f"({', '.join(repr(t.name) for t in inputs)})")
    tensor = inputs[0]
    if tensor.name not in INPUTS:
        raise InvalidInput(f"{engine.name} has no input {tensor.name!r}; its inputs are "
                           + ", ".join(f"{name} ({datatype})" for name, datatype in INPUTS.items()))
    if tensor.datatype != INPUTS[tensor.name]:
        raise InvalidInput(f"input {tensor.name!r} is {INPUTS[tensor.name]}, got {tensor.datatype}")
    ranks = {"images": (1,), "pixels": (3, 4), "normalized": (4,)}[tensor.name]
    if len(tensor.shape) not in ranks:
        expected = {"images": "[N]", "pixels": "[N, H, W] or [N, H, W, C]", "normalized": "[N, C, H, W]"}[tensor.name]
        raise InvalidInput(f"input {tensor.name!r} has shape {tensor.shape}; it takes {expected}")
    if not 1 <= tensor.shape[0] <= max_images:
        raise InvalidInput(f"input {tensor.name!r}: a request carries 1 to {max_images} images, got {tensor.shape[0]}")
    return tensor


def model_inputs(name: str, array: np.ndarray) -> Inputs:
    """The data plane's form of whichever input was sent."""
    if name == "images":
        return EncodedImages(list(array))
    if name == "pixels":
        return PixelImages(array[..., None] if array.ndim == 3 else array)
    return NormalizedImages(array)


async def infer(plane: DataPlane, request: dataplane.InferenceRequest) -> InferenceResult:
    """``DataPlane.infer``, a bad image's error naming its element (it fails the request)."""
    try:
        return await plane.infer(request)
    except BadImage as exc:
        raise type(exc)(f"input 'images' element {exc.index}: {exc.detail}") from None


# ---------------------------------------------------------------------------- the answer


def output_arrays(engine: ModelEngine, result: InferenceResult, wanted: list[WantedOutput]) -> list[OutputArray]:
    """The wanted outputs' tensors, in ``wanted``'s order."""
    results = result.results
    probs = np.stack([r.probs for r in results]).astype(np.float32)  # N x classes
    arrays = {
        "probabilities": probs,
        "class_index": probs.argmax(axis=1).astype(np.int64),  # the first of equals, as /classify's stable sort
        "exit_index": np.array([r.exit_index for r in results], dtype=np.int32),
        "cost_fraction": np.array([r.cost_fraction for r in results], dtype=np.float32),
    }
    tensors = []
    for output in wanted:
        if top := output.classification:  # Triton's classification: "probability:index:label", most probable first
            labels = engine.manifest.labels
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
            texts = [[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in idx] for row, idx in zip(probs, order)]
            array = np.empty((len(results), top), dtype=object)
            array[:] = texts
            tensors.append(OutputArray(output.name, "BYTES", array))
        else:
            tensors.append(OutputArray(output.name, OUTPUTS[output.name], arrays[output.name]))
    return tensors


def answer_parameters(result: InferenceResult) -> dict[str, Parameter]:
    """The early-exit part of the answer: the budget decision and what was spent."""
    decision = result.budget
    answer: dict[str, Parameter] = {"policy": decision.policy, "budget": decision.requested}
    if decision.policy == "batch_budget":
        answer["spent_fraction"] = round(result.spent_fraction or 0.0, 6)
        if (expected := result.expected_accuracy) is not None:
            answer["expected_accuracy"] = expected
            answer["expected_accuracy_basis"] = EXPECTED_ACCURACY_BASIS
            if result.estimated_accuracy is not None:
                answer["estimated_accuracy"] = round(result.estimated_accuracy, 6)
    else:
        answer["budget_applied"] = decision.applied
        if decision.note is not None:
            answer["budget_note"] = decision.note
        answer["deadline_hits"] = result.deadline_hits
    answer["mean_cost_fraction"] = round(result.mean_cost_fraction, 6)
    return answer
