"""Two worker processes on one port: both serve, /metrics adds them up, SIGTERM stops both."""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path

import httpx

from tests.server.images import encode, fashion_images
from tests.server.test_reliability import ServerProcess, metric

REQUESTS = 120


def test_two_workers_share_the_port_the_metrics_and_the_shutdown(served_repository: Path) -> None:
    server = ServerProcess(served_repository, workers=2, drain_grace_s=1, shutdown_timeout_s=5)
    try:
        server.wait_ready()
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready" and ready["workers"] == 2
        blobs = [encode(p) for p in fashion_images(24)[0]]
        answered_by: collections.Counter[str] = collections.Counter()
        for i in range(REQUESTS):  # a new connection each time: the kernel spreads them over the workers
            response = httpx.post(f"{server.url}/classify", content=blobs[i % len(blobs)],
                                  headers={"content-type": "image/png"})
            assert response.status_code == 200
            answered_by[response.headers["x-exitserve-worker"]] += 1
        assert set(answered_by) == {"0", "1"}, answered_by
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "exitserve_requests_total", route="/classify", status="200") == REQUESTS
        assert metric(text, "exitserve_images_total", model="msdnet_fmnist") == REQUESTS
        assert metric(text, "exitserve_request_latency_seconds_count", route="/classify",
                      model="msdnet_fmnist") == REQUESTS
        assert metric(text, "exitserve_queue_images", model="msdnet_fmnist") == 0
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code, output = server.wait_exit(timeout=40)
        assert code == 0, output
        assert time.monotonic() - sent < 1 + 5 + 5
    finally:
        server.stop()
