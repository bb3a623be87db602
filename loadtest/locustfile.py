"""Locust scenarios for exitserve. Headless and bounded, e.g.:

    locust -f loadtest/locustfile.py --headless -u 16 -r 8 -t 60s --host http://127.0.0.1:8000

Environment: ``EXITSERVE_LOAD_BUDGET`` (budget sent with each request, default: the
server's), ``EXITSERVE_LOAD_IMAGES`` (how many Fashion-MNIST test images to cycle, 512),
``EXITSERVE_LOAD_BATCH`` (images per /classify/batch request, 32).
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, tag, task

from loadtest.images import encoded_test_images


def _encoded_test_images(count: int) -> list[tuple[bytes, int]]:
    blobs, labels = encoded_test_images(count)
    return [(blob, int(label)) for blob, label in zip(blobs, labels)]


IMAGES = _encoded_test_images(int(os.environ.get("EXITSERVE_LOAD_IMAGES", "512")))
BUDGET = os.environ.get("EXITSERVE_LOAD_BUDGET")
BATCH = int(os.environ.get("EXITSERVE_LOAD_BATCH", "32"))


class ClassifyUser(HttpUser):
    """One image per request, on the raw-body fast path or as multipart."""

    wait_time = between(0.0, 0.01)

    def _params(self) -> dict:
        return {"budget": BUDGET} if BUDGET else {}

    @tag("single")
    @task(8)
    def classify_raw(self) -> None:
        data, label = random.choice(IMAGES)
        with self.client.post("/classify", data=data, headers={"content-type": "image/png"},
                              params=self._params(), name="/classify (raw)", catch_response=True) as response:
            if response.status_code == 200 and not 0 <= response.json()["class_index"] < 10:
                response.failure(f"class index out of range for label {label}")

    @tag("single")
    @task(2)
    def classify_multipart(self) -> None:
        data, _ = random.choice(IMAGES)
        self.client.post("/classify", files={"file": ("img.png", data, "image/png")}, params=self._params(),
                         name="/classify (multipart)")


class BatchUser(HttpUser):
    """Budgeted batches of ``EXITSERVE_LOAD_BATCH`` images."""

    wait_time = between(0.05, 0.2)
    weight = 1

    @tag("batch")
    @task
    def classify_batch(self) -> None:
        chosen = random.sample(IMAGES, min(BATCH, len(IMAGES)))
        files = [("files", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chosen)]
        data = {"budget": BUDGET} if BUDGET else {}
        with self.client.post("/classify/batch", files=files, data=data, catch_response=True) as response:
            if response.status_code == 200 and len(response.json()["results"]) != len(chosen):
                response.failure("one result per uploaded image expected")
