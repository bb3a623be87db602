"""Each setting seen working on the real app (its real lifespan: load, warm-up, serve), not
only parsed: what a request gets changes when the setting does. ``default_model`` is in
test_multi_model.py, beside the repository with several models."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from exitserve.repository.format import RepositoryError
from exitserve.server.http.app import create_app
from exitserve.server.repository import check_repository
from exitserve.server.settings import Settings
from exitserve.server.slo import LatencyObjective
from tests.support.images import encode, fashion_images

MODEL = "msdnet_fmnist"
KEY = "k-123"


@pytest.fixture(scope="module")
def image() -> bytes:
    return encode(fashion_images(1)[0][0])


def settings_for(repository: Path, **values: object) -> Settings:
    return Settings(model_repository=repository, online_budget=False, provider="cpu", **values)


@contextmanager
def serving(settings: Settings, timeout: float = 120.0) -> Iterator[TestClient]:
    """The real app under TestClient, once every model is warm and serving."""
    app = create_app(settings)
    with TestClient(app) as client:
        state = app.state.service.state
        deadline = time.monotonic() + timeout
        while not state.ready:
            assert state.load_error is None, state.load_error
            assert time.monotonic() < deadline, "the models were not ready in time"
            time.sleep(0.02)
        yield client


def classify(client: TestClient, image: bytes, headers: dict[str, str] | None = None,
             **params: object) -> httpx.Response:
    return client.post("/classify", content=image, params=params,
                       headers={"content-type": "image/png", **(headers or {})})


def objective_of(app: FastAPI) -> LatencyObjective:
    objective = app.state.service.catalog.get(MODEL).engine.policy.objective
    assert objective is not None
    return objective


def pin_at_floor(objective: LatencyObjective) -> None:
    """The objective held at its floor: never calm for long enough to step back up."""
    objective.hold = 10**9
    objective.step = len(objective.ladder) - 1


def test_max_top_k_bounds_top_k(served_repository: Path, image: bytes) -> None:
    with serving(settings_for(served_repository, max_top_k=3)) as client:
        allowed = classify(client, image, top_k=3)
        assert allowed.status_code == 200 and len(allowed.json()["top_k"]) == 3
        over = classify(client, image, top_k=4)  # the model has 10 labels: only the setting refuses it
        assert over.status_code == 422 and over.json()["error"] == "invalid_top_k"
        assert "between 1 and 3" in over.json()["detail"]


def test_retry_after_s_is_what_a_503_says(served_repository: Path, image: bytes) -> None:
    """The queue full (as under a burst): refused at once, told when to come back."""
    with serving(settings_for(served_repository, max_queue_images=1, max_files=1, retry_after_s=7)) as client:
        batcher = client.app.state.service.models[MODEL].batcher
        batcher.waiting_images = 1
        try:
            single = classify(client, image)
            batch = client.post("/classify/batch", files=[("files", ("0.png", image, "image/png"))])
            v2 = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * (28 * 28)}]})
        finally:
            batcher.waiting_images = 0
        for response in (single, batch, v2):
            assert response.status_code == 503 and response.headers["retry-after"] == "7"
        assert batch.json()["error"] == "overloaded"
        assert classify(client, image).status_code == 200  # room again


def test_a_file_limit_the_queue_cannot_hold_is_refused_at_start(served_repository: Path) -> None:
    """A request of max_files images could never be admitted to a smaller queue, however idle
    the server: the configuration is refused before serving, naming both settings."""
    with pytest.raises(RepositoryError, match="EXITSERVE_MAX_FILES.*EXITSERVE_MAX_QUEUE_IMAGES"):
        check_repository(settings_for(served_repository, max_queue_images=4))
    check_repository(settings_for(served_repository, max_queue_images=4, max_files=4))


def test_protect_health_puts_the_probes_behind_the_keys(served_repository: Path, image: bytes) -> None:
    probes = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
    keyed = settings_for(served_repository, api_keys=[KEY])
    with serving(keyed) as client:  # keys alone: inference is closed, the probes stay open
        assert classify(client, image).status_code == 401
        assert [client.get(path).status_code for path in probes] == [200] * len(probes)
    with serving(keyed.model_copy(update={"protect_health": True})) as client:
        assert [client.get(path).status_code for path in probes] == [401] * len(probes)
        assert [client.get(path, headers={"X-API-Key": KEY}).status_code for path in probes] == [200] * len(probes)
        assert client.get("/metrics").status_code == 200  # protect_metrics is a switch of its own


def test_api_keys_from_the_environment_are_enforced(served_repository: Path, image: bytes,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXITSERVE_API_KEYS", "alpha, beta")
    monkeypatch.setenv("EXITSERVE_MODEL_REPOSITORY", str(served_repository))
    settings = Settings(online_budget=False, provider="cpu")
    assert settings.api_keys == ["alpha", "beta"]
    with serving(settings) as client:
        assert classify(client, image).status_code == 401
        assert classify(client, image, {"X-API-Key": "alpha, beta"}).status_code == 401  # one key, not the list
        assert classify(client, image, {"Authorization": "Bearer beta"}).status_code == 200
        assert classify(client, image, {"X-API-Key": "alpha"}).status_code == 200


FLOOR = 0.2  # between the cheapest calibrated point (the first exit, ~0.11) and the default budget 0.25


def test_slo_floor_budget_is_the_bottom_of_the_objectives_ladder(served_repository: Path, image: bytes) -> None:
    unfloored = settings_for(served_repository, latency_slo_ms=60_000)
    with serving(unfloored) as client:
        free = client.get(f"/v1/models/{MODEL}").json()
    with serving(unfloored.model_copy(update={"slo_floor_budget": FLOOR})) as client:
        floored = client.get(f"/v1/models/{MODEL}").json()
        pin_at_floor(objective_of(client.app))
        pressed = classify(client, image).json()  # a default-budget request, the objective at its floor
    curve = sorted(p["budget"] for p in floored["calibration"]["curve"])
    ladder = floored["latency_objective"]["ladder"]
    floor = min(b for b in curve if b >= FLOOR)
    assert free["latency_objective"]["floor_budget"] == free["latency_objective"]["ladder"][-1] == curve[0] < FLOOR
    assert floored["latency_objective"]["floor_budget"] == ladder[-1] == floor
    assert ladder == [b for b in free["latency_objective"]["ladder"] if b >= floor]  # the same ladder, cut short
    assert pressed["budget_applied"] == floor and "latency objective" in pressed["budget_note"]


@pytest.mark.parametrize("lowers", [False, True])
def test_slo_lowers_request_budgets_lets_the_objective_cut_a_named_budget(served_repository: Path, image: bytes,
                                                                          lowers: bool) -> None:
    settings = settings_for(served_repository, latency_slo_ms=60_000, slo_lowers_request_budgets=lowers)
    with serving(settings) as client:
        objective = objective_of(client.app)
        pin_at_floor(objective)
        body = classify(client, image, budget=1.0).json()
        first_exit = client.get(f"/v1/models/{MODEL}").json()["manifest"]["stages"][0]["cost_fraction"]
    assert body["budget"] == 1.0
    if lowers:  # cut to the floor, the cheapest calibrated point: everyone leaves at the first exit
        assert body["budget_applied"] == objective.floor_budget == pytest.approx(first_exit)
        assert "latency objective" in body["budget_note"]
        assert body["exit"]["index"] == 0
    else:  # the request keeps the budget it named: full depth
        assert body["budget_applied"] == 1.0 and body["budget_note"] is None
        assert body["exit"]["index"] == 4 and body["exit"]["cost_fraction"] == 1.0


# ---------------------------------------------------------------------------- log_format, where the process starts


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_log_format_json_makes_every_log_line_json(served_repository: Path, tmp_path: Path) -> None:
    """``exitserve serve`` with EXITSERVE_LOG_FORMAT=json: uvicorn's lines and ours are JSON
    objects. Port 0: the port comes from uvicorn's own (JSON) start-up line."""
    env = {"EXITSERVE_LOG_FORMAT": "json", "EXITSERVE_PROVIDER": "cpu", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "exitserve.cli", "serve", "--model-repository",
                               str(served_repository), "--host", "127.0.0.1", "--port", "0", "--log-level", "info"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env={**os.environ, **env})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(server.stdout, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None:
            assert time.monotonic() < deadline, "no start-up line within 120 s:\n" + "".join(seen)
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, "the server exited:\n" + "".join(seen)
            seen.append(line)
            if found := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline and server.poll() is None, "never ready:\n" + "".join(seen)
                time.sleep(0.05)
    finally:
        server.kill()
        server.wait(30)
        reader.join(30)
    while (line := lines.get_nowait()) is not None:
        seen.append(line)
    records = [json.loads(line) for line in seen if line.strip()]  # every line: a JSON object, or this raises
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r) for r in records), seen
    assert any(r["logger"] == "exitserve.server.repository" and r["message"].startswith(f"loaded {MODEL}")
               for r in records), seen
    assert any(r["logger"].startswith("uvicorn") and "Uvicorn running on" in r["message"] for r in records)
