"""Image decoding to the manifest's input size and channels (Pillow + NumPy).

Normalization is the repository contract's (``InputSpec.normalize``); this module only
turns untrusted bytes into pixels, or a ``BadImage`` error saying why not.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from exitserve.repository.format import InputSpec
from exitserve.repository.preprocessing import decoded_size_needed, to_eight_bit
from exitserve.server.errors import CorruptImage, EmptyImage, ImageTooLarge, InvalidInput, NotAnImage

MIN_MODEL_SIDE = 2048
SIDE_FACTOR = 64
LARGE_IMAGE_PIXELS = 1_000_000  # decoded off the event loop, a bounded number at once
PIXEL_CHANNELS = (1, 3, 4)  # raw uint8 pixels: grey, RGB, RGBA (Pillow's L, RGB, RGBA)


def _may_carry_orientation(img) -> bool:
    """EXIF lives in ``info`` (JPEG, PNG eXIf, WebP), in PNG text chunks, or in TIFF tags."""
    return "exif" in img.info or "Raw profile type exif" in img.info or img.format == "TIFF"


def model_max_pixels(input_size: int, ceiling: int) -> int:
    """A model's own pixel limit: images up to ``max(2048, 64 x input side)`` on each side
    (by area), never over the server-wide ``ceiling``. A 28x28 model has no use for a
    40-megapixel upload, and each one decoded costs 160 MB of RGBA."""
    side = max(MIN_MODEL_SIDE, SIDE_FACTOR * input_size)
    return min(ceiling, side * side)


def open_image(data: bytes, max_pixels: int, spec: InputSpec | None = None) -> Image.Image:
    """Parse the header only, and refuse empty, unknown and corrupt images before any pixel
    is decoded. A JPEG is set to decode at the smallest of its built-in scales (1/2, 1/4,
    1/8) that still covers what ``spec`` keeps of it (``Image.draft``): a 12-megapixel photo
    decodes to about 500 x 375 for a 28 x 28 model. The pixel limit then guards what will
    actually be decoded; any other format is decoded at its full size, so a header that
    declares more than ``max_pixels`` is refused as it stands (decompression bombs)."""
    if not data:
        raise EmptyImage("the upload is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise NotAnImage("the upload is not an image format Pillow can decode") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image is over the limit of {max_pixels} pixels") from None
    except Exception as exc:  # malformed headers raise many types
        raise CorruptImage(f"unreadable image header ({exc})") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise CorruptImage(f"image has no pixels ({width}x{height})")
    if spec is not None and img.format == "JPEG":
        try:
            img.draft(_mode(spec), decoded_size_needed(width, height, spec.size, spec.fit, spec.crop_fraction))
        except Exception as exc:
            raise CorruptImage(f"unreadable JPEG ({exc})") from None
    decoded_width, decoded_height = img.size
    if decoded_width * decoded_height > max_pixels:
        decodes = "" if img.size == (width, height) else f" (decoded at {decoded_width}x{decoded_height})"
        raise ImageTooLarge(f"{width}x{height}{decodes} is over the limit of {max_pixels} pixels")
    return img


def _mode(spec: InputSpec) -> str:
    return "L" if spec.channels == 1 else "RGB"


def to_pixels(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Decode an opened image to uint8 H x W x C at the model's size and channels: EXIF
    orientation applied, deep images scaled to 8 bits, transparency on white, then fitted as
    the manifest says (``fit_image``: crop, squash or pad)."""
    try:
        img.load()
        if _may_carry_orientation(img):  # parsing EXIF costs more than decoding a small PNG
            img = ImageOps.exif_transpose(img)
        img = to_eight_bit(img)
        mode = _mode(spec)
        if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert(mode)
        img = spec.geometry.apply(img, spec.size)
        pixels = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError:
        raise ImageTooLarge("the decoded image is over the pixel limit") from None
    except Exception as exc:  # truncated or corrupt pixel data
        raise CorruptImage(f"the image data is truncated or corrupt ({exc})") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


def decode_image(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 H x W x C at the model's size and channels (``open_image`` then
    ``to_pixels``)."""
    return to_pixels(open_image(data, max_pixels, spec), spec)


def array_to_pixels(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Raw uint8 pixels (H x W x C, C in 1, 3, 4) -> uint8 H x W x C at the model's size and
    channels, through the same conversion as a decoded image (``to_pixels``): the same
    pixels sent as a PNG or as a tensor get the same answer. Pixels already at the model's
    size and channels are used as they are (what ``to_pixels`` would return)."""
    height, width, channels = pixels.shape
    if (height, width, channels) == (spec.size, spec.size, spec.channels):
        return pixels
    if channels not in PIXEL_CHANNELS:
        raise InvalidInput(f"pixels need 1, 3 or 4 channels (grey, RGB, RGBA), got {channels}")
    plane = pixels[..., 0] if channels == 1 else pixels  # Pillow's mode follows the array's shape
    return to_pixels(Image.fromarray(np.ascontiguousarray(plane)), spec)
