"""One repository folder, the three model families served at once by one server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from exitserve.exporter.calibrate import calibrate_repository
from exitserve.exporter.export import export_repository
from exitserve.repository.confidence import full_depth_thresholds
from exitserve.server.engine import ModelEngine
from exitserve.server.preprocess import decode_image
from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server

# The first 20 Fashion-MNIST test images: the default model at full depth gets all 20 right;
# a random answer gets about 2 of them, the commonest label alone 4.
IMAGES, MOST_RIGHT = 20, 18


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


def full_depth_classes(folder: Path, blobs: list[bytes]) -> list[int]:
    """What the model in ``folder`` answers at full depth, run here on ONNX Runtime without a server."""
    engine = ModelEngine.load(folder, default_budget=1.0, provider="cpu", online_budget=False)
    spec = engine.manifest.input
    images = spec.normalize(np.stack([decode_image(b, spec, 10**6) for b in blobs]))
    thresholds = np.tile(full_depth_thresholds(engine.num_exits), (len(blobs), 1))
    return [int(np.argmax(r.probs)) for r in engine.run_thresholds(images, thresholds).results]


def test_one_server_serves_every_family(three_family_repository: Path) -> None:
    """Each model answers from its own weights: at full depth the server's classes are the
    ones its folder gives offline, and the trained default model gets the real labels right
    (the two tiny families had a few training steps: only the former holds for them)."""
    pixels, labels = fashion_images(IMAGES)
    blobs = [encode(p) for p in pixels]
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    settings = Settings(model_repository=three_family_repository, online_budget=False)
    with live_server(settings) as url:
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["models"] == ["espnetv2_fmnist", "googlenet_fmnist", "msdnet_fmnist"]
        listed = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert set(listed) == {"espnetv2_fmnist", "googlenet_fmnist", "msdnet_fmnist"}
        served = {}
        for name, exits in (("espnetv2_fmnist", 3), ("googlenet_fmnist", 3), ("msdnet_fmnist", 5)):
            detail = httpx.get(f"{url}/v1/models/{name}").json()
            assert len(detail["manifest"]["stages"]) == exits
            full = httpx.post(f"{url}/classify/batch", params={"model": name, "budget": 1.0}, files=files,
                              timeout=60).json()
            assert full["model"] == name and full["summary"]["exit_histogram"][-1] == IMAGES
            served[name] = [item["result"]["class_index"] for item in full["results"]]
            assert served[name] == full_depth_classes(three_family_repository / name, blobs), name
            for budget in (0.34, 1.0):
                body = httpx.post(f"{url}/classify", files={"file": ("x.png", blobs[0], "image/png")},
                                  params={"model": name, "budget": budget}, timeout=30).json()
                assert body["model"] == name
                assert 0 <= body["exit"]["index"] < exits
                if budget == 1.0:
                    assert body["exit"]["index"] == exits - 1 and body["exit"]["cost_fraction"] == 1.0
                    assert body["class_index"] == served[name][0]
            batch = httpx.post(f"{url}/classify/batch", params={"model": name, "budget": 0.5}, files=files,
                               timeout=60).json()
            assert batch["model"] == name and batch["summary"]["classified"] == len(blobs)
            assert batch["summary"]["mean_cost_fraction"] <= 0.5 + 1e-9
        correct = sum(c == label for c, label in zip(served["msdnet_fmnist"], labels))
        assert correct >= MOST_RIGHT, f"msdnet_fmnist: {correct} of {IMAGES} right"
        # the default model is still the default when others are served beside it
        plain = httpx.post(f"{url}/classify", files={"file": ("x.png", blobs[0], "image/png")},
                           params={"budget": 1.0}, timeout=30).json()
        assert plain["model"] == "msdnet_fmnist" and plain["class_index"] == served["msdnet_fmnist"][0]


def test_default_model_picks_who_answers_a_request_that_names_none(three_family_repository: Path) -> None:
    pixels, _ = fashion_images(IMAGES)
    blobs = [encode(p) for p in pixels]
    expected = full_depth_classes(three_family_repository / "googlenet_fmnist", blobs)
    settings = Settings(model_repository=three_family_repository, online_budget=False,
                        default_model="googlenet_fmnist")
    with live_server(settings) as url:
        defaults = [m["name"] for m in httpx.get(f"{url}/v1/models").json()["models"] if m["default"]]
        assert defaults == ["googlenet_fmnist"]
        answers = [httpx.post(f"{url}/classify", content=b, headers={"content-type": "image/png"},
                              params={"budget": 1.0}, timeout=30).json() for b in blobs]
        assert {a["model"] for a in answers} == {"googlenet_fmnist"}
        assert [a["class_index"] for a in answers] == expected
        named = httpx.post(f"{url}/classify", content=blobs[0], headers={"content-type": "image/png"},
                           params={"model": "msdnet_fmnist"}, timeout=30).json()
        assert named["model"] == "msdnet_fmnist"  # a request that names one still gets it


def test_a_default_model_the_repository_lacks_refuses_the_start(three_family_repository: Path) -> None:
    from fastapi.testclient import TestClient

    from exitserve.server.http.app import create_app
    from exitserve.server.service import StartupError

    settings = Settings(model_repository=three_family_repository, default_model="resnet_fmnist")
    with pytest.raises(StartupError, match="default model 'resnet_fmnist' is not in the repository"):
        with TestClient(create_app(settings)):
            pass


def test_a_model_whose_first_exit_costs_more_than_the_default_gets_its_own_floor(
        three_family_repository: Path) -> None:
    """Calibration wrote serving.json for it; a budget below the floor says what was spent."""
    from exitserve.repository.format import load_manifest, load_serving_config

    folder = three_family_repository / "espnetv2_fmnist"
    first = load_manifest(folder).stages[0].cost_fraction
    assert first > 0.25
    assert first <= load_serving_config(folder).default_budget < first + 0.001 + 1e-9
    pixels, _ = fashion_images(1)
    with live_server(Settings(model_repository=three_family_repository, online_budget=False)) as url:
        body = httpx.post(f"{url}/classify", content=encode(pixels[0]), headers={"content-type": "image/png"},
                          params={"model": "espnetv2_fmnist", "budget": 0.1}).json()
        assert body["budget"] == 0.1 and body["budget_applied"] == pytest.approx(first)
        assert "first exit" in body["budget_note"] and body["exit"]["cost_fraction"] >= round(first, 6) - 1e-6
        listed = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert listed["espnetv2_fmnist"]["budget"] == load_serving_config(folder).default_budget
        assert listed["msdnet_fmnist"]["budget"] == 0.25


@pytest.mark.parametrize("serving, message", [
    (None, "from EXITSERVE_DEFAULT_BUDGET"),
    ({"default_budget": 0.1}, "from espnetv2_fmnist/serving.json"),
    ({"default_budget": 0.3, "max_batch": 4}, "Extra inputs are not permitted"),
])
def test_a_default_budget_below_the_first_exit_refuses_the_start(three_family_repository: Path, tmp_path: Path,
                                                                  serving, message: str) -> None:
    from fastapi.testclient import TestClient

    from exitserve.server.http.app import create_app
    from exitserve.server.service import StartupError

    shutil.copytree(three_family_repository / "espnetv2_fmnist", tmp_path / "repo" / "espnetv2_fmnist")
    path = tmp_path / "repo" / "espnetv2_fmnist" / "serving.json"
    path.unlink()
    if serving is not None:
        path.write_text(json.dumps(serving))
    with pytest.raises(StartupError, match=message):
        with TestClient(create_app(Settings(model_repository=tmp_path / "repo"))):
            pass


def test_per_model_batch_queue_and_pixel_limits(three_family_repository: Path, tmp_path: Path) -> None:
    shutil.copytree(three_family_repository / "msdnet_fmnist", tmp_path / "repo" / "msdnet_fmnist")
    (tmp_path / "repo" / "msdnet_fmnist" / "serving.json").write_text(
        json.dumps({"max_batch_size": 2, "max_queue_images": 3, "max_pixels": 1000}))
    apps: list = []
    # a request may carry no more images than the queue holds (refused at start otherwise)
    with live_server(Settings(model_repository=tmp_path / "repo", max_files=3), apps=apps) as url:
        batcher = apps[0].state.service.models["msdnet_fmnist"].batcher
        assert (batcher.max_batch_size, batcher.max_queue_images) == (2, 3)
        big = encode(np.zeros((40, 40, 1), np.uint8))  # 1,600 pixels
        refused = httpx.post(f"{url}/classify", content=big, headers={"content-type": "image/png"})
        assert refused.status_code == 413 and "limit of 1000 pixels" in refused.json()["detail"]
        small = encode(fashion_images(1)[0][0])  # 784
        assert httpx.post(f"{url}/classify", content=small, headers={"content-type": "image/png"}).status_code == 200
