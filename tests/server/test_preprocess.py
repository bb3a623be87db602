"""Decoding: EXIF orientation is applied from every container that carries it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from exitserve.server.preprocess import decode_image
from exitserve.repository.format import InputSpec

SPEC = InputSpec(channels=1, size=28, mean=[0.5], std=[0.5])
ROTATE_90_CW = 6  # EXIF orientation: the stored pixels must turn 90 degrees clockwise to display


def left_bright(width: int = 28, height: int = 28) -> Image.Image:
    pixels = np.zeros((height, width), np.uint8)
    pixels[:, : width // 2] = 255
    return Image.fromarray(pixels)


def encoded(img: Image.Image, fmt: str, orientation: int | None) -> bytes:
    buf = io.BytesIO()
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **extra, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    plain = decode_image(encoded(left_bright(), fmt, None), SPEC, 10**6)[..., 0].astype(float)
    assert plain[:, :10].mean() > 200 and plain[:, 18:].mean() < 50  # stored as is: bright left half
    turned = decode_image(encoded(left_bright(), fmt, ROTATE_90_CW), SPEC, 10**6)[..., 0].astype(float)
    assert turned[:10].mean() > 200 and turned[18:].mean() < 50  # left turned clockwise is the top
