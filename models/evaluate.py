"""Per-exit accuracy of a multi-exit model on a dataset."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from exitserve.models.data import ImageDataset
from exitserve.models.preprocess import Preprocessing


@torch.no_grad()
def exit_logits(
    model: nn.Module, data: ImageDataset, prep: Preprocessing, batch_size: int = 500, progress: bool = False
) -> list[np.ndarray]:
    """Every exit's logits for every image: a list (one per exit) of N x classes arrays."""
    was_training = model.training
    model.eval()
    chunks: list[list[np.ndarray]] = []
    try:
        starts = range(0, len(data), batch_size)
        for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
            batch = prep.normalize(data.images[start : start + batch_size])
            chunks.append([logits.numpy() for logits in model(batch)])
    finally:
        model.train(was_training)
    return [np.concatenate(per_exit) for per_exit in zip(*chunks)]


def exit_accuracies(
    model: nn.Module, data: ImageDataset, prep: Preprocessing, batch_size: int = 500, progress: bool = False
) -> list[float]:
    """Fraction of images each exit classifies correctly."""
    return [
        float((logits.argmax(1) == data.labels).mean())
        for logits in exit_logits(model, data, prep, batch_size, progress)
    ]
