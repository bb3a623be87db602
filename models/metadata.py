"""What serving a model needs beside its weights: input size, channels, normalisation,
class names, and the dataset its parity images (and, by default, its calibration) come from.

A checkpoint of a built-in family carries these. A user's own model hands them over as an
``exitserve_metadata`` attribute (a :class:`ModelMetadata`, or a dict of its fields), and
the command line's flags give the same fields. Both may be given; a field set in both must
agree: conflicting arguments raise, never silently override (STYLE). What neither gives is
read from the dataset where the dataset decides it (size, channels, class names); the
normalisation never is: it is whatever the model was trained with, and a guess would serve
quietly wrong answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from exitserve.errors import ConfigurationError
from exitserve.models.data import DataSource, ImageDataset

FITS = ("crop", "squash", "pad")
DEFAULT_FIT = "crop"
ATTRIBUTE = "exitserve_metadata"  # the attribute a model (or a plain backbone) carries it in


@dataclass(frozen=True)
class ModelMetadata:
    """Every field is optional here; :meth:`resolve` says which the export needs."""

    input_size: int | None = None  # side of the square image the model takes
    channels: int | None = None
    mean: tuple[float, ...] | None = None  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None  # one name per output of the classifier
    dataset: str | None = None  # as ``--data`` names it: fashion-mnist, cifar10:PATH, image-folder:PATH
    fit: str | None = None  # how an upload of another shape becomes the square: crop (default), squash, pad

    def __post_init__(self) -> None:
        for name in ("mean", "std", "labels"):  # lists from JSON or flags: stored as tuples (hashable, frozen)
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                    raise ConfigurationError(f"metadata {name} must be a list, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        for name in ("input_size", "channels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"metadata {name} must be a positive integer, got {value!r}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigurationError(f"metadata std must be positive, got {list(self.std)}")
        if self.fit is not None and self.fit not in FITS:
            raise ConfigurationError(f"metadata fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.dataset is not None:
            DataSource.parse(self.dataset)  # a misspelt name fails here, not after the export's work

    @classmethod
    def of(cls, obj: Any) -> ModelMetadata:
        """``obj``'s ``exitserve_metadata`` (empty when it has none); a dict with a key that is
        not a field raises, naming the fields."""
        raw = getattr(obj, ATTRIBUTE, None)
        if raw is None or isinstance(raw, ModelMetadata):
            return raw or cls()
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"{type(obj).__name__}.{ATTRIBUTE} must be a ModelMetadata or a dict, "
                                     f"not {type(raw).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigurationError(f"{type(obj).__name__}.{ATTRIBUTE}: unknown keys {unknown}; known: {known}")
        return cls(**raw)

    def merge(self, other: ModelMetadata, mine: str, theirs: str) -> ModelMetadata:
        """Both sets of fields together; a field both set to different values raises
        (``mine`` and ``theirs`` say where each came from, for the message)."""
        clashes = [
            f"{f.name}: {mine} say {getattr(self, f.name)!r}, {theirs} say {getattr(other, f.name)!r}"
            for f in fields(self)
            if None not in (getattr(self, f.name), getattr(other, f.name))
            and _differ(getattr(self, f.name), getattr(other, f.name))
        ]
        if clashes:
            raise ConfigurationError("conflicting metadata: " + "; ".join(clashes))
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(self) if getattr(self, f.name) is None})

    def resolve(self, data: ImageDataset | None, dataset_name: str | None = None) -> ResolvedMetadata:
        """Every field the export needs, the dataset's where this leaves them open; what this
        says and the dataset contradicts raises. ``dataset_name`` says which dataset ``data``
        is (an image folder is resized to the model's size; the others have fixed sizes)."""
        size, channels, labels = self.input_size, self.channels, self.labels
        if data is not None:
            fixed_size = dataset_name != "image-folder"
            if size is not None and fixed_size and size != data.size:
                raise ConfigurationError(f"input size {size} conflicts with {dataset_name}'s {data.size} x {data.size} "
                                         "images")
            if channels is not None and channels != data.channels:
                raise ConfigurationError(f"{channels} input channels conflict with {dataset_name}'s "
                                         f"{data.channels}-channel images")
            if labels is not None and len(labels) != len(data.classes):
                raise ConfigurationError(f"{len(labels)} labels but {dataset_name} has {len(data.classes)} classes")
            size, channels = size or data.size, channels or data.channels
            labels = labels or tuple(data.classes)
        missing = [name for name, value in (("input size", size), ("channels", channels), ("labels", labels),
                                             ("mean", self.mean), ("std", self.std)) if value is None]
        if missing:
            hint = ""
            if data is not None and ("mean" in missing or "std" in missing):
                mean, std = data.mean_std()
                hint = f" ({dataset_name}'s own training images: mean {mean}, std {std})"
            raise ConfigurationError(
                f"the model's {', '.join(missing)} unknown: give them as flags (--input-size, --channels, --labels, "
                f"--mean, --std), in the model's {ATTRIBUTE}, or with a dataset (--data); the normalisation is the "
                f"one the model was trained with{hint}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != channels:
                raise ConfigurationError(f"{len(values)} {name} values for {channels} channels")
        return ResolvedMetadata(size, channels, [float(v) for v in self.mean], [float(v) for v in self.std],
                                [str(v) for v in labels], self.fit or DEFAULT_FIT)


@dataclass(frozen=True)
class ResolvedMetadata:
    """Metadata with every field the manifest needs."""

    input_size: int
    channels: int
    mean: list[float]
    std: list[float]
    labels: list[str]
    # crop: the built-in families' Fashion-MNIST items sit centred on black with a margin, so
    # the centre square of a 4:3 photo holds the item at the scale the model learnt it;
    # padding would shrink it and squashing would distort it (BENCHMARKS.md, photos)
    fit: str = "crop"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.input_size, self.input_size)


def _differ(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return any(_differ(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) > 1e-9
    return a != b
