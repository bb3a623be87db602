"""Writes the README's sample uploads to examples/images/, from the Fashion-MNIST test set.

- ``shoe.png``: the first test image of a shoe class (Sandal, Sneaker or Ankle boot), 28x28 grey;
- ``trouser.png``: the first Trouser test image;
- ``photo_640x480.jpg``: the shoe as a photo, as ``loadtest.photos`` makes them (the item
  bicubic to the frame's height, centred in a black 4:3 RGB frame, JPEG quality 90);
- ``deep_16bit.png``: the shoe as 16-bit grey (value x 257, so 255 is 65535).

The same test set and Pillow give the same bytes: ``--check`` exits 1 naming each file that differs.

    python scripts/make_example_images.py [--check]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from exitserve.loadtest.images import encode_image
from exitserve.loadtest.photos import PHOTO_640, photo_jpeg
from exitserve.models.data import ImageDataset, load_splits

ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = ROOT / "examples" / "images"
SHOE_CLASSES = ("Sandal", "Sneaker", "Ankle boot")


def first_of(test: ImageDataset, classes: tuple[str, ...]) -> int:
    """Index of the first image whose class is one of ``classes``."""
    wanted = [test.classes.index(name) for name in classes]
    return int(np.flatnonzero(np.isin(test.labels, wanted))[0])


def sixteen_bit_png(pixels: np.ndarray) -> bytes:
    """uint8 H x W x 1 grey -> a 16-bit grey PNG of the same image (each value x 257)."""
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0].astype("<u2") * 257).save(buf, format="PNG")  # mode I;16
    return buf.getvalue()


def example_images() -> dict[str, bytes]:
    """File name -> encoded bytes, in the order the module docstring lists them."""
    test = load_splits("fashion-mnist").test
    shoe = test.images[first_of(test, SHOE_CLASSES)]
    trouser = test.images[first_of(test, ("Trouser",))]
    _, _, frame, side = PHOTO_640
    return {
        "shoe.png": encode_image(shoe),
        "trouser.png": encode_image(trouser),
        "photo_640x480.jpg": photo_jpeg(shoe, frame, side),
        "deep_16bit.png": sixteen_bit_png(shoe),
    }


def differing(folder: Path = IMAGES_DIR) -> list[str]:
    """The example files under ``folder`` that are missing or differ from a fresh encoding."""
    return [name for name, data in example_images().items()
            if not (folder / name).is_file() or (folder / name).read_bytes() != data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=IMAGES_DIR, help="folder to write (default: examples/images)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    args = parser.parse_args(argv)
    if args.check:
        stale = differing(args.out)
        for name in stale:
            print(f"{args.out / name} differs: run `python scripts/make_example_images.py`", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in example_images().items():
        (args.out / name).write_bytes(data)
        print(f"{args.out / name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
