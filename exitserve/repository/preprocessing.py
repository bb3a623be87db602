"""Images to the tensor stage 0 takes: the one geometry (``fit_image``, Pillow) and the one
normalization (``normalize``, NumPy).

Training (through ``models.preprocess``), export, calibration and serving all call this,
with the mean and std the checkpoint carries and the manifest repeats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
              dtype: str | np.dtype = np.float32) -> np.ndarray:
    """uint8 N x H x W x C -> N x C x H x W, scaled to [0, 1] then standardized per channel."""
    batch = np.asarray(images).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)  # N x C x H x W
    mean_ = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(((batch - mean_) / std_).astype(dtype, copy=False))


Fit = Literal["crop", "squash", "pad"]
REDUCING_GAP = 3.0
RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
              "lanczos": Image.LANCZOS, "box": Image.BOX}


def fit_box(width: int, height: int, fit: Fit, crop_fraction: float = 1.0) -> tuple[float, float, float, float]:
    """The region of a ``width`` x ``height`` image that becomes the model's square: for "crop"
    the centred square of side ``crop_fraction`` x the shorter side (resizing the shorter side
    to size / crop_fraction and cropping the centre, in one step), else the whole image."""
    if fit != "crop":
        return (0.0, 0.0, float(width), float(height))
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def decoded_size_needed(width: int, height: int, size: int, fit: Fit, crop_fraction: float = 1.0) -> tuple[int, int]:
    """The smallest whole-image size that still gives ``fit`` at least ``size`` pixels across
    what it keeps: what a JPEG may be decoded at (``Image.draft``) instead of its full size."""
    if fit == "squash":
        return (min(width, size), min(height, size))
    scale = size / (min(width, height) * crop_fraction) if fit == "crop" else size / max(width, height)
    return (min(width, math.ceil(width * scale)), min(height, math.ceil(height * scale)))


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_eight_bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey images scaled to 8 bits, not clipped: 16-bit modes (``I;16``
    and ``I``, which holds 16-bit PNG and TIFF data) divided by 257, so 65535 is 255;
    floating point (``F``) read as 0 to 1. Pillow's own ``convert("L")`` clips them, which
    turns a 16-bit photo black and white. Other modes as they are (Pillow reads 16-bit RGB
    PNGs as 8-bit RGB already)."""
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        values = np.asarray(img, dtype=np.float64) / 257.0
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0) * 255.0
    else:
        return img
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


@dataclass(frozen=True)
class Geometry:
    """How an image of any shape becomes the model's square (the manifest's ``input``)."""

    fit: Fit = "crop"
    crop_fraction: float = 1.0
    background: tuple[int, ...] | None = None
    resample: str = "lanczos"

    def apply(self, img: Image.Image, size: int) -> Image.Image:
        return fit_image(img, size, self.fit, crop_fraction=self.crop_fraction, background=self.background,
                         resample=self.resample)


def fit_image(img: Image.Image, size: int, fit: Fit = "crop", *, crop_fraction: float = 1.0,
              background: Sequence[int] | None = None, resample: str = "lanczos") -> Image.Image:
    """``img`` (already in the model's mode) as the model's ``size`` x ``size`` square: the one
    geometry the server serves with and calibration and the parity gate's image folders are
    loaded with, so what is calibrated is what is served."""
    width, height = img.size
    if (width, height) == (size, size):
        return img
    filter_ = RESAMPLING.get(resample, Image.LANCZOS)
    if fit != "pad":
        # reducing_gap: a large reduction first shrinks by a whole factor with a box filter
        # (fast), then resamples the last 3x or less with the filter, as Pillow's thumbnail does
        return img.resize((size, size), filter_, box=fit_box(width, height, fit, crop_fraction),
                          reducing_gap=REDUCING_GAP)
    scale = size / max(width, height)
    inner = (max(1, round(width * scale)), max(1, round(height * scale)))
    colour = tuple(background) if background is not None else (0,) * len(img.getbands())
    canvas = Image.new(img.mode, (size, size), colour[0] if len(colour) == 1 else colour)
    scaled = img.resize(inner, filter_, reducing_gap=REDUCING_GAP)
    canvas.paste(scaled, ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas
