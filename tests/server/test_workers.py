"""Two worker processes on one port: each serves, /readyz speaks for the group, /metrics adds
them up, SIGTERM stops both, and a worker that dies stops the group.

The kernel decides which worker accepts a connection on the shared socket and promises no
spread, so the tests never count on one: to reach one worker they stop the other
(SIGSTOP), and the running one must then take every connection."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil

from tests.support.images import encode, fashion_images
from tests.support.processes import MARGIN_S, ServerProcess, eventually, gone, running
from tests.support.raw_http import metric

MODEL = "msdnet_fmnist"
PER_WORKER = 12  # requests each worker answers alone
MIN_CORRECT = 11  # of the first 12 test images: offline, the default budget gets all 12 right (one spare)


def workers_of(server: ServerProcess) -> list[psutil.Process]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = [p for p in server.descendants() if "--multiprocessing-fork" in p.cmdline()]
    assert len(found) == 2, [p.cmdline() for p in found]
    return found


@contextmanager
def only(worker: psutil.Process, others: list[psutil.Process]) -> Iterator[None]:
    """Only ``worker`` can accept connections: the others are stopped until the block ends."""
    stopped = [p for p in others if p.pid != worker.pid]
    for process in stopped:
        process.send_signal(signal.SIGSTOP)
    try:
        eventually(lambda: all(p.status() == psutil.STATUS_STOPPED for p in stopped), 10, "the others are stopped")
        yield
    finally:
        for process in stopped:
            process.send_signal(signal.SIGCONT)


def classify_all(url: str, blobs: list[bytes]) -> tuple[list[int], set[str]]:
    """Each image on a new connection: (class indices, the workers that answered)."""
    classes, answered_by = [], set()
    for blob in blobs:
        response = httpx.post(f"{url}/classify", content=blob, headers={"content-type": "image/png"}, timeout=60)
        assert response.status_code == 200, response.text
        classes.append(response.json()["class_index"])
        answered_by.add(response.headers["x-exitserve-worker"])
    return classes, answered_by


def test_each_worker_serves_and_the_group_shares_readiness_metrics_and_shutdown(served_repository: Path) -> None:
    with running(served_repository, workers=2, online_budget="false", drain_grace_s=1, shutdown_timeout_s=5) as server:
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready" and ready["workers"] == 2 and ready["worker"] in (0, 1)
        pixels, labels = fashion_images(PER_WORKER)
        blobs = [encode(p) for p in pixels]
        workers = workers_of(server)
        answers: dict[str, list[int]] = {}
        for worker in workers:
            with only(worker, workers):
                group = httpx.get(f"{server.url}/readyz").json()  # the other one is stopped, yet ready
                assert group["status"] == "ready" and group["workers"] == 2
                classes, answered_by = classify_all(server.url, blobs)
            assert len(answered_by) == 1 and answered_by <= {"0", "1"}, answered_by
            answers[answered_by.pop()] = classes
        assert set(answers) == {"0", "1"}  # two workers, two identities
        assert answers["0"] == answers["1"]  # the same model and settings: the same answers
        assert int(np.sum(np.array(answers["0"]) == labels)) >= MIN_CORRECT, (answers["0"], labels.tolist())

        scraped = httpx.get(f"{server.url}/metrics")  # whichever worker answers speaks for both
        assert scraped.headers["x-exitserve-worker"] in ("0", "1")
        total = 2 * PER_WORKER
        assert metric(scraped.text, "exitserve_requests_total", route="/classify", status="200") == total
        assert metric(scraped.text, "exitserve_images_total", model=MODEL) == total
        assert metric(scraped.text, "exitserve_request_latency_seconds_count", route="/classify", model=MODEL) == total

        server.proc.send_signal(signal.SIGTERM)
        code, output = server.wait_exit(timeout=1 + 5 + MARGIN_S)
        assert code == 0, output
        eventually(lambda: gone(workers), 30, "both workers exited")


def test_a_worker_that_dies_stops_the_group(served_repository: Path) -> None:
    with running(served_repository, workers=2, drain_grace_s=0.5, shutdown_timeout_s=2) as server:
        family = server.descendants()  # the workers and multiprocessing's resource tracker
        victim, survivor = workers_of(server)
        os.kill(victim.pid, signal.SIGKILL)
        code, output = server.wait_exit(timeout=0.5 + 2 + MARGIN_S)
        assert code == 1, output
        assert "exited on its own: stopping the other workers" in output, output
        assert survivor in family
        eventually(lambda: gone(family), 30, "no process of the group is left")
