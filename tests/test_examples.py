"""The sample uploads in examples/images/ (scripts/make_example_images.py): they are what the
script makes from the Fashion-MNIST test set, the server decodes them to the test images they
came from, and the README's examples name files that exist."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exitserve.models.data import ImageDataset, load_splits
from exitserve.repository.format import InputSpec
from exitserve.server.preprocess import decode_image
from tests.support.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SPEC = InputSpec(channels=1, size=28, mean=[0.5], std=[0.5])  # the committed models' input
MAX_PIXELS = 40_000_000
PHOTO_MEAN_ERROR = 8.0  # a JPEG photo, fitted back to 28x28, differs from its item by about 3 grey levels


script = load_script("make_example_images")


@pytest.fixture(scope="module")
def fashion_test() -> ImageDataset:
    return load_splits("fashion-mnist").test


@pytest.fixture(scope="module")
def fresh() -> dict[str, bytes]:
    return script.example_images()


def pixels(data: bytes) -> tuple[str, tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, image.size, np.asarray(image)


def decoded(name: str) -> np.ndarray:
    """The file as the server decodes it for the committed models: 28x28 grey uint8."""
    return decode_image((script.IMAGES_DIR / name).read_bytes(), SPEC, MAX_PIXELS)[..., 0]


def classes_of(fashion_test: ImageDataset, image: np.ndarray) -> set[str]:
    """The classes of the test images equal to ``image``."""
    same = np.flatnonzero((fashion_test.images[..., 0] == image).all(axis=(1, 2)))
    return {fashion_test.classes[fashion_test.labels[i]] for i in same}


def test_the_committed_images_are_what_the_script_makes(fresh: dict[str, bytes]) -> None:
    assert sorted(p.name for p in script.IMAGES_DIR.iterdir()) == sorted(fresh)
    for name, data in fresh.items():
        committed = (script.IMAGES_DIR / name).read_bytes()
        if committed == data:
            continue
        # another Pillow or zlib may encode differently: the pixels must still be the same
        (mode, size, old), (new_mode, new_size, new) = pixels(committed), pixels(data)
        assert (mode, size) == (new_mode, new_size), name
        tolerance = 1.0 if name.endswith(".jpg") else 0.0
        error = float(np.abs(old.astype(int) - new.astype(int)).mean())
        assert error <= tolerance, f"{name} differs by {error:.2f} levels: run `python scripts/make_example_images.py`"


def test_the_images_are_what_their_names_say(fashion_test: ImageDataset) -> None:
    formats = {name: pixels((script.IMAGES_DIR / name).read_bytes())[:2] for name in script.example_images()}
    assert formats == {"shoe.png": ("L", (28, 28)), "trouser.png": ("L", (28, 28)),
                       "photo_640x480.jpg": ("RGB", (640, 480)), "deep_16bit.png": ("I;16", (28, 28))}
    assert all((script.IMAGES_DIR / name).stat().st_size < 20_000 for name in formats)
    shoe = decoded("shoe.png")
    assert classes_of(fashion_test, shoe) & set(script.SHOE_CLASSES)
    assert "Trouser" in classes_of(fashion_test, decoded("trouser.png"))
    assert np.array_equal(decoded("deep_16bit.png"), shoe)  # 16 bits scaled back to 8 exactly
    photo_error = np.abs(decoded("photo_640x480.jpg").astype(int) - shoe.astype(int)).mean()
    assert photo_error < PHOTO_MEAN_ERROR


def test_the_readme_examples_name_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    uploads = re.findall(r"@([\w./-]+\.(?:png|jpe?g))", readme) + re.findall(r'open\("([^"]+)", "rb"\)', readme)
    assert uploads, "the README posts no image"
    missing = [path for path in uploads if not (ROOT / path).is_file()]
    assert not missing, f"the README's examples post files a fresh clone lacks: {missing}"
