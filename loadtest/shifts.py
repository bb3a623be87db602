"""Distribution shifts applied to images, for the monitoring benchmark.

Each shift takes uint8 N x H x W x C images and a seeded generator and returns images of
the same shape: what a drifting stream looks like to a Fashion-MNIST model (sensor noise,
a washed-out camera, focus, an inverted background, occlusion, heavy compression). Pure
NumPy and Pillow, seeded, so a benchmark run is reproducible.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _clip(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def gaussian_noise(sigma: float) -> Shift:
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _clip(images.astype(np.float64) + rng.normal(0.0, sigma, images.shape))
    return shift


def contrast(factor: float) -> Shift:
    """Pixels pulled toward each image's mean by ``factor`` (1: unchanged)."""
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = images.astype(np.float64)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return _clip(mean + (x - mean) * factor)
    return shift


def _per_image(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(images)
    for i, array in enumerate(images):
        mode = "L" if array.shape[2] == 1 else "RGB"
        result = np.asarray(fn(Image.fromarray(array.squeeze(2) if mode == "L" else array, mode)), dtype=np.uint8)
        out[i] = result[..., None] if result.ndim == 2 else result
    return out


def blur(radius: float) -> Shift:
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _per_image(images, lambda img: img.filter(ImageFilter.GaussianBlur(radius)))
    return shift


def inverted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - images


def occlusion(fraction: float = 0.4) -> Shift:
    """A mid-grey square covering ``fraction`` of each image's side, at a random place."""
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = images.copy()
        _, height, width, _ = images.shape
        side = max(1, round(min(height, width) * fraction))
        for image in out:
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            image[top:top + side, left:left + side] = 128
        return out
    return shift


def jpeg(quality: int) -> Shift:
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        def recompress(img: Image.Image) -> Image.Image:
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=quality)
            return Image.open(io.BytesIO(buffer.getvalue())).convert(img.mode)
        return _per_image(images, recompress)
    return shift


def gradual(target: Shift) -> Shift:
    """From clean to ``target`` over the stream: image ``i`` of ``n`` is shifted with
    probability ``i / n`` (a mix whose shifted share grows linearly)."""
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(images)
        shifted = target(images, rng)
        chosen = rng.random(n) < np.arange(n) / max(n - 1, 1)
        return np.where(chosen[:, None, None, None], shifted, images)
    return shift


def identity(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images


SHIFTS: dict[str, Shift] = {
    "clean": identity,
    "noise_40": gaussian_noise(40),
    "noise_80": gaussian_noise(80),
    "contrast_0.3": contrast(0.3),
    "blur_1.2": blur(1.2),
    "inverted": inverted,
    "occlusion_0.4": occlusion(0.4),
    "jpeg_10": jpeg(10),
    "gradual_noise_80": gradual(gaussian_noise(80)),
}
