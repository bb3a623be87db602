"""Metric values, not only names, after a known sequence of requests to a live server."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server

DEFAULT, OTHER = "msdnet_fmnist", "msdnet_copy"


@pytest.fixture(scope="module")
def two_models(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served model twice, under two names: the metrics must tell them apart."""
    root = tmp_path_factory.mktemp("two_models")
    shutil.copytree(served_repository / DEFAULT, root / DEFAULT)
    shutil.copytree(served_repository / DEFAULT, root / OTHER)
    manifest = json.loads((root / OTHER / "manifest.json").read_text())
    (root / OTHER / "manifest.json").write_text(json.dumps({**manifest, "name": OTHER}))
    return root


@pytest.fixture(scope="module")
def url(two_models: Path) -> Iterator[str]:
    with live_server(Settings(model_repository=two_models, online_budget=False)) as base:
        yield base


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metric_values_after_a_known_sequence(url: str) -> None:
    pixels, _ = fashion_images(4)
    blob = encode(pixels[0])
    exits = httpx.get(f"{url}/v1/models/{DEFAULT}").json()["exits"]
    first_cost = httpx.get(f"{url}/v1/models/{DEFAULT}").json()["manifest"]["stages"][0]["cost_fraction"]
    png = {"content-type": "image/png"}
    for _ in range(3):  # full depth, raw body
        assert httpx.post(f"{url}/classify", content=blob, headers=png, params={"budget": 1.0}).status_code == 200
    for _ in range(2):  # everyone leaves at exit 0
        zeros = ",".join(["0"] * (exits - 1))
        r = httpx.post(f"{url}/classify", files={"file": ("x.png", blob, "image/png")}, data={"thresholds": zeros})
        assert r.json()["exit"]["index"] == 0
    other = httpx.post(f"{url}/classify", files={"file": ("x.png", blob, "image/png")},
                       data={"model": OTHER, "budget": "1.0"})  # the model named in a form field
    assert other.json()["model"] == OTHER
    assert httpx.post(f"{url}/classify", content=b"not an image", headers=png).status_code == 415
    batch = [("files", (f"{i}.png", encode(p), "image/png")) for i, p in enumerate(pixels)]
    assert httpx.post(f"{url}/classify/batch", files=batch, data={"budget": "1.0"}).status_code == 200

    got = samples(httpx.get(f"{url}/metrics").text)

    def value(name: str, **labels: str) -> float:
        return got.get((name, frozenset(labels.items())), 0.0)

    assert value("exitserve_images_total", model=DEFAULT) == 3 + 2 + 4
    assert value("exitserve_images_total", model=OTHER) == 1
    assert value("exitserve_exits_total", model=DEFAULT, exit=str(exits - 1)) == 3 + 4
    assert value("exitserve_exits_total", model=DEFAULT, exit="0") == 2
    assert value("exitserve_exits_total", model=OTHER, exit=str(exits - 1)) == 1
    assert value("exitserve_cost_fraction_total", model=DEFAULT) == pytest.approx(3 + 2 * first_cost + 4)
    assert value("exitserve_requests_total", route="/classify", status="200") == 6
    assert value("exitserve_requests_total", route="/classify", status="415") == 1
    assert value("exitserve_requests_total", route="/classify/batch", status="200") == 1
    # latency is labelled with the model each request resolved to, form fields included
    assert value("exitserve_request_latency_seconds_count", route="/classify", model=OTHER) == 1
    assert value("exitserve_request_latency_seconds_count", route="/classify", model=DEFAULT) == 6
    # sequential requests: one engine call each; the batch endpoint is one call of 4
    assert value("exitserve_batch_size_count", model=DEFAULT) == 6
    assert value("exitserve_batch_size_sum", model=DEFAULT) == 3 + 2 + 4
    assert value("exitserve_stage_latency_seconds_count", model=DEFAULT, stage="0") == 6
    assert value("exitserve_stage_latency_seconds_count", model=DEFAULT, stage=str(exits - 1)) == 3 + 1
    assert value("exitserve_queue_images", model=DEFAULT) == 0
    assert value("exitserve_budget", model=DEFAULT) == 0.25
    assert value("exitserve_rejected_total", model=DEFAULT) == 0
