"""Datasets as in-memory uint8 arrays: Fashion-MNIST (IDX gzip), CIFAR-10/100 (python
pickle batches) and an image-folder layout (``root/<class>/*.png|jpg``).

NumPy and Pillow only, so the exporter's calibration and the load-test harness can read
the same data without PyTorch.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from exitserve.errors import ExitserveError
from exitserve.repository.preprocessing import Geometry, to_eight_bit

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "image-folder")
HOLDOUT_SIZE = {"fashion-mnist": 5000, "cifar10": 5000, "cifar100": 5000}
SPLIT_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class DatasetError(ExitserveError, ValueError):
    """A data directory is missing or its files are malformed."""


@dataclass
class ImageDataset:
    """``images``: N x H x W x C uint8; ``labels``: N int64; ``split``: which split this
    is ("train", "holdout", "test" from :func:`load_splits`; "" when not from a split),
    so a consumer can record what it was actually given."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    split: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DatasetError(f"images must be N x H x W x C uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DatasetError("a label is outside the class list")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, indices: np.ndarray) -> "ImageDataset":
        return ImageDataset(self.images[indices], self.labels[indices], self.classes, self.split)

    def named(self, split: str) -> "ImageDataset":
        """The same images under another split name (no copy)."""
        return replace(self, split=split)

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of pixels scaled to [0, 1]."""
        pixels = self.images.reshape(-1, self.channels).astype(np.float64) / 255.0
        return pixels.mean(0).round(4).tolist(), pixels.std(0).round(4).tolist()


@dataclass
class DataSplits:
    """Train, held-out (threshold calibration) and official test sets."""

    name: str
    train: ImageDataset
    holdout: ImageDataset
    test: ImageDataset


# ----------------------------------------------------------------------------- IDX


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4:
        raise DatasetError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetError(f"{path}: IDX header says {expected} bytes of data, file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DatasetError(f"{root}: missing {stem}.gz (install Debian's dataset-fashion-mnist or pass --data-dir)")


def load_fashion_mnist_split(root: Path, train: bool) -> ImageDataset:
    prefix = "train" if train else "t10k"
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{root}: expected N x H x W images and N labels, got {images.shape} and {labels.shape}")
    return ImageDataset(images[..., None].copy(), labels.astype(np.int64), list(FASHION_MNIST_CLASSES))


# ----------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DatasetError(f"missing CIFAR batch file {path}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # pickle raises many types on garbage
        raise DatasetError(f"{path}: not a CIFAR python pickle batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR python pickle batch (a {type(batch).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: CIFAR batch lacks 'data' or '{label_key}'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"{path}: expected N x 3072 data and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def load_cifar_split(root: Path, num_classes: int, train: bool) -> ImageDataset:
    if not root.is_dir():
        raise DatasetError(f"CIFAR directory {root} does not exist")
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        files = ["train"] if train else ["test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    parts = [_cifar_arrays(root / name, label_key) for name in files]
    meta = _unpickle(root / meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    if len(names) != num_classes:
        raise DatasetError(f"{root / meta_file}: expected {num_classes} class names in '{names_key}'")
    return ImageDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), names)


# ----------------------------------------------------------------------------- image folder


def load_image_folder(root: Path, size: int | None = None, channels: int | None = None,
                      geometry: Geometry | None = None) -> ImageDataset:
    """``root/<class>/*.png|jpg``: classes sorted by name, images converted to ``channels``
    (1: grey, 3: RGB; without it, grey when every image is grey, else RGB) and fitted to
    ``size`` as the server fits an upload for the model (``geometry``, the manifest's;
    default: resize the shorter side and crop the centre)."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders (expected root/<class>/*.png)")
    files = [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"{root}: no images found in the class folders")
    decoded = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img.load()
                decoded.append(img.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    if channels not in (None, 1, 3):
        raise DatasetError(f"{root}: images convert to 1 (grey) or 3 (RGB) channels, not {channels}")
    grey = all(img.mode in ("L", "1", "I;16", "I", "F") for img in decoded) if channels is None else channels == 1
    mode = "L" if grey else "RGB"
    side = size or max(decoded[0].size)
    geometry = geometry or Geometry()
    arrays = [np.asarray(geometry.apply(to_eight_bit(img).convert(mode), side), dtype=np.uint8) for img in decoded]
    images = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    return ImageDataset(images, np.array([c for _, c in files], dtype=np.int64), classes)


# ----------------------------------------------------------------------------- splits


def holdout_split(data: ImageDataset, holdout: int, seed: int = SPLIT_SEED) -> tuple[ImageDataset, ImageDataset]:
    """A fixed, seeded split of a training set into (train, held-out)."""
    if not 0 < holdout < len(data):
        raise DatasetError(f"cannot hold out {holdout} of {len(data)} images")
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[holdout:])), data.subset(np.sort(order[:holdout]))


def load_splits(name: str, data_dir: str | Path | None = None, image_size: int | None = None,
                channels: int | None = None, geometry: Geometry | None = None) -> DataSplits:
    """Load a dataset by name into train / held-out / test.

    ``image-folder`` expects ``data_dir/train/<class>/`` and ``data_dir/test/<class>/``;
    its held-out set is 10% of train (seeded, :func:`holdout_split`), its images are resized
    to ``image_size`` and converted to ``channels``. The other datasets have fixed sizes.
    """
    if name == "fashion-mnist":
        root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        if not root.is_dir():
            raise DatasetError(
                f"Fashion-MNIST directory {root} does not exist: `apt-get install dataset-fashion-mnist` or --data-dir"
            )
        full, test = load_fashion_mnist_split(root, True), load_fashion_mnist_split(root, False)
    elif name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DatasetError(f"{name} needs its folder (the python pickle batches): --data {name}:PATH or --data-dir")
        classes = 10 if name == "cifar10" else 100
        full, test = load_cifar_split(Path(data_dir), classes, True), load_cifar_split(Path(data_dir), classes, False)
    elif name == "image-folder":
        if data_dir is None:
            raise DatasetError("image-folder needs its folder, with train/ and test/ class folders: "
                               "--data image-folder:PATH or --data-dir")
        root = Path(data_dir)
        full = load_image_folder(root / "train", image_size, channels, geometry)
        test = load_image_folder(root / "test", full.size, full.channels, geometry)
        if test.classes != full.classes:
            raise DatasetError(f"{root}: train and test have different class folders")
    else:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    holdout = HOLDOUT_SIZE.get(name, max(1, len(full) // 10))
    train, held = holdout_split(full, holdout)
    return DataSplits(name, train.named("train"), held.named("holdout"), test.named("test"))


# ----------------------------------------------------------------------------- naming a dataset


@dataclass(frozen=True)
class DataSource:
    """A dataset as the command line names it (``--data``): ``fashion-mnist``,
    ``cifar10:PATH``, ``cifar100:PATH``, ``image-folder:PATH``; a path after the name is the
    dataset's folder (``--data-dir`` of the older options)."""

    name: str
    root: str | None = None

    @classmethod
    def parse(cls, text: str) -> DataSource:
        name, colon, root = text.partition(":")
        if name not in DATASETS or (colon and not root):
            raise DatasetError(f"unknown dataset {text!r}: expected fashion-mnist[:PATH], cifar10:PATH, "
                               "cifar100:PATH or image-folder:PATH")
        return cls(name, root or None)

    def __str__(self) -> str:
        return f"{self.name}:{self.root}" if self.root else self.name

    def load(self, image_size: int | None = None, channels: int | None = None,
             geometry: Geometry | None = None) -> DataSplits:
        return load_splits(self.name, self.root, image_size, channels, geometry)


def resolve_data(data: str | None, data_dir: str | Path | None, default: str | None = None) -> DataSource | None:
    """The dataset ``--data`` names (else ``default``, a dataset's bare name), its folder from
    the name's path or ``data_dir``; a folder given both ways must be the same one."""
    source = DataSource.parse(data) if data else DataSource(default) if default else None
    if source is None and data_dir is not None:
        raise DatasetError(f"--data-dir {data_dir}: which dataset is it? Name it with --data")
    if source is None or data_dir is None:
        return source
    if source.root is not None and Path(source.root).resolve() != Path(data_dir).resolve():
        raise DatasetError(f"conflicting dataset folders: --data says {source.root}, --data-dir says {data_dir}")
    return DataSource(source.name, str(data_dir))
