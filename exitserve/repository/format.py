"""The model repository format: ``manifest.json`` and ``calibration.json`` per model.

These pydantic models are the one definition of the format: the exporter writes them,
the server reads and validates them. A calibration is checked against its manifest on
load (same exits, same costs): thresholds for another export of the model would
silently send images to the wrong exits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from exitserve.errors import ExitserveError
from exitserve.repository.confidence import ConfidenceRule
from exitserve.repository.preprocessing import Geometry, normalize

MANIFEST_FORMAT_VERSION = 1
CALIBRATION_FORMAT_VERSION = 1
DEFAULT_OPSET = 17
COST_TOLERANCE = 1e-6


class RepositoryError(ExitserveError, ValueError):
    """A model folder is missing files or holds a malformed manifest."""


class InputSpec(BaseModel):
    name: str = "image"
    channels: int = Field(ge=1, le=4)
    size: int = Field(ge=1)
    layout: Literal["NCHW"] = "NCHW"
    mean: list[float]
    std: list[float]
    # the resampling filter every upload is fitted with. Lanczos: Fashion-MNIST test images
    # upscaled into 4:3 JPEG photos lost 2.0-2.5 points against the 28x28 originals with
    # bilinear (antialiased, it blurs a 17x reduction), 1.0-1.2 with bicubic and 0.5-0.6 with
    # lanczos (BENCHMARKS.md, photos)
    resize: str = "lanczos"
    # how an image of another shape becomes size x size (``preprocessing.fit_image``): "crop"
    # (the shorter side to size / crop_fraction, then the centre: torchvision's evaluation
    # transforms), "squash" (both sides to size, aspect ratio lost) or "pad" (the longer side to
    # size, the rest filled with ``background``)
    fit: Literal["crop", "squash", "pad"] = "crop"
    crop_fraction: float = Field(1.0, gt=0, le=1)
    background: list[int] | None = None  # per channel, 0-255, for "pad": the colour around the
    # subjects in the training images; None: black
    dtype: str = "float32"

    @property
    def geometry(self) -> Geometry:
        background = tuple(self.background) if self.background is not None else None
        return Geometry(self.fit, self.crop_fraction, background, self.resize)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C -> the N x C x H x W tensor stage 0 takes."""
        return normalize(pixels, self.mean, self.std, self.dtype)


class LatencySpec(BaseModel):
    """Measured with ONNX Runtime when the repository was written."""

    provider: str
    batch_1_ms: float
    batch_64_ms: float


class StageSpec(BaseModel):
    index: int
    file: str
    carried_inputs: list[str]
    keep_input: str | None  # indices of the images still running (stages after the first)
    carried_outputs: list[str]
    logits_output: str = "logits"
    probs_output: str = "probs"
    exit_name: str
    flops: int  # multiply-adds of this stage
    cumulative_flops: int  # to reach this exit, earlier heads included
    params: int
    cost_fraction: float  # cumulative_flops / full network
    latency: LatencySpec | None = None
    test_accuracy: float | None = None


class SourceSpec(BaseModel):
    """What was exported: a checkpoint of a registered family (``kind`` ``checkpoint``,
    ``model`` its registered name), a user's factory (``factory``, ``model`` its
    ``package.module:function``, ``config`` its arguments, ``checkpoint`` the weights file
    loaded into it, if any) or a model object handed to ``exitserve.export_model``
    (``object``, ``model`` its class). ``dataset``: the parity images' dataset, and the one
    ``exitserve calibrate`` uses unless given another; none when the export had none."""

    kind: Literal["checkpoint", "factory", "object"] = "checkpoint"
    checkpoint: str | None = None  # the file the weights came from
    sha256: str | None = None
    model: str
    config: dict = Field(default_factory=dict)
    dataset: str | None = None


class Manifest(BaseModel):
    format_version: int = MANIFEST_FORMAT_VERSION
    name: str
    exporter_version: str
    opset: int
    precision: Literal["fp32", "fp16"] = "fp32"
    input: InputSpec
    labels: list[str]
    stages: list[StageSpec]
    source: SourceSpec
    parity: dict = Field(default_factory=dict)
    full_model: str | None = None  # the whole network as one graph: the plain-serving baseline

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def cost_fractions(self) -> list[float]:
        return [s.cost_fraction for s in self.stages]


class BudgetPoint(BaseModel):
    budget: float  # mean cost per image as a fraction of the full network
    thresholds: list[float]  # one per exit; the last is always -inf (everything leaves)
    method: Literal["reference", "reference_truncated", "search", "static"]
    expected_accuracy: float
    expected_cost: float
    exit_fractions: list[float]
    # ATC (Garg et al., ICLR 2022): the held-out share of images whose served exit's
    # ``ESTIMATE_SCORE`` is above this equals ``expected_accuracy``; live, that share of recent
    # images estimates the accuracy without labels. None in calibrations made before it existed.
    atc_threshold: float | None = None


class Calibration(BaseModel):
    format_version: int = CALIBRATION_FORMAT_VERSION
    rule: ConfidenceRule
    heldout: dict  # which split, how many images
    exit_accuracy: list[float]  # each exit alone, held-out
    cost_fractions: list[float]  # the manifest's, at calibration time: checked on load
    curve: list[BudgetPoint]  # sorted by budget once here, looked up per request

    @field_validator("curve")
    @classmethod
    def _sorted_by_budget(cls, curve: list[BudgetPoint]) -> list[BudgetPoint]:
        if not curve:
            raise ValueError("the budget curve is empty")
        return sorted(curve, key=lambda p: p.budget)

    @model_validator(mode="after")
    def _one_value_per_exit(self) -> "Calibration":
        exits = len(self.cost_fractions)
        if len(self.exit_accuracy) != exits:
            raise ValueError(f"exit_accuracy has {len(self.exit_accuracy)} values for {exits} exits")
        for point in self.curve:
            if len(point.thresholds) != exits or len(point.exit_fractions) != exits:
                raise ValueError(f"the point at budget {point.budget} has {len(point.thresholds)} thresholds and "
                                 f"{len(point.exit_fractions)} exit fractions for {exits} exits")
        return self

    def check_matches(self, manifest: Manifest) -> None:
        """Raise ``ValueError`` unless this calibration was made for ``manifest``'s exits."""
        if len(self.cost_fractions) != manifest.num_exits:
            raise ValueError(f"calibrated for {len(self.cost_fractions)} exits, "
                             f"but the manifest has {manifest.num_exits}")
        for k, (ours, theirs) in enumerate(zip(self.cost_fractions, manifest.cost_fractions())):
            if abs(ours - theirs) > COST_TOLERANCE:
                raise ValueError(f"exit {k} costs {theirs:.6f} of the network in the manifest "
                                 f"but {ours:.6f} in the calibration: calibrate this export again")


class ServingConfig(BaseModel):
    """``serving.json`` beside the manifest (optional): this model's own serving settings,
    overriding the server-wide ones (Triton's per-model config, in small)."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not a silently ignored setting

    default_budget: float | None = Field(None, gt=0, le=1)
    max_batch_size: int | None = Field(None, ge=1)
    max_queue_images: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    latency_slo_ms: float | None = Field(None, gt=0, le=600_000)  # this model's latency objective (server.slo)
    slo_floor_budget: float | None = Field(None, gt=0, le=1)


SERVING_FILE = "serving.json"
DEFAULT_BUDGET = 0.25  # the server's default budget (EXITSERVE_DEFAULT_BUDGET), a fraction of full cost


def describe(exc: Exception) -> str:
    """``exc`` on one line: a pydantic ``ValidationError`` as its field paths and messages
    (its own text spans lines and links to pydantic's site, noise in an operator's log)."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split())
    errors = exc.errors(include_url=False, include_input=False)
    shown = "; ".join(_one_error(e["loc"], e["msg"]) for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    plural = "s" if len(errors) > 1 else ""
    return f"{len(errors)} validation error{plural} for {exc.title}: {shown}{more}"


def _one_error(loc: tuple, msg: str) -> str:
    msg = msg.removeprefix("Value error, ")  # our own validators' messages, as written
    return f"{'.'.join(map(str, loc))}: {msg}" if loc else msg


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"{path} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"{path}: unreadable JSON ({describe(exc)})") from exc


def load_manifest(folder: Path) -> Manifest:
    try:
        manifest = Manifest.model_validate(_read_json(folder / "manifest.json"))
    except ValidationError as exc:
        raise RepositoryError(f"{folder / 'manifest.json'}: {describe(exc)}") from exc
    if manifest.format_version != MANIFEST_FORMAT_VERSION:
        raise RepositoryError(f"{folder}: manifest format {manifest.format_version} is not supported")
    for stage in manifest.stages:
        if not (folder / stage.file).is_file():
            raise RepositoryError(f"{folder}: stage file {stage.file} is missing")
    return manifest


def load_calibration(folder: Path, manifest: Manifest | None = None) -> Calibration | None:
    """The folder's calibration, or None when it has none; checked against ``manifest``
    (read from the folder when not given)."""
    path = folder / "calibration.json"
    if not path.exists():
        return None
    manifest = manifest or load_manifest(folder)
    raw = _read_json(path)
    try:
        calibration = Calibration.model_validate(raw)
        calibration.check_matches(manifest)
    except (ValidationError, ValueError) as exc:
        raise RepositoryError(f"{path}: {describe(exc)}") from exc
    return calibration


def write_json(path: Path, model: BaseModel) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(model.model_dump_json(indent=2))
    tmp.replace(path)


def load_serving_config(folder: Path) -> ServingConfig:
    """The folder's ``serving.json``, or the empty config (server-wide settings) without one."""
    path = folder / SERVING_FILE
    if not path.exists():
        return ServingConfig()
    try:
        return ServingConfig.model_validate(_read_json(path))
    except ValidationError as exc:
        raise RepositoryError(f"{path}: {describe(exc)}") from exc


def write_budget_floor(folder: Path, manifest: Manifest) -> ServingConfig | None:
    """A model whose first exit costs more than the server's default budget could not be
    served by default (the server refuses a default budget it cannot honour): give it a
    ``serving.json`` with the first exit's cost, rounded up, as its default budget. A
    folder that already has one is left alone."""
    first = manifest.stages[0].cost_fraction
    if first <= DEFAULT_BUDGET or (folder / SERVING_FILE).exists():
        return None
    config = ServingConfig(default_budget=math.ceil(first * 1000) / 1000)
    write_json(folder / SERVING_FILE, config)
    return config
