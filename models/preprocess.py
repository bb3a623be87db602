"""Turn uint8 N x H x W x C batches into normalized N x C x H x W float tensors.

The arithmetic is :func:`exitserve.repository.preprocessing.normalize` (NumPy), the one
normalization that export, calibration and serving apply too; this wrapper only hands
the result to PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from exitserve.repository.preprocessing import normalize

# written by older checkpoints, never read: the layout is always NCHW and the server owns
# the resize filter (the manifest's ``input.resize``)
_LEGACY_KEYS = ("layout", "resize")


@dataclass(frozen=True)
class Preprocessing:
    channels: int
    size: int
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Preprocessing":
        """Read a checkpoint's ``preprocessing``; the ``layout`` and ``resize`` keys of
        older checkpoints are ignored, any other unknown key is a ``TypeError``."""
        return cls(**{k: v for k, v in values.items() if k not in _LEGACY_KEYS})

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C -> float32 N x C x H x W, scaled to [0, 1] then standardized."""
        if isinstance(images, torch.Tensor):
            images = images.numpy(force=True)
        return torch.from_numpy(normalize(images, self.mean, self.std, np.float32))
