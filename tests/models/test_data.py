import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exitserve.models.data import (
    DatasetError,
    holdout_split,
    load_cifar_split,
    load_fashion_mnist_split,
    load_image_folder,
    load_splits,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_fmnist(root: Path, n_train: int = 40, n_test: int = 10) -> None:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_idx_roundtrip(tmp_path: Path) -> None:
    make_fmnist(tmp_path)
    train = load_fashion_mnist_split(tmp_path, train=True)
    assert train.images.shape == (40, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [i % 10 for i in range(40)]
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10


def test_uncompressed_idx_is_read(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.arange(12).reshape(3, 4), compress=False)
    assert read_idx(tmp_path / "x").tolist() == np.arange(12).reshape(3, 4).tolist()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "unsigned-byte"),  # float32 dtype code
        (struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"abc", "says 10 bytes"),  # truncated
        (b"\x00", "too short"),
    ],
)
def test_malformed_idx_raises_clear_error(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad-idx.gz"
    with gzip.open(path, "wb") as f:
        f.write(payload)
    with pytest.raises(DatasetError, match=message):
        read_idx(path)


def test_corrupt_gzip_raises_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(DatasetError, match="cannot read IDX"):
        read_idx(path)


def test_missing_fashion_mnist_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_splits("fashion-mnist", tmp_path / "nowhere")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DatasetError, match="missing train-images"):
        load_splits("fashion-mnist", tmp_path / "empty")


def write_cifar(root: Path, num_classes: int, per_batch: int = 6) -> None:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)

    def batch(n: int, key: str) -> dict:
        return {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), key.encode(): list(range(n))}

    if num_classes == 10:
        for i in range(1, 6):
            (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch, "labels")))
        (root / "test_batch").write_bytes(pickle.dumps(batch(per_batch, "labels")))
        meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
        (root / "batches.meta").write_bytes(pickle.dumps(meta))
    else:
        (root / "train").write_bytes(pickle.dumps(batch(per_batch * 5, "fine_labels")))
        (root / "test").write_bytes(pickle.dumps(batch(per_batch, "fine_labels")))
        (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickle_batches(tmp_path: Path, num_classes: int) -> None:
    write_cifar(tmp_path, num_classes)
    train = load_cifar_split(tmp_path, num_classes, train=True)
    test = load_cifar_split(tmp_path, num_classes, train=False)
    assert train.images.shape == (30, 32, 32, 3)
    assert test.images.shape == (6, 32, 32, 3)
    assert len(train.classes) == num_classes
    # channel-major rows become H x W x C: pixel (0, 0) of channel 1 is byte 1024
    raw = pickle.loads((tmp_path / ("test_batch" if num_classes == 10 else "test")).read_bytes())[b"data"]
    assert test.images[0, 0, 0, 1] == raw[0, 1024]


def test_malformed_cifar_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    (tmp_path / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3: not a CIFAR"):
        load_cifar_split(tmp_path, 10, train=True)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match="N x 3072"):
        load_cifar_split(tmp_path, 10, train=True)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing CIFAR batch"):
        load_cifar_split(tmp_path, 10, train=True)


def make_image_folder(root: Path, per_class: int = 5) -> None:
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_layout(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    data = load_image_folder(tmp_path / "train", size=16)
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (10, 16, 16, 3)
    assert sorted(data.labels.tolist()) == [0] * 5 + [1] * 5
    splits = load_splits("image-folder", tmp_path, image_size=16)
    assert len(splits.train) + len(splits.holdout) == 10 and len(splits.test) == 10
    assert (splits.train.split, splits.holdout.split, splits.test.split) == ("train", "holdout", "test")


def test_image_folder_bad_file_and_missing_classes(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match="broken.png: not a readable image"):
        load_image_folder(tmp_path / "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path / "flat")


def test_holdout_split_is_fixed_and_disjoint(tmp_path: Path) -> None:
    make_fmnist(tmp_path, n_train=100)
    data = load_fashion_mnist_split(tmp_path, train=True)
    data.labels = np.arange(100) % 10
    data.images[:, 0, 0, 0] = np.arange(100)  # tag each image with its index
    a_train, a_hold = holdout_split(data, 20, seed=0)
    b_train, b_hold = holdout_split(data, 20, seed=0)
    assert a_hold.images[:, 0, 0, 0].tolist() == b_hold.images[:, 0, 0, 0].tolist()
    ids = set(a_train.images[:, 0, 0, 0].tolist()) | set(a_hold.images[:, 0, 0, 0].tolist())
    assert len(a_hold) == 20 and len(a_train) == 80 and ids == set(range(100))
    _, other = holdout_split(data, 20, seed=1)
    assert other.images[:, 0, 0, 0].tolist() != a_hold.images[:, 0, 0, 0].tolist()


def test_real_fashion_mnist_split_sizes() -> None:
    splits = load_splits("fashion-mnist")
    assert (len(splits.train), len(splits.holdout), len(splits.test)) == (55000, 5000, 10000)
    assert splits.train.size == 28 and splits.train.channels == 1
    # each split knows its name, and a subset keeps it (the calibrator records it)
    assert [s.split for s in (splits.train, splits.holdout, splits.test)] == ["train", "holdout", "test"]
    assert splits.holdout.subset(np.arange(10)).split == "holdout"


def test_an_image_folder_is_fitted_as_the_server_fits_uploads(tmp_path: Path) -> None:
    """Calibration on a folder of 4:3 photos sees what the server will serve: the same
    geometry (crop by default, or the manifest's), and 16-bit images scaled, not clipped."""
    from PIL import Image

    from exitserve.repository.format import InputSpec
    from exitserve.repository.preprocessing import Geometry
    from exitserve.server.preprocess import decode_image

    folder = tmp_path / "train" / "thing"
    folder.mkdir(parents=True)
    frame = np.zeros((30, 40), np.uint8)
    frame[:, 5:35] = np.linspace(0, 255, 30, dtype=np.uint8)[None, :]  # a 30 x 30 item in a 4:3 frame
    Image.fromarray(frame).save(folder / "photo.png")
    Image.fromarray(frame.astype(np.uint16) * 257).save(folder / "deep.png")
    for fit in ("crop", "squash", "pad"):
        spec = InputSpec(channels=1, size=12, mean=[0.5], std=[0.5], fit=fit)
        data = load_image_folder(tmp_path / "train", size=12, channels=1, geometry=spec.geometry)
        served = decode_image((folder / "photo.png").read_bytes(), spec, 10**6)
        assert np.array_equal(data.images[1], served)  # "photo.png" sorts after "deep.png"
        assert np.abs(data.images[0].astype(int) - served.astype(int)).max() <= 1
    default = load_image_folder(tmp_path / "train", size=12, channels=1)
    assert np.array_equal(default.images, load_image_folder(tmp_path / "train", 12, 1, Geometry("crop")).images)
