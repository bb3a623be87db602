"""Plug-in families: a distribution with ``exitserve.models`` entry points adds builders that
``exitserve models`` lists with the distribution's name, and that ``train`` and ``export``
build like the families shipped here. The distribution is a folder the test writes (a
package and its ``.dist-info``) on ``PYTHONPATH``, as ``pip install`` would leave it; every
command runs in its own process, so this process's registry never sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from exitserve.repository.format import load_manifest
from tests.support.user_package import exitserve_cli

pytestmark = pytest.mark.slow  # every test runs exitserve in a process of its own (PyTorch imports)

FAMILY = '''"""A tiny two-exit family, shipped as a plug-in."""

from typing import Any

from torch import nn

from exitserve import EarlyExitModel, ExitSpec, register_model
from exitserve.models.early_exit import Stage


def _head(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class TinyNet(EarlyExitModel):
    def __init__(self, width: int = 4, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.config = {"width": width, "num_classes": num_classes, "in_channels": in_channels,
                       "image_size": image_size}
        self.front = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU())
        self.back = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.early, self.late = _head(width, num_classes), _head(2 * width, num_classes)

    def exit_specs(self) -> list[ExitSpec]:
        return [ExitSpec(0, "early"), ExitSpec(1, "late")]

    def stages(self) -> list[nn.Module]:
        return [Stage(self.front, self.early, carries_list=False, is_last=False),
                Stage(self.back, self.late, carries_list=False, is_last=True)]

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)


@register_model
def tinynet(**config: Any) -> TinyNet:
    return TinyNet(**config)


def wide(**config: Any) -> TinyNet:
    """Registered by its entry point's name, not decorated."""
    return TinyNet(**{"width": 8, **config})
'''


def write_distribution(site: Path, name: str, entry_points: str, module: str | None = None) -> Path:
    """A package ``name`` (its ``family.py``) and ``name-0.1.dist-info`` with the entry points."""
    if module is not None:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
        (site / name / "family.py").write_text(module)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[exitserve.models]\n{entry_points}\n")
    return site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_distribution(tmp_path / "site", "tinyfam",
                              "tinynet = tinyfam.family\ntinynet_wide = tinyfam.family:wide", FAMILY)


def test_models_lists_plug_in_families_with_their_distribution(site: Path, tmp_path: Path) -> None:
    done = exitserve_cli(tmp_path, "models", env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr[-4000:]
    listed = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert listed["tinynet"] == listed["tinynet_wide"] == "tinyfam 0.1"
    assert listed["msdnet"] == listed["retrofit"] == "built-in"
    assert list(listed) == sorted(listed)


def test_a_plug_in_that_cannot_load_or_takes_a_name_stops_the_command(tmp_path: Path) -> None:
    broken = write_distribution(tmp_path / "broken", "brokenfam", "brokenfam = brokenfam.missing")
    done = exitserve_cli(tmp_path, "models", env={"PYTHONPATH": str(broken)})
    assert done.returncode == 2
    assert "plug-in brokenfam = brokenfam.missing (brokenfam 0.1, entry point group exitserve.models) failed to " \
           "load: ModuleNotFoundError" in done.stderr
    taken = write_distribution(tmp_path / "taken", "takenfam", "msdnet = takenfam.family:wide", FAMILY)
    done = exitserve_cli(tmp_path, "models", env={"PYTHONPATH": str(taken)})
    assert done.returncode == 2
    assert "model 'msdnet' is already registered (by built-in); takenfam 0.1 registers it again" in done.stderr


def test_train_and_export_build_a_plug_in_family(site: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(site)}
    done = exitserve_cli(tmp_path, "train", "--model", "tinynet_wide", "--epochs", "1", "--steps-per-epoch", "5",
                         "--batch-size", "32", "--ema-decay", "0", "--threads", "1", "--out", "tiny.pt", env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    done = exitserve_cli(tmp_path, "export", "--checkpoint", "tiny.pt", "--out", "repository/tiny",
                         "--parity-images", "32", env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = load_manifest(tmp_path / "repository/tiny")
    assert (manifest.source.model, manifest.source.config["width"]) == ("tinynet_wide", 8)
    assert [s.exit_name for s in manifest.stages] == ["early", "late"] and manifest.parity["passed"]
