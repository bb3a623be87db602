"""exitserve on a real two-node Ray cluster on loopback, deployed with ``exitserve serve
--ray``: through Serve's HTTP proxy every answer equals the single-process server's, both
replicas (one per node) answer, each replica's own metrics count what it answered; then a
node is lost, the service goes on answering, and a node that joins gets the lost replica.

The proxy runs on the head only, and Serve's preference for replicas on the proxy's own
node is off (``RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0``): every request enters at one
place and Serve, not the kernel, spreads them over the nodes, so the second node's replica
is reached across nodes. The numbers are printed (``-s``) for the README.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from exitserve.loadtest.images import encoded_test_images
from exitserve.server.settings import Settings

from tests.support.live import free_port, live_server, wait_until_ready
from tests.support.raw_http import metric
from tests.support.ray_cluster import LocalRayCluster

pytest.importorskip("ray.serve", reason="the 'ray' extra is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMAGES = 300
QUERY = {"budget": "0.25", "top_k": "3"}  # an explicit budget: the online controller does not move it
READY_TIMEOUT_S = 180
RECOVERY_TIMEOUT_S = 120
RECOVERED_AFTER = 20  # consecutive answers after the loss that count as recovered
BOTH_ANSWER_TIMEOUT_S = 60  # sequential requests until both replicas have answered some


def answer(response: httpx.Response) -> dict:
    """What must agree between servers: everything but the timings."""
    body = response.json()
    body.pop("timings_ms")
    return body


def classify(url: str, blob: bytes, timeout: float = 30.0) -> httpx.Response:
    # a new connection per request, as independent clients would open
    return httpx.post(f"{url}/classify", params=QUERY, content=blob, headers={"content-type": "image/png"},
                      timeout=timeout)


def metrics_targets(url: str) -> list[dict]:
    response = httpx.get(f"{url}/ray/metrics-targets", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


class Traffic(threading.Thread):
    """One client sending images one after another until stopped; records every outcome."""

    def __init__(self, url: str, blobs: list[bytes], expected: list[dict]) -> None:
        super().__init__(daemon=True)
        self.url, self.blobs, self.expected = url, blobs, expected
        self.outcomes: list[tuple[float, str | None, str]] = []  # (time, replica or None, what)
        self.stopping = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            k = i % len(self.blobs)
            try:
                response = classify(self.url, self.blobs[k], timeout=15)
                if response.status_code != 200:
                    outcome = (None, f"HTTP {response.status_code}: {response.text[:200]}")
                elif answer(response) != self.expected[k]:
                    outcome = (None, f"a different answer for image {k}")
                else:
                    outcome = (response.headers["x-exitserve-replica"], "ok")
            except httpx.HTTPError as exc:
                outcome = (None, f"{type(exc).__name__}: {exc}")
            self.outcomes.append((time.monotonic(), *outcome))
            i += 1

    def recovered_at(self, since: float) -> float | None:
        """When, after ``since``, answers came back for good: the first answer after the
        last failure, once ``RECOVERED_AFTER`` answers in a row have followed it."""
        outcomes = [o for o in list(self.outcomes) if o[0] >= since]
        failed = [i for i, (_, replica, _) in enumerate(outcomes) if replica is None]
        first_good = failed[-1] + 1 if failed else 0
        if len(outcomes) - first_good < RECOVERED_AFTER:
            return None
        return outcomes[first_good][0]

    def replicas_since(self, since: float) -> set[str]:
        """The replicas that answered from ``since``."""
        return {replica for at, replica, _ in list(self.outcomes) if replica and at >= since}

    def wait_for_both(self, since: float, timeout: float = BOTH_ANSWER_TIMEOUT_S) -> None:
        """Poll until two replicas have answered from ``since``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.replicas_since(since)) < 2:
            assert self.is_alive(), "the traffic thread stopped"
            assert time.monotonic() < deadline, f"not both replicas answered: {list(self.outcomes)[-10:]}"
            time.sleep(0.1)

    def longest_silence(self, since: float) -> float:
        """The longest time without an answer, from ``since``."""
        answered = [since] + [at for at, replica, _ in list(self.outcomes) if replica and at >= since]
        return max(b - a for a, b in zip(answered, answered[1:]))


def test_two_nodes_serve_like_one_process_and_survive_losing_one(served_repository: Path) -> None:
    blobs, _ = encoded_test_images(IMAGES)
    with live_server(Settings(model_repository=served_repository)) as reference_url:
        expected = []
        for blob in blobs:
            response = classify(reference_url, blob)
            assert response.status_code == 200, response.text
            expected.append(answer(response))

    cluster = LocalRayCluster(cpus_per_node=1)
    cluster.env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    cli: subprocess.Popen | None = None
    traffic: Traffic | None = None
    numbers: dict[str, object] = {"requests": IMAGES, "replicas": 2, "nodes": 2}
    try:
        started = time.monotonic()
        head = cluster.start_head()
        second = cluster.add_node()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cli = subprocess.Popen(
            [sys.executable, "-m", "exitserve.cli", "serve", "--ray", cluster.address,
             "--model-repository", str(served_repository), "--host", "127.0.0.1", "--port", str(port),
             "--replicas", "2", "--replica-cpus", "1", "--proxy-location", "HeadOnly"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env)
        # through Serve's proxy, a process of the head node (HeadOnly): the port is the cluster's
        wait_until_ready(url, cli, READY_TIMEOUT_S, owners=lambda: [p.pid for p in head.processes()])
        # Serve reports the application running once both replicas are; the proxy's router
        # learns of the second one a moment later (long poll): wait until it routes to both
        warm_up: collections.Counter[str] = collections.Counter()  # answers per replica, counted in metrics too
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(warm_up) < 2:
            assert time.monotonic() < deadline, f"the proxy routed only to {set(warm_up)}"
            response = classify(url, blobs[0])
            assert response.status_code == 200, response.text
            warm_up[response.headers["x-exitserve-replica"]] += 1
        numbers["cluster_and_deploy_s"] = round(time.monotonic() - started, 1)

        # ---- every answer equals the single process's; both replicas, on two nodes, answer
        by_replica: collections.Counter[str] = collections.Counter()
        node_of: dict[str, str] = {}
        for k, blob in enumerate(blobs):
            response = classify(url, blob)
            assert response.status_code == 200, response.text
            assert answer(response) == expected[k], f"image {k}: {answer(response)} != {expected[k]}"
            replica = response.headers["x-exitserve-replica"]
            by_replica[replica] += 1
            node_of[replica] = response.headers["x-exitserve-node"]
        assert len(by_replica) == 2, by_replica
        assert len(set(node_of.values())) == 2, node_of
        numbers["answers_equal"] = f"{IMAGES}/{IMAGES}"
        numbers["answers_per_replica"] = sorted(by_replica.values())

        # ---- each replica's own metrics listener counts what that replica answered
        targets = metrics_targets(url)
        assert {t["labels"]["replica"] for t in targets} == set(by_replica), targets
        for target in targets:
            [address] = target["targets"]
            text = httpx.get(f"http://{address}/metrics", timeout=10).text
            replica = target["labels"]["replica"]
            answered = by_replica[replica] + warm_up[replica]
            assert metric(text, "exitserve_images_total", model="msdnet_fmnist") == answered
            assert metric(text, "exitserve_requests_total", route="/classify", status="200") == answered
            assert target["labels"]["node"] == node_of[replica]

        # ---- lose the second node while a client keeps sending
        traffic = Traffic(url, blobs, expected)
        traffic.start()
        traffic.wait_for_both(since=0.0)  # the client is under way, on both replicas, when the node goes
        killed = time.monotonic()
        second.kill(signal.SIGKILL)
        deadline = killed + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline and traffic.recovered_at(killed) is None:
            time.sleep(0.2)
        recovered = traffic.recovered_at(killed)
        assert recovered is not None, traffic.outcomes[-20:]
        # the cluster notices: the lost replica leaves the metrics targets
        while time.monotonic() < deadline and len(metrics_targets(url)) != 1:
            time.sleep(0.5)
        noticed = time.monotonic()
        [survivor] = metrics_targets(url)
        survivor_replica = survivor["labels"]["replica"]
        assert survivor_replica in by_replica
        answered_after_loss = {r for at, r, _ in traffic.outcomes if r and at > recovered}
        assert answered_after_loss <= {survivor_replica}, answered_after_loss
        numbers["answering_again_s"] = round(recovered - killed, 2)
        numbers["longest_silence_s"] = round(traffic.longest_silence(killed), 2)
        numbers["lost_replica_dropped_s"] = round(noticed - killed, 1)

        # ---- a node joins: Serve places the missing replica there
        joined = time.monotonic()
        cluster.add_node()
        while time.monotonic() < joined + RECOVERY_TIMEOUT_S and len(metrics_targets(url)) != 2:
            time.sleep(0.5)
        assert len(metrics_targets(url)) == 2
        full_strength = time.monotonic()
        traffic.wait_for_both(since=full_strength)  # the proxy routes to the new replica too
        traffic.stopping.set()
        traffic.join(30)
        assert not traffic.is_alive()
        failures = [o for o in traffic.outcomes if o[1] is None]
        numbers["requests_during_loss"] = len(traffic.outcomes)
        numbers["failed_during_loss"] = len(failures)
        numbers["replica_rescheduled_s"] = round(full_strength - joined, 1)
        # in flight on the lost node when it went: at most the one request this client had there
        assert len(failures) <= 1, failures

        # ---- SIGTERM: the command deletes the application and exits 0
        cli.send_signal(signal.SIGTERM)
        output, _ = cli.communicate(timeout=120)
        assert cli.returncode == 0, output[-4000:]
        numbers["total_s"] = round(time.monotonic() - started, 1)
        print("\nray cluster test:", json.dumps(numbers))
    finally:
        if traffic is not None:
            traffic.stopping.set()
            traffic.join(30)
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait(10)
        cluster.stop()
