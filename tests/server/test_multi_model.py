"""One repository folder, the three model families served at once by one server."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from exporter.calibrate import calibrate_repository
from exporter.export import export_repository
from server.settings import Settings
from tests.server.images import encode, fashion_images
from tests.server.live import live_server


@pytest.fixture(scope="module")
def three_family_repository(served_repository: Path, tiny_espnetv2_checkpoint: Path,
                            tiny_googlenet_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three_families")
    shutil.copytree(served_repository / "msdnet_fmnist", root / "msdnet_fmnist")
    for name, checkpoint in (("espnetv2_fmnist", tiny_espnetv2_checkpoint),
                             ("googlenet_fmnist", tiny_googlenet_checkpoint)):
        export_repository(checkpoint, root / name, parity_images=64, progress=False)
        calibrate_repository(root / name, report=False, progress=False)
    return root


def test_one_server_serves_every_family(three_family_repository: Path) -> None:
    pixels, _ = fashion_images(4)
    blobs = [encode(p) for p in pixels]
    settings = Settings(model_repository=three_family_repository, online_budget=False)
    with live_server(settings) as url:
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["models"] == ["espnetv2_fmnist", "googlenet_fmnist", "msdnet_fmnist"]
        listed = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert set(listed) == {"espnetv2_fmnist", "googlenet_fmnist", "msdnet_fmnist"}
        for name, exits in (("espnetv2_fmnist", 3), ("googlenet_fmnist", 3), ("msdnet_fmnist", 5)):
            detail = httpx.get(f"{url}/v1/models/{name}").json()
            assert len(detail["manifest"]["stages"]) == exits
            for budget in (0.34, 1.0):
                body = httpx.post(f"{url}/classify", files={"file": ("x.png", blobs[0], "image/png")},
                                  params={"model": name, "budget": budget}, timeout=30).json()
                assert body["model"] == name
                assert 0 <= body["exit"]["index"] < exits
                if budget == 1.0:
                    assert body["exit"]["index"] == exits - 1 and body["exit"]["cost_fraction"] == 1.0
            batch = httpx.post(f"{url}/classify/batch", params={"model": name, "budget": 0.5},
                               files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)],
                               timeout=60).json()
            assert batch["model"] == name and batch["summary"]["classified"] == len(blobs)
            assert batch["summary"]["mean_cost_fraction"] <= 0.5 + 1e-9
        # the default model is still the default when others are served beside it
        plain = httpx.post(f"{url}/classify", files={"file": ("x.png", blobs[0], "image/png")}, timeout=30).json()
        assert plain["model"] == "msdnet_fmnist"
