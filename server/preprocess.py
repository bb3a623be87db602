"""Image decoding and normalization from the manifest's input spec (Pillow + NumPy)."""

from __future__ import annotations

import numpy as np

from server.repository import InputSpec


def normalize(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 N x H x W x C -> N x C x H x W in the model's dtype, standardized."""
    batch = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(((batch - mean) / std).astype(spec.dtype))


class ImageError(Exception):
    """An upload that is not a usable image; carries the HTTP status and error code."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _may_carry_orientation(img) -> bool:
    """EXIF lives in ``info`` (JPEG, PNG eXIf, WebP), in PNG text chunks, or in TIFF tags."""
    return "exif" in img.info or "Raw profile type exif" in img.info or img.format == "TIFF"


def decode_image(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 H x W x C at the model's size and channels.

    The pixel count is read from the header and refused before any pixel is decoded
    (decompression bombs); EXIF orientation is applied; resizing follows the manifest.
    """
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(422, "empty_file", "the upload is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(415, "not_an_image", "the upload is not an image format Pillow can decode") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(413, "image_too_large", str(exc)) from None
    except Exception as exc:  # malformed headers raise many types
        raise ImageError(422, "corrupt_image", f"unreadable image header ({exc})") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(422, "corrupt_image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(413, "image_too_large", f"{width}x{height} is over the limit of {max_pixels} pixels")
    try:
        img.load()
        if _may_carry_orientation(img):  # parsing EXIF costs more than decoding a small PNG
            img = ImageOps.exif_transpose(img)
        mode = "L" if spec.channels == 1 else "RGB"
        if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert(mode)
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
            spec.resize, Image.BILINEAR
        )
        if img.size != (spec.size, spec.size):
            img = img.resize((spec.size, spec.size), resample)
        pixels = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ImageError(413, "image_too_large", str(exc)) from None
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageError(422, "corrupt_image", f"the image data is truncated or corrupt ({exc})") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels
