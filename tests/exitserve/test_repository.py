"""The repository contract: a calibration must match its manifest, and says which file
does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exitserve.repository.format import RepositoryError, load_calibration, write_json
from exitserve.repository.preprocessing import normalize
from tests.support.synthetic import synthetic_calibration, synthetic_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    manifest = synthetic_manifest()
    for stage in manifest.stages:
        (tmp_path / stage.file).write_bytes(b"")
    write_json(tmp_path / "manifest.json", manifest)
    write_json(tmp_path / "calibration.json", synthetic_calibration())
    return tmp_path


def rewrite(folder: Path, change) -> None:
    raw = json.loads((folder / "calibration.json").read_text())
    change(raw)
    (folder / "calibration.json").write_text(json.dumps(raw))


def test_matching_calibration_loads(folder: Path) -> None:
    calibration = load_calibration(folder)
    assert [p.budget for p in calibration.curve] == [0.2, 0.5, 1.0]


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.update(cost_fractions=[0.2, 1.0], exit_accuracy=[0.8, 0.8],
                            curve=[{**p, "thresholds": p["thresholds"][:2], "exit_fractions": [0.5, 0.5]}
                                   for p in raw["curve"]]),
     "calibrated for 2 exits, but the manifest has 3"),
    (lambda raw: raw["cost_fractions"].__setitem__(1, 0.45), "exit 1 costs 0.500000"),
    (lambda raw: raw["curve"][1]["thresholds"].pop(), "has 2 thresholds"),
    (lambda raw: raw["exit_accuracy"].pop(), "exit_accuracy has 2 values"),
    (lambda raw: raw.update(curve=[]), "the budget curve is empty"),
])
def test_a_calibration_that_does_not_match_is_refused_naming_the_file(folder: Path, change, message: str) -> None:
    rewrite(folder, change)
    with pytest.raises(RepositoryError, match="calibration.json") as caught:
        load_calibration(folder)
    assert message in str(caught.value)


def test_unreadable_calibration_names_the_file(folder: Path) -> None:
    (folder / "calibration.json").write_text("{not json")
    with pytest.raises(RepositoryError, match="calibration.json: unreadable JSON"):
        load_calibration(folder)


def test_normalize_is_channelwise_standardization() -> None:
    pixels = np.array([[[[0, 255]], [[255, 0]]]], dtype=np.uint8)  # 1 x 2 x 1 x 2 (N H W C)
    out = normalize(pixels, mean=[0.5, 0.0], std=[0.5, 1.0])
    assert out.shape == (1, 2, 2, 1) and out.dtype == np.float32  # N x C x H x W
    np.testing.assert_allclose(out[0, 0, :, 0], [-1.0, 1.0])
    np.testing.assert_allclose(out[0, 1, :, 0], [1.0, 0.0])
