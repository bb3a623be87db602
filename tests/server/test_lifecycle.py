"""Readiness, draining, overload and the service's accounting."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from exitserve.models.data import load_splits
from exitserve.server.http.app import create_app
from exitserve.server.metrics import Metrics
from exitserve.server.dataplane import InferenceRequest, NormalizedImages
from exitserve.server.engine import ModelEngine
from exitserve.server.options import InferenceOptions
from exitserve.server.service import InferenceService, StartupError
from exitserve.server.settings import Settings
from tests.support.images import encode
from tests.support.synthetic import SyntheticRuntime, as_normalized, probs_with_confidence, served, synthetic_engine
from tests.support.live import live_server


def poll(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def test_readyz_is_503_during_the_warm_up_then_200(served_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up waits for the test, however fast the machine: the loading window is the
    test's to look at, not a race against the warm-up batches."""
    warming, release = threading.Event(), threading.Event()
    warm_up = ModelEngine.warm_up

    def held_warm_up(engine: ModelEngine, batches: int = 2) -> None:
        warming.set()
        release.wait(60)
        warm_up(engine, batches)

    monkeypatch.setattr(ModelEngine, "warm_up", held_warm_up)
    with live_server(Settings(model_repository=served_repository), wait_ready=False) as url:
        try:
            assert warming.wait(60), "the warm-up never started"
            first = httpx.get(f"{url}/readyz")
            assert first.status_code == 503 and first.json()["status"] == "loading"
            assert httpx.get(f"{url}/healthz").status_code == 200
            refused = httpx.post(f"{url}/classify", content=b"x", headers={"content-type": "image/png"})
            assert refused.status_code == 503 and refused.json()["error"] == "not_ready"
        finally:
            release.set()
        poll(lambda: httpx.get(f"{url}/readyz").status_code == 200, "ready once warm")


def test_a_broken_repository_fails_the_start(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="does not exist"):
        with TestClient(create_app(Settings(model_repository=tmp_path / "missing"))):
            pass


def test_draining_is_not_ready(served_repository: Path) -> None:
    app = create_app(Settings(model_repository=served_repository))
    with TestClient(app) as client:
        poll(lambda: client.get("/readyz").status_code == 200, "ready")
        app.state.service.state.draining = True
        assert client.get("/readyz").json()["status"] == "draining"
        app.state.service.state.draining = False


def test_overloaded_server_answers_503_with_retry_after(served_repository: Path) -> None:
    settings = Settings(model_repository=served_repository, max_queue_images=1, max_files=1, max_queue_delay_ms=200)
    app = create_app(settings)
    image = encode(load_splits("fashion-mnist").test.images[0])
    with TestClient(app) as client:
        poll(lambda: client.get("/readyz").status_code == 200, "ready")
        service = app.state.service
        service.models["msdnet_fmnist"].batcher.waiting_images = 1  # the queue is full
        single = client.post("/classify", content=image, headers={"content-type": "image/png"})
        batch = client.post("/classify/batch", files=[("files", ("a.png", image, "image/png"))])
        service.models["msdnet_fmnist"].batcher.waiting_images = 0
        metrics = client.get("/metrics").text
    for response in (single, batch):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == "overloaded"
    assert 'exitserve_rejected_total{model="msdnet_fmnist"} 2.0' in metrics


def test_only_default_budget_traffic_feeds_the_controller() -> None:
    """Requests naming a budget or thresholds are the client's choice: they must not pull
    the server's default-budget thresholds around."""
    engine = synthetic_engine(default_budget=0.5, online_budget=True)
    service = InferenceService(Settings(), Metrics())
    image = probs_with_confidence(np.full((1, 3), 0.6))[0]  # never confident: runs to the last exit

    async def scenario() -> None:
        service.attach({"synthetic": served(engine)})
        for options in (InferenceOptions(budget=0.5), InferenceOptions("thresholds", thresholds=(0.9, 0.9))):
            await service.plane.infer(InferenceRequest(NormalizedImages(as_normalized(image[None])), options))
        assert engine.policy.controller.measured is None and engine.policy.effective_budget == 0.5
        result = await service.plane.infer(InferenceRequest(NormalizedImages(as_normalized(image[None]))))
        assert result.results[0].cost_fraction == 1.0
        assert engine.policy.controller.measured == 1.0 and engine.policy.effective_budget < 0.5
        await service.stop()

    asyncio.run(scenario())


def test_a_calibration_for_another_export_refuses_to_load(served_repository: Path, tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "msdnet_fmnist"
    shutil.copytree(served_repository / "msdnet_fmnist", folder)
    raw = json.loads((folder / "calibration.json").read_text())
    raw["cost_fractions"][0] += 0.01
    (folder / "calibration.json").write_text(json.dumps(raw))
    with pytest.raises(StartupError, match="calibration.json.*calibrate this export again"):
        with TestClient(create_app(Settings(model_repository=tmp_path / "repo"))):
            pass


def test_readiness_turns_503_when_a_model_stops_making_progress() -> None:
    release = threading.Event()
    runtime = SyntheticRuntime(fail_when=lambda stage, rows: not release.wait(10))  # a stage that hangs
    engine = synthetic_engine(runtime)
    service = InferenceService(Settings(watchdog_s=0.2), Metrics())
    image = probs_with_confidence(np.full((1, 3), 0.95))[0]

    async def scenario() -> None:
        service.attach({"synthetic": served(engine)})
        assert service.readiness()[0]
        stuck = asyncio.ensure_future(service.plane.infer(InferenceRequest(NormalizedImages(as_normalized(image[None])))))
        deadline = time.monotonic() + 10
        while service.readiness()[0]:  # until the watchdog (0.2 s) sees work and no finished batch
            assert time.monotonic() < deadline, "the watchdog never fired"
            await asyncio.sleep(0.02)
        ready, body = service.readiness()
        assert not ready and body["status"] == "stalled" and body["models"] == ["synthetic"]
        release.set()
        await stuck
        assert service.readiness() == (True, {"status": "ready", "models": ["synthetic"]})
        await service.stop()

    asyncio.run(scenario())
