"""Real Fashion-MNIST test images, encoded as clients send them (benchmark, Locust, tests)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_image(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 H x W x C pixels -> PNG (or JPEG at quality 95, WEBP, TIFF, ...) bytes."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def encoded_test_images(count: int, fmt: str = "PNG") -> tuple[list[bytes], np.ndarray]:
    """The first ``count`` Fashion-MNIST test images, encoded, and their labels."""
    from exitserve.models.data import load_splits

    test = load_splits("fashion-mnist").test
    return [encode_image(p, fmt) for p in test.images[:count]], test.labels[:count]
