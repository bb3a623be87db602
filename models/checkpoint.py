"""Checkpoints carry everything needed to rebuild and use a model.

A checkpoint is a dict with ``format``, ``model`` (registered name), ``config`` (builder
arguments), ``state_dict``, ``labels``, ``preprocessing`` (channels, size, mean, std,
layout), ``exits`` (per-exit cost and measured accuracy), ``dataset`` and ``training``.
Resume state (optimizer, scheduler, RNG) lives in a side file so the released weights
stay small.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import create_model

CHECKPOINT_FORMAT = "exitserve-checkpoint/1"


class CheckpointError(ValueError):
    """A file is not a usable exitserve checkpoint."""


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically so an interrupted run never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many types on garbage
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({exc})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an exitserve checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    for key in ("model", "config", "state_dict", "labels", "preprocessing", "exits"):
        if key not in checkpoint:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the model through the registry and load its weights strictly, in eval mode."""
    model = create_model(checkpoint["model"], **checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` checkpoints carry."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
