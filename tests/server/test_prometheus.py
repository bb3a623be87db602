"""A real Prometheus (Debian's package) scrapes a real exitserve and sees its metrics."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import free_port, live_server

PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (scripts/install.sh installs it)")
def test_prometheus_scrapes_exit_depth_and_throughput(served_repository: Path, tmp_path: Path) -> None:
    with live_server(Settings(model_repository=served_repository)) as url:
        target = url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n"
            f"  - job_name: exitserve\n    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            pixels, _ = fashion_images(20)
            for p in pixels:
                assert httpx.post(f"{url}/classify", content=encode(p), headers={"content-type": "image/png"},
                                  params={"budget": 0.5}).status_code == 200
            api = f"http://127.0.0.1:{port}/api/v1/query"
            queries = {
                "sum(exitserve_images_total)": 20.0,
                "sum(exitserve_exits_total)": 20.0,
                'sum(exitserve_request_latency_seconds_count{route="/classify"})': 20.0,
            }
            deadline = time.monotonic() + 60
            seen: dict[str, float] = {}
            while time.monotonic() < deadline and seen != queries:
                for query in queries:
                    try:
                        result = httpx.get(api, params={"query": query}, timeout=2).json()["data"]["result"]
                    except (httpx.HTTPError, KeyError, ValueError):
                        continue
                    if result:
                        seen[query] = float(result[0]["value"][1])
                time.sleep(0.5)
            assert seen == queries
        finally:
            prom.terminate()
            prom.wait(timeout=20)
