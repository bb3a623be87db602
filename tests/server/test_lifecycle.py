"""Readiness, draining, queue bounds, provider and IO-binding paths."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from exporter.calibrate import exit_table
from models.data import load_splits
from server.app import create_app
from server.batcher import DynamicBatcher, QueueFull
from server.engine import ModelEngine
from server.policy import exits_taken
from server.preprocess import normalize
from server.settings import Settings
from tests.server.images import encode
from tests.server.live import live_server


def test_readyz_is_503_until_loaded_then_200(served_repository: Path) -> None:
    settings = Settings(model_repository=served_repository, warmup_batches=400)
    with live_server(settings, wait_ready=False) as url:
        first = httpx.get(f"{url}/readyz")
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert first.status_code == 503 and first.json()["status"] == "loading"
        refused = httpx.post(f"{url}/classify", content=b"x", headers={"content-type": "image/png"})
        assert refused.status_code == 503 and refused.json()["error"] == "not_ready"
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_readyz_reports_a_broken_repository(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_repository=tmp_path / "missing"))) as client:
        time.sleep(0.2)
        body = client.get("/readyz").json()
        assert body["status"] == "error" and "does not exist" in body["detail"]


def test_draining_is_not_ready(served_repository: Path) -> None:
    app = create_app(Settings(model_repository=served_repository))
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        app.state.service.draining = True
        assert client.get("/readyz").json()["status"] == "draining"
        app.state.service.draining = False


def test_full_queue_refuses_at_once(served_repository: Path) -> None:
    engine = ModelEngine(served_repository / "msdnet_fmnist", default_budget=0.5, provider="cpu")

    async def scenario() -> None:
        batcher = DynamicBatcher(engine, max_batch_size=4, max_queue_delay_ms=50, max_queue_images=2)
        batcher.start()
        image = np.zeros((1, 28, 28), np.float32)
        t = engine.thresholds_for(0.5)
        first = asyncio.ensure_future(batcher.submit(image, t, float("inf")))
        second = asyncio.ensure_future(batcher.submit(image, t, float("inf")))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(image, t, float("inf"))
        outcomes = await asyncio.gather(first, second)
        assert [o.batch_size for o in outcomes] == [2, 2]  # grouped into one engine call
        assert batcher.pending_images == 0
        await batcher.stop()

    asyncio.run(scenario())


def test_overloaded_server_answers_503_with_retry_after(served_repository: Path) -> None:
    settings = Settings(model_repository=served_repository, max_queue_images=1, max_queue_delay_ms=200)
    app = create_app(settings)
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        service = app.state.service
        service.batchers["msdnet_fmnist"].pending_images = 1  # the queue is full
        image = encode(load_splits("fashion-mnist").test.images[0])
        response = client.post("/classify", content=image, headers={"content-type": "image/png"})
        service.batchers["msdnet_fmnist"].pending_images = 0
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"] == "overloaded"


@pytest.mark.parametrize("binding", ["on", "off"])
def test_engine_matches_offline_evaluation(served_repository: Path, binding: str) -> None:
    """The engine's exits for given thresholds are exactly the calibration's offline exits."""
    folder = served_repository / "msdnet_fmnist"
    engine = ModelEngine(folder, default_budget=0.5, provider="cpu", io_binding=binding)
    assert engine.staged.use_binding is (binding == "on")
    assert engine.staged.provider == "CPUExecutionProvider"
    test = load_splits("fashion-mnist").test
    images, labels = test.images[:300], test.labels[:300]
    table = exit_table(engine.staged, engine.manifest, images, labels, "max_softmax")
    for budget in (0.2, 0.5, 1.0):
        thresholds = engine.thresholds_for(budget)
        results = engine.run(normalize(images, engine.manifest.input), np.tile(thresholds, (300, 1)))
        assert [r.exit_index for r in results] == exits_taken(table.conf, thresholds).tolist()
        offline_acc, offline_cost, _ = table.evaluate(thresholds)
        online_acc = np.mean([np.argmax(r.probs) == y for r, y in zip(results, labels)])
        assert online_acc == pytest.approx(offline_acc)
        assert np.mean([r.cost_fraction for r in results]) == pytest.approx(offline_cost)


def test_budgeted_batch_never_overspends(served_repository: Path) -> None:
    engine = ModelEngine(served_repository / "msdnet_fmnist", default_budget=0.5, provider="cpu")
    images = normalize(load_splits("fashion-mnist").test.images[:200], engine.manifest.input)
    for budget in np.linspace(engine.min_budget, 1.0, 7):
        results = engine.run_budgeted(images, float(budget))
        assert len(results) == 200
        assert np.mean([r.cost_fraction for r in results]) <= budget + 1e-9
    with pytest.raises(ValueError, match="below the cost of the first exit"):
        engine.run_budgeted(images, engine.min_budget / 2)


def test_online_budget_controller_pulls_toward_target(served_repository: Path) -> None:
    engine = ModelEngine(served_repository / "msdnet_fmnist", default_budget=0.3, provider="cpu")
    controller = engine.controller
    controller.observe([0.6] * 50)  # traffic costs more than the target
    assert controller.effective < 0.3
    assert controller.effective >= engine.min_budget
