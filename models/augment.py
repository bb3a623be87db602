"""Batch-wise augmentation on uint8 N x H x W x C tensors, vectorized (no per-image loop)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def random_crop(batch: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset."""
    if padding <= 0:
        return batch
    n, h, w, _ = batch.shape
    padded = torch.nn.functional.pad(batch, (0, 0, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # N x H x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # N x 1 x W
    return padded[torch.arange(n)[:, None, None], rows, cols]


def random_hflip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(2), batch)


def random_erasing(batch: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Zero a random rectangle (2-33% of the area, aspect 0.3-3.3) in a fraction of the images.

    Applied to the *normalized* float batch, so zero is the dataset mean.
    """
    if probability <= 0:
        return batch
    n, _, h, w = batch.shape
    area = torch.empty(n).uniform_(0.02, 0.33, generator=generator) * h * w
    log_ratio = torch.empty(n).uniform_(-1.2040, 1.2040, generator=generator)  # log(0.3)..log(3.3)
    eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h).long()
    ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w).long()
    y0 = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    x0 = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    inside_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # N x H
    inside_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # N x W
    chosen = torch.rand(n, generator=generator) < probability
    mask = inside_y[:, :, None] & inside_x[:, None, :] & chosen[:, None, None]  # N x H x W
    return batch.masked_fill(mask[:, None], 0.0)


def augmented_batches(images: torch.Tensor, order: torch.Tensor, steps: int, batch_size: int, padding: int,
                      hflip: bool, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's (indices, images randomly cropped and, with ``hflip``, flipped), taken in
    ``order``: one epoch of a training loop (``exitserve train`` and ``exitserve retrofit``)."""
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        batch = random_crop(images[idx], padding, generator)
        if hflip:
            batch = random_hflip(batch, generator)
        yield idx, batch
