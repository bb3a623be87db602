"""Real Fashion-MNIST test images encoded as PNG and JPEG, and malformed uploads."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from exitserve.loadtest.images import encode_image as encode
from exitserve.models.data import load_splits


def fashion_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    test = load_splits("fashion-mnist").test
    return test.images[:count], test.labels[:count]


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
