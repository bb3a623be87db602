"""Per-request phase timings (EXITSERVE_PHASE_METRICS) on a live server, and the GIL
switch interval the app sets."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exitserve.loadtest.breakdown import phase_means_ms, phase_totals
from exitserve.server.http.phases import FRAMEWORK, PARTITION
from exitserve.server.process import configure_process
from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server


@pytest.fixture(scope="module")
def url(served_repository: Path) -> Iterator[str]:
    with live_server(Settings(model_repository=served_repository, phase_metrics=True, online_budget=False,
                              switch_interval_us=7)) as base:
        yield base


def test_phases_partition_each_request(url: str) -> None:
    pixels, _ = fashion_images(6)
    before = phase_totals(url)
    for p in pixels[:3]:  # raw bodies, full depth: every stage runs
        r = httpx.post(f"{url}/classify", content=encode(p), headers={"content-type": "image/png"},
                       params={"budget": 1.0})
        assert r.status_code == 200
    for p in pixels[3:]:  # multipart
        assert httpx.post(f"{url}/classify", files={"file": ("x.png", encode(p), "image/png")}).status_code == 200
    assert httpx.post(f"{url}/classify", content=b"", headers={"content-type": "image/png"}).status_code == 422
    means, timed = phase_means_ms(before, phase_totals(url))
    assert timed == 6  # refusals are not timed
    exits = httpx.get(f"{url}/v1/models/msdnet_fmnist").json()["exits"]
    for phase in (*PARTITION, FRAMEWORK, "app", *(f"stage_{k}" for k in range(exits))):
        assert phase in means, phase
    assert means["multipart"] > 0 and means["decode"] > 0 and means["send"] > 0 and means["inference"] > 0
    partition = sum(means[p] for p in (*PARTITION, FRAMEWORK))
    assert partition == pytest.approx(means["app"], rel=1e-6)  # the phases add up to the app's time
    stages = sum(means[f"stage_{k}"] for k in range(exits))
    assert 0 < stages <= means["inference"]  # the stages run inside the batch's run


def test_the_app_leaves_the_process_alone(url: str) -> None:
    """live_server runs an app with switch_interval_us=7 in this process: building and
    serving it must not change process-wide settings (tests build many apps); the
    process's entry point applies them."""
    assert sys.getswitchinterval() != pytest.approx(7e-6)


def test_configure_process_sets_the_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        configure_process(Settings(switch_interval_us=7))
        assert sys.getswitchinterval() == pytest.approx(7e-6)
    finally:
        sys.setswitchinterval(before)
