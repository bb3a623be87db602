"""uint8 pixels to the tensor stage 0 takes: the one normalization, in NumPy.

Training (through ``models.preprocess``), export, calibration and serving all call this,
with the mean and std the checkpoint carries and the manifest repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
              dtype: str | np.dtype = np.float32) -> np.ndarray:
    """uint8 N x H x W x C -> N x C x H x W, scaled to [0, 1] then standardized per channel."""
    batch = np.asarray(images).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)  # N x C x H x W
    mean_ = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(((batch - mean_) / std_).astype(dtype, copy=False))
