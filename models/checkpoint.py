"""Checkpoints carry everything needed to rebuild and use a model.

In memory a checkpoint is a :class:`Checkpoint`: ``model`` (registered name), ``config``
(builder arguments), ``state_dict``, ``labels``, ``preprocessing`` (a
:class:`~models.preprocess.Preprocessing`), ``exits`` (one :class:`ExitRecord` per exit:
cost and measured accuracy), ``dataset`` and ``training``. On disk it is the plain dict
of :meth:`Checkpoint.to_dict` (``format`` plus those keys), so files load without this
module's classes. Resume state (optimizer, scheduler, RNG) lives in a side file, a plain
dict written by :func:`save_resume_state`, so the released weights stay small.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exitserve.errors import ExitserveError
from exitserve.models.cost import ExitCost
from exitserve.models.preprocess import Preprocessing
from exitserve.models.registry import create_model

CHECKPOINT_FORMAT = "exitserve-checkpoint/1"
REQUIRED_KEYS = ("model", "config", "state_dict", "labels", "preprocessing", "exits")


class CheckpointError(ExitserveError, ValueError):
    """A file is not a usable exitserve checkpoint."""


@dataclass(frozen=True)
class ExitRecord(ExitCost):
    """One exit as trained: its cost and its measured accuracy."""

    holdout_accuracy: float | None = None
    test_accuracy: float | None = None  # None until the final checkpoint of a run

    @classmethod
    def from_cost(cls, cost: ExitCost, holdout_accuracy: float | None, test_accuracy: float | None) -> ExitRecord:
        return cls(**cost.to_dict(), holdout_accuracy=holdout_accuracy, test_accuracy=test_accuracy)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExitRecord:
        return cls(**values)


@dataclass(eq=False)  # == would compare the state dicts' tensors, which has no single answer
class Checkpoint:
    model: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    preprocessing: Preprocessing
    exits: list[ExitRecord]
    dataset: dict[str, Any] = field(default_factory=dict)  # name and split sizes
    training: dict[str, Any] = field(default_factory=dict)  # config, history, parent, ...

    @property
    def dataset_name(self) -> str:
        try:
            return self.dataset["name"]
        except KeyError:
            raise CheckpointError("checkpoint does not record its dataset's name") from None

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form (the tensors are shared, not copied)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model,
            "config": self.config,
            "state_dict": self.state_dict,
            "labels": self.labels,
            "preprocessing": self.preprocessing.to_dict(),
            "exits": [e.to_dict() for e in self.exits],
            "dataset": self.dataset,
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Checkpoint:
        """Validate the on-disk form; ``CheckpointError`` says what is wrong."""
        if not isinstance(raw, Mapping) or raw.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not an exitserve checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        for key in REQUIRED_KEYS:
            if key not in raw:
                raise CheckpointError(f"checkpoint lacks {key!r}")
        try:
            preprocessing = Preprocessing.from_dict(raw["preprocessing"])
        except (TypeError, AttributeError) as exc:
            raise CheckpointError(f"malformed 'preprocessing' ({exc})") from exc
        try:
            exits = [ExitRecord.from_dict(e) for e in raw["exits"]]
        except (TypeError, AttributeError) as exc:
            raise CheckpointError(f"malformed 'exits' ({exc})") from exc
        return cls(
            model=raw["model"],
            config=raw["config"],
            state_dict=raw["state_dict"],
            labels=list(raw["labels"]),
            preprocessing=preprocessing,
            exits=exits,
            dataset=raw.get("dataset", {}),
            training=raw.get("training", {}),
        )


def _atomic_save(obj: Any, path: Path) -> None:
    """Write atomically so an interrupted run never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _torch_load(path: Path, what: str, weights_only: bool) -> Any:
    """``torch.load`` on the CPU, a missing or unreadable file a ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # torch.load raises many types on garbage
        kind = "a PyTorch state dict" if weights_only else "a PyTorch checkpoint"
        raise CheckpointError(f"{path}: not {kind} ({exc})") from exc


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    _atomic_save(checkpoint.to_dict(), Path(path))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    raw = _torch_load(path, "checkpoint", weights_only=False)
    try:
        return Checkpoint.from_dict(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc.__cause__


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """The training side file (optimizer, scheduler, EMA, history): a plain dict."""
    _atomic_save(state, Path(path))


def load_resume_state(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the model through the registry and load its weights strictly, in eval mode."""
    model = create_model(checkpoint.model, **checkpoint.config)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model.eval()


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict saved with ``torch.save(model.state_dict(), path)`` (or a dict
    holding one under ``state_dict``), as a user's own training writes it; loaded with
    ``weights_only`` (no code runs), ``module.`` prefixes dropped."""
    path = Path(path)
    raw = _torch_load(path, "weights file", weights_only=True)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a state dict (parameter name -> tensor), "
                              "as torch.save(model.state_dict(), path) writes")
    return strip_module_prefix(dict(raw))


def load_weights_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``load_state_dict`` strictly, with a message that names the file and the first keys
    that do not match (the usual mistake: weights of another architecture or config)."""
    result = module.state_dict()
    missing = [k for k in result if k not in state_dict]
    unexpected = [k for k in state_dict if k not in result]
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # same keys, other shapes
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: {exc}") from exc


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` checkpoints carry."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
