"""Shared fixtures: a small multi-exit model really trained on Fashion-MNIST for a few
steps, and the model repository the exporter writes from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Tests using these fixtures train, export or calibrate a real model first: end to end,
# marked ``slow`` (``pytest -m "not slow"`` runs the fast unit tests alone).
SLOW_FIXTURES = {"small_checkpoint", "small_repository", "served_repository", "tiny_espnetv2_checkpoint",
                 "tiny_googlenet_checkpoint", "trained"}
SMALL_MODEL = {"nBlocks": 3, "nChannels": 8, "growthRate": 4, "base": 1, "step": 1}
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "weights" / "msdnet_fmnist.pt"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exitserve.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("small_model") / "small.pt"
    train(TrainConfig(out=str(out), epochs=1, steps_per_epoch=40, batch_size=32, model_config=SMALL_MODEL))
    return out


def _tiny_family_checkpoint(factory: pytest.TempPathFactory, model: str, **config) -> Path:
    """A few training steps of a family's default model: real weights, real checkpoint."""
    from exitserve.models.train import TrainConfig, train

    out = factory.mktemp(model) / f"{model}.pt"
    train(TrainConfig(model=model, epochs=1, steps_per_epoch=3, batch_size=16, out=str(out), threads=1,
                      ema_decay=0.0, model_config=config))
    return out


@pytest.fixture(scope="session")
def tiny_espnetv2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_family_checkpoint(tmp_path_factory, "espnetv2")


@pytest.fixture(scope="session")
def tiny_googlenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_family_checkpoint(tmp_path_factory, "googlenet", width=0.125)


@pytest.fixture(scope="session")
def small_repository(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exitserve.exporter.export import export_repository

    out = tmp_path_factory.mktemp("repository") / "small"
    export_repository(small_checkpoint, out, progress=False)
    return out


@pytest.fixture(scope="session")
def served_repository(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository folder with one calibrated model, ``msdnet_fmnist``: the committed
    default model when it is there, else the small one."""
    from exitserve.exporter.calibrate import calibrate_repository
    from exitserve.exporter.export import export_repository

    # the small model is trained only when the committed one is missing
    checkpoint = DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else request.getfixturevalue("small_checkpoint")
    root = tmp_path_factory.mktemp("served")
    export_repository(checkpoint, root / "msdnet_fmnist", progress=False)
    calibrate_repository(root / "msdnet_fmnist", report=True, progress=False)
    return root
