"""Untrusted uploads to the model's normalized input: encoded images, raw pixels, or tensors
that claim to be normalized already.

Small images are converted inline (cheaper than a thread hop), larger ones off the event
loop, and images over a megapixel a bounded number at a time, so a burst of large uploads
cannot multiply memory or starve the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np

from exitserve.repository.format import InputSpec
from exitserve.server.errors import BadImage, ImageTooLarge, InvalidInput
from exitserve.server.preprocess import LARGE_IMAGE_PIXELS, array_to_pixels, open_image, to_pixels

INLINE_DECODE_BYTES = 32 * 1024


class ImageDecoder:
    def __init__(self, max_large_decodes: int, inline_decode_bytes: int = INLINE_DECODE_BYTES) -> None:
        self._large = asyncio.Semaphore(max_large_decodes)
        self.inline_decode_bytes = inline_decode_bytes
        self.large_running = 0
        self.large_peak = 0  # the most large conversions seen at once (tests check the bound)

    async def _convert(self, convert: Callable[[], np.ndarray], pixels: int, nbytes: int) -> np.ndarray:
        if pixels > LARGE_IMAGE_PIXELS:
            async with self._large:
                self.large_running += 1
                self.large_peak = max(self.large_peak, self.large_running)
                try:
                    return await asyncio.to_thread(convert)
                finally:
                    self.large_running -= 1
        if nbytes > self.inline_decode_bytes:
            return await asyncio.to_thread(convert)
        return convert()

    async def decode(self, data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
        """One encoded image -> normalized C x H x W. The header first (refuses bombs and
        images over ``max_pixels`` before decoding), then the pixels. Raises ``BadImage``
        (one of its kinds) for anything that is not a usable image."""
        img = open_image(data, max_pixels, spec)
        pixels = await self._convert(lambda: to_pixels(img, spec), img.width * img.height, len(data))
        return spec.normalize(pixels[None])[0]

    async def decode_all(self, blobs: Sequence[bytes], spec: InputSpec,
                         max_pixels: int) -> list[np.ndarray | BadImage]:
        """Every image, each its array or the ``BadImage`` that says why not; any other
        failure raises."""
        decoded = await asyncio.gather(*(self.decode(b, spec, max_pixels) for b in blobs), return_exceptions=True)
        for outcome in decoded:
            if isinstance(outcome, BaseException) and not isinstance(outcome, BadImage):
                raise outcome
        return decoded  # type: ignore[return-value]

    async def from_pixels(self, pixels: np.ndarray, spec: InputSpec, max_pixels: int) -> np.ndarray:
        """Raw uint8 pixels N x H x W x C -> normalized N x C x H x W, under the same pixel
        limit, conversion and normalization as decoded images."""
        _, height, width, _ = pixels.shape
        if height < 1 or width < 1:
            raise InvalidInput(f"pixels of {height} x {width} hold no image")
        if height * width > max_pixels:
            raise ImageTooLarge(f"{width}x{height} is over the limit of {max_pixels} pixels")
        converted = await self._convert(lambda: np.stack([array_to_pixels(p, spec) for p in pixels]),
                                        height * width, pixels.nbytes)
        return spec.normalize(converted)

    @staticmethod
    def check_normalized(tensor: np.ndarray, spec: InputSpec, model: str) -> np.ndarray:
        """An already normalized N x C x H x W batch, checked against the model's input
        (shape, finite values) and cast to the dtype stage 0 takes."""
        expected = (spec.channels, spec.size, spec.size)
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected:
            raise InvalidInput(f"{model} takes normalized images of shape [N, {', '.join(map(str, expected))}] "
                               f"(N x C x H x W), got {list(tensor.shape)}")
        if not np.isfinite(tensor).all():
            raise InvalidInput("normalized images must be finite (no NaN or infinity)")
        return np.ascontiguousarray(tensor, dtype=spec.dtype)


