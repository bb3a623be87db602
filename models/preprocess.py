"""Turn uint8 N x H x W x C batches into normalized N x C x H x W float tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Preprocessing:
    channels: int
    size: int
    mean: list[float]
    std: list[float]
    layout: str = "NCHW"
    resize: str = "bilinear-to-size"  # the server resizes any upload to size x size

    def to_dict(self) -> dict:
        return asdict(self)

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C -> float N x C x H x W, scaled to [0, 1] then standardized."""
        batch = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (batch - mean) / std
