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


# ---------------------------------------------------------------------------- photos (issue 26)

from exitserve.repository.preprocessing import decoded_size_needed, fit_image  # noqa: E402
from exitserve.server.errors import ImageTooLarge  # noqa: E402
from exitserve.server.preprocess import open_image  # noqa: E402
from tests.support.images import fashion_images  # noqa: E402

MODEL_LIMIT = 2048 * 2048  # the 28 x 28 models' own pixel limit


def photo(item: np.ndarray, width: int, height: int, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """A 28 x 28 grey item scaled to the frame's height, centred in a black 4:3 RGB frame."""
    side = height
    frame = Image.new("RGB", (width, height))
    frame.paste(Image.fromarray(item[..., 0]).resize((side, side), Image.BICUBIC).convert("RGB"),
                ((width - side) // 2, 0))
    buf = io.BytesIO()
    frame.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def spec(fit: str) -> InputSpec:
    return SPEC.model_copy(update={"fit": fit})


def test_a_4_3_photo_is_cropped_to_its_centre_not_squashed() -> None:
    images, _ = fashion_images(8)
    for item in images:
        original = item[..., 0].astype(float)
        upload = photo(item, 640, 480, "PNG")
        cropped = decode_image(upload, spec("crop"), MODEL_LIMIT)[..., 0].astype(float)
        squashed = decode_image(upload, spec("squash"), MODEL_LIMIT)[..., 0].astype(float)
        crop_error, squash_error = np.abs(cropped - original).mean(), np.abs(squashed - original).mean()
        assert crop_error < 20  # the item back at its own scale (blurred by the round trip)
        assert squash_error > 1.5 * crop_error


def test_pad_letterboxes_with_the_background() -> None:
    wide = Image.new("L", (56, 28), 255)
    padded = np.asarray(fit_image(wide, 28, "pad", background=[7]))
    assert padded.shape == (28, 28)
    assert (padded[:7] == 7).all() and (padded[-7:] == 7).all() and (padded[8:20] == 255).all()
    cropped = np.asarray(fit_image(wide, 28, "crop"))
    assert (cropped == 255).all()


def test_crop_fraction_keeps_the_centre_like_torchvision() -> None:
    """Resize(size / f) then CenterCrop(size), in one step: a border of (1 - f) / 2 drops."""
    pixels = np.zeros((100, 100), np.uint8)
    pixels[10:90, 10:90] = 255
    fitted = np.asarray(fit_image(Image.fromarray(pixels), 40, "crop", crop_fraction=0.8, resample="nearest"))
    assert (fitted == 255).all()  # the 80 x 80 centre was kept, the dark border cropped away


def test_a_large_jpeg_decodes_at_a_reduced_scale_and_is_served() -> None:
    images, _ = fashion_images(1)
    upload = photo(images[0], 4000, 3000)
    img = open_image(upload, MODEL_LIMIT, SPEC)
    assert img.size == (500, 375)  # 1/8: still over 28 on the shorter side
    assert img.size[0] * img.size[1] < 4000 * 3000 / 60
    pixels = decode_image(upload, SPEC, MODEL_LIMIT)[..., 0].astype(float)
    assert np.abs(pixels - images[0][..., 0]).mean() < 8


def test_the_same_photo_as_png_is_refused_from_its_header() -> None:
    """Only JPEG decodes at a reduced scale: other formats are decoded whole, so their
    header's size is what the limit guards."""
    big = Image.new("L", (4000, 3000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(ImageTooLarge, match="4000x3000"):
        open_image(buf.getvalue(), MODEL_LIMIT, SPEC)


def test_a_jpeg_too_large_even_at_an_eighth_is_refused() -> None:
    huge = Image.new("L", (20_000, 1_000))
    buf = io.BytesIO()
    huge.save(buf, format="JPEG")  # at 1/8 still 2500 x 125: over a tiny limit
    with pytest.raises(ImageTooLarge, match="decoded at"):
        open_image(buf.getvalue(), 100_000, SPEC)


@pytest.mark.parametrize("fit, width, height, wanted", [
    ("crop", 4000, 3000, (38, 29)), ("pad", 4000, 3000, (28, 21)), ("squash", 4000, 3000, (28, 28)),
    ("crop", 20, 10, (20, 10)),  # never more than the image has
])
def test_the_size_a_jpeg_must_decode_at(fit: str, width: int, height: int, wanted: tuple[int, int]) -> None:
    assert decoded_size_needed(width, height, 28, fit) == wanted


# ---------------------------------------------------------------------------- bit depths (issue 26)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgb48_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), by hand."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGB;16"])
def test_deep_images_are_scaled_to_8_bits_like_their_original(mode: str) -> None:
    """Test image 0 at 16 or 32 bits decodes to the pixels of its 8-bit original."""
    item = fashion_images(1)[0][0][..., 0]
    wide = item.astype(np.uint32)
    if mode == "I;16":
        upload = png_bytes(Image.fromarray((wide * 257).astype(np.uint16)))
    elif mode == "I":
        upload = png_bytes(Image.fromarray((wide * 257).astype(np.int32)), "TIFF")
    elif mode == "F":
        upload = png_bytes(Image.fromarray(item.astype(np.float32) / 255), "TIFF")
    else:
        upload = rgb48_png(np.repeat((wide * 257)[..., None], 3, axis=2))
    opened = Image.open(io.BytesIO(upload))
    assert opened.mode == {"RGB;16": "RGB"}.get(mode, mode)  # what Pillow hands over
    decoded = decode_image(upload, SPEC, MODEL_LIMIT)[..., 0].astype(int)
    assert np.abs(decoded - item.astype(int)).max() <= 1
