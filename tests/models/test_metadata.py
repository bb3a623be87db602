"""A user's model's metadata (models/metadata.py): flags and the model's own
``exitserve_metadata`` merge, conflicting values raise, the dataset fills what it decides,
the normalisation is never guessed; and ``import exitserve`` stays torch-free while its
names for a user's model import on first use."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from exitserve.errors import ConfigurationError
from exitserve.models.data import DataSource, DatasetError, ImageDataset, resolve_data
from exitserve.models.metadata import ModelMetadata


class Model:
    exitserve_metadata = {"mean": [0.5], "std": [0.25], "labels": ["cat", "dog"]}


def data(size: int = 8, channels: int = 1, classes: int = 2) -> ImageDataset:
    rng = np.random.default_rng(0)
    return ImageDataset(rng.integers(0, 256, (6, size, size, channels), dtype=np.uint8),
                        np.arange(6) % classes, [f"c{i}" for i in range(classes)])


def test_flags_and_the_models_metadata_merge_and_conflicts_raise() -> None:
    own = ModelMetadata.of(Model())
    merged = ModelMetadata(input_size=8, mean=(0.5,)).merge(own, "the flags", "Model.exitserve_metadata")
    assert (merged.input_size, merged.mean, merged.std, merged.labels) == (8, (0.5,), (0.25,), ("cat", "dog"))
    with pytest.raises(ConfigurationError, match=r"conflicting metadata: std: the flags say \(0\.3,\), "
                                                 r"Model\.exitserve_metadata say \(0\.25,\)"):
        ModelMetadata(std=[0.3]).merge(own, "the flags", "Model.exitserve_metadata")
    with pytest.raises(ConfigurationError, match=r"unknown keys \['size'\]"):
        ModelMetadata.of(type("M", (), {"exitserve_metadata": {"size": 28}})())
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        ModelMetadata(dataset="mnist")


def test_the_dataset_fills_what_it_decides_and_contradictions_raise() -> None:
    resolved = ModelMetadata(mean=(0.5,), std=(0.25,)).resolve(data(), "fashion-mnist")
    assert (resolved.input_size, resolved.channels, resolved.labels) == (8, 1, ["c0", "c1"])
    assert resolved.input_shape == (1, 8, 8)
    with pytest.raises(ConfigurationError, match="input size 28 conflicts with fashion-mnist's 8 x 8 images"):
        ModelMetadata(input_size=28, mean=(0.5,), std=(0.25,)).resolve(data(), "fashion-mnist")
    with pytest.raises(ConfigurationError, match="3 labels but fashion-mnist has 2 classes"):
        ModelMetadata(labels=("a", "b", "c"), mean=(0.5,), std=(0.25,)).resolve(data(), "fashion-mnist")
    with pytest.raises(ConfigurationError, match="1 std values for 3 channels"):
        ModelMetadata(mean=(0.5, 0.5, 0.5), std=(0.25,)).resolve(data(channels=3), "cifar10")


def test_the_normalisation_is_never_guessed() -> None:
    with pytest.raises(ConfigurationError, match=r"the model's mean, std unknown: .*fashion-mnist's own training "
                                                 r"images: mean \[0\.\d+\], std \[0\.\d+\]"):
        ModelMetadata().resolve(data(), "fashion-mnist")
    with pytest.raises(ConfigurationError, match="the model's input size, channels, labels unknown"):
        ModelMetadata(mean=(0.5,), std=(0.25,)).resolve(None)


def test_data_sources_as_the_command_line_names_them(tmp_path) -> None:
    assert DataSource.parse("image-folder:/photos") == DataSource("image-folder", "/photos")
    assert str(DataSource.parse("cifar10:/c")) == "cifar10:/c" and DataSource.parse("fashion-mnist").root is None
    for bad in ("cifar10:", "imagenet:/x"):
        with pytest.raises(DatasetError, match="expected fashion-mnist"):
            DataSource.parse(bad)
    assert resolve_data(None, str(tmp_path), default="fashion-mnist") == DataSource("fashion-mnist", str(tmp_path))
    assert resolve_data(f"cifar10:{tmp_path}", str(tmp_path)) == DataSource("cifar10", str(tmp_path))
    with pytest.raises(DatasetError, match="conflicting dataset folders"):
        resolve_data(f"cifar10:{tmp_path}", str(tmp_path / "other"))
    assert resolve_data(None, None) is None


def test_import_exitserve_stays_torch_free_and_its_model_names_import_on_use() -> None:
    code = ("import sys, exitserve; before = 'torch' in sys.modules; "
            "from exitserve import MultiExit, EarlyExitModel, export_model, ModelMetadata, register_model; "
            "print(before, 'torch' in sys.modules, issubclass(MultiExit, EarlyExitModel), "
            "'MultiExit' in dir(exitserve))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["False", "True", "True", "True"], done.stderr[-2000:]
