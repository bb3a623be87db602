"""Shared fixtures: a small multi-exit model really trained on Fashion-MNIST for a few
steps, the model repository the exporter writes from it, the committed default model as a
served repository; and, in CI, no silent skips."""

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


# In CI every test must run: a broken install step (Prometheus, wrk, Ray, promtool) would
# otherwise turn its tests into skips and leave the run green. Only tests marked ``gpu``
# may skip there (CI has no GPU).
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SKIP_ALLOWED_MARK = "gpu"
_skipped_in_ci: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if IN_CI and report.skipped and SKIP_ALLOWED_MARK not in report.keywords:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped_in_ci.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_in_ci:
        session.config.get_terminal_writer().line(
            "CI=true and these tests were skipped (only tests marked 'gpu' may skip in CI):\n  "
            + "\n  ".join(_skipped_in_ci), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
def served_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository folder with one calibrated model, ``msdnet_fmnist``: the committed
    default model (5 exits, about 94% accurate), which tests rely on; never a stand-in."""
    from exitserve.exporter.calibrate import calibrate_repository
    from exitserve.exporter.export import export_repository

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.fail(f"the committed default model {DEFAULT_CHECKPOINT} is missing: the checkout is incomplete")
    root = tmp_path_factory.mktemp("served")
    export_repository(DEFAULT_CHECKPOINT, root / "msdnet_fmnist", progress=False)
    calibrate_repository(root / "msdnet_fmnist", report=True, progress=False)
    return root
