"""Faults, floods, slow and vanishing clients, shutdown: the server fails fast, refuses
cheaply, and never hangs. Traffic goes to 127.0.0.1 only, bounded in count and time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exitserve.server.settings import Settings
from tests.server.images import encode, fashion_images
from tests.server.live import free_port, live_server, wait_until_ready

MODEL = "msdnet_fmnist"


# ---------------------------------------------------------------------------- helpers


def raw_request(port: int, head: bytes, body: bytes = b"", wait_s: float = 5.0) -> tuple[bytes, float, bool]:
    """Send ``head`` and ``body`` on a fresh socket and read until the server closes or
    ``wait_s`` passes: (what came back, seconds until it closed or the wait ended, closed?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        started = time.monotonic()
        received = b""
        sock.settimeout(0.2)
        while time.monotonic() - started < wait_s:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return received, time.monotonic() - started, True
            if not chunk:
                return received, time.monotonic() - started, True
            received += chunk
        return received, time.monotonic() - started, False


def post_head(path: str, length: int, content_type: str = "image/png") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
            f"content-length: {length}\r\n\r\n").encode()


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


class ServerProcess:
    """``exitserve serve`` in its own process, for signals and start-up faults."""

    def __init__(self, repository: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, **{f"EXITSERVE_{k.upper()}": str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exitserve.cli", "serve", "--model-repository", str(repository),
             "--port", str(self.port), "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, text=True)

    def wait_ready(self, timeout: float = 120) -> None:
        wait_until_ready(self.url, self.proc, timeout)

    def wait_exit(self, timeout: float) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return self.proc.returncode, self.proc.stdout.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------- start-up faults


def broken_copy(served_repository: Path, tmp_path: Path, fault: str) -> Path:
    root = tmp_path / "repo"
    folder = root / MODEL
    if fault == "empty repository":
        root.mkdir()
        return root
    shutil.copytree(served_repository / MODEL, folder)
    if fault == "truncated stage":
        data = (folder / "stage_01.onnx").read_bytes()
        (folder / "stage_01.onnx").write_bytes(data[: len(data) // 3])
    elif fault == "missing stage":
        (folder / "stage_02.onnx").unlink()
    elif fault == "unreadable manifest":
        (folder / "manifest.json").write_text('{"name": ')
    elif fault == "calibration for another export":
        raw = json.loads((folder / "calibration.json").read_text())
        raw["curve"][3]["thresholds"].pop()
        (folder / "calibration.json").write_text(json.dumps(raw))
    return root


@pytest.mark.parametrize("fault, names", [
    ("empty repository", "holds no model folder"),
    ("truncated stage", "stage_01.onnx: not a loadable ONNX stage"),
    ("missing stage", "stage file stage_02.onnx is missing"),
    ("unreadable manifest", "manifest.json: unreadable JSON"),
    ("calibration for another export", "calibration.json"),
])
def test_a_repository_that_cannot_be_served_stops_the_start(served_repository: Path, tmp_path: Path, fault: str,
                                                            names: str) -> None:
    server = ServerProcess(broken_copy(served_repository, tmp_path, fault))
    started = time.monotonic()
    code, output = server.wait_exit(timeout=90)
    assert code != 0, output
    assert names in output
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------------------- timeouts and shutdown


@pytest.fixture
def process(served_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(served_repository, header_timeout_s=1, body_timeout_s=2, drain_grace_s=1.5,
                           shutdown_timeout_s=3)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_slow_headers_and_slow_bodies_are_cut_off(process: ServerProcess) -> None:
    partial = b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-"
    got, after, closed = raw_request(process.port, partial, wait_s=6)
    assert closed and 0.8 < after < 4 and got.startswith(b"HTTP/1.1 408") and b"header_timeout" in got
    silent, after, closed = raw_request(process.port, b"", wait_s=6)  # connects, says nothing
    assert closed and after < 4
    got, after, closed = raw_request(process.port, post_head("/classify", 50_000), b"\x89PNG" * 10, wait_s=8)
    assert closed and 1.5 < after < 6 and got.startswith(b"HTTP/1.1 408") and b"body_timeout" in got


def test_sigterm_drains_visibly_then_exits_on_time_despite_a_stalled_upload(process: ServerProcess) -> None:
    blob = encode(fashion_images(1)[0][0])
    stalled = socket.create_connection(("127.0.0.1", process.port))
    stalled.sendall(post_head("/classify", 100_000) + blob[:100])  # and never the rest
    keep_alive = httpx.Client(base_url=process.url)
    assert keep_alive.post("/classify", content=blob, headers={"content-type": "image/png"}).status_code == 200
    sent = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"{process.url}/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    answered = keep_alive.post("/classify", content=blob, headers={"content-type": "image/png"})
    assert answered.status_code == 200  # still served during the grace period ...
    assert answered.headers["connection"] == "close"  # ... and told to go elsewhere next time
    code, _ = process.wait_exit(timeout=30)
    took = time.monotonic() - sent
    stalled.close()
    keep_alive.close()
    assert took < 1.5 + 3 + 4, f"{took:.1f} s to exit"  # grace + shutdown timeout + start-up slack
    assert code in (0, -signal.SIGTERM)


# ---------------------------------------------------------------------------- live server in-process


@pytest.fixture(scope="module")
def served(served_repository: Path) -> Iterator[tuple[str, object]]:
    apps: list = []
    settings = Settings(model_repository=served_repository, online_budget=False, max_large_decodes=2,
                        max_body_bytes=8_000_000)
    with live_server(settings, apps=apps) as url:
        yield url, apps[0]


def test_a_client_that_vanishes_mid_upload_is_a_499_not_a_500(served, caplog: pytest.LogCaptureFixture) -> None:
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    before = httpx.get(f"{url}/metrics").text
    with caplog.at_level("INFO"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(post_head("/classify", 200_000) + b"\x89PNG" * 250)
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = httpx.get(f"{url}/metrics").text
            if metric(after, "exitserve_requests_total", route="/classify", status="499") > \
                    metric(before, "exitserve_requests_total", route="/classify", status="499"):
                break
            time.sleep(0.1)
    assert metric(after, "exitserve_requests_total", route="/classify", status="499") == \
        metric(before, "exitserve_requests_total", route="/classify", status="499") + 1
    assert metric(after, "exitserve_requests_total", route="/classify", status="500") == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_refusal_comes_before_the_body_is_read(served) -> None:
    url, app = served
    port = int(url.rsplit(":", 1)[1])
    batcher = app.state.service.models[MODEL].batcher
    batcher.waiting_images = batcher.max_queue_images  # the queue is full
    try:
        got, after, closed = raw_request(port, post_head("/classify", 5_000_000), b"\x89PNG" * 1000, wait_s=5)
    finally:
        batcher.waiting_images = 0
    assert got.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in got.lower()
    assert b"connection: close" in got.lower() and closed and after < 2  # 5 MB announced, 4 KB sent


def test_refused_bodies_are_not_drained(served) -> None:
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    for head in (post_head("/classify", 5_000_000, "text/plain"), post_head("/healthz", 5_000_000)):
        got, after, closed = raw_request(port, head, b"x" * 65536, wait_s=5)
        assert got.split(b" ")[1] in (b"415", b"405") and b"connection: close" in got.lower()
        assert closed and after < 2


def test_per_model_pixel_limit_and_bounded_large_decodes(served) -> None:
    url, app = served
    service = app.state.service
    big = np.zeros((2100, 2100, 1), np.uint8)  # 4.41 MP: over a 28x28 model's 4,194,304
    refused = httpx.post(f"{url}/classify", content=encode(big), headers={"content-type": "image/png"})
    assert refused.status_code == 413 and "4194304" in refused.json()["detail"]
    large = encode(np.random.default_rng(0).integers(0, 255, (1200, 1200, 1), dtype=np.uint8))  # 1.44 MP
    service.plane.decoder.large_peak = 0
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: httpx.post(f"{url}/classify", content=large, timeout=60,
                                                   headers={"content-type": "image/png"}).status_code, range(8)))
    assert codes == [200] * 8
    assert 1 <= service.plane.decoder.large_peak <= 2


def test_cut_off_multipart_and_extra_thresholds_are_refused(served) -> None:
    url, _ = served
    blob = encode(fashion_images(1)[0][0])
    boundary = "cut-off-boundary"
    parts = b"".join(f"--{boundary}\r\ncontent-disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\n"
                     f"content-type: image/png\r\n\r\n".encode() + blob + b"\r\n" for i in range(3))
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    whole = httpx.post(f"{url}/classify/batch", content=parts + f"--{boundary}--\r\n".encode(), headers=headers)
    assert whole.status_code == 200 and whole.json()["summary"]["classified"] == 3
    cut = httpx.post(f"{url}/classify/batch", content=parts[:-200], headers=headers)
    assert cut.status_code == 422 and cut.json()["error"] == "invalid_multipart"
    exits = httpx.get(f"{url}/v1/models/{MODEL}").json()["exits"]
    extra = httpx.post(f"{url}/classify", content=blob, headers={"content-type": "image/png"},
                       params={"thresholds": ",".join(["0.5"] * exits)})
    assert extra.status_code == 422 and extra.json()["error"] == "invalid_thresholds"


def test_no_absolute_paths_and_request_ids_everywhere(served, served_repository: Path) -> None:
    url, _ = served
    detail = httpx.get(f"{url}/v1/models/{MODEL}")
    assert str(served_repository) not in detail.text and "/tmp/" not in detail.text and "/work/" not in detail.text
    mine = httpx.get(f"{url}/v1/models/nope", headers={"X-Request-ID": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42" and mine.json()["request_id"] == "trace-42"
    theirs = httpx.post(f"{url}/classify", content=b"not an image", headers={"content-type": "image/png"})
    assert len(theirs.headers["x-request-id"]) == 32 and theirs.json()["request_id"] == theirs.headers["x-request-id"]


def test_api_keys_and_cors_are_opt_in(served_repository: Path) -> None:
    blob = encode(fashion_images(1)[0][0])
    png = {"content-type": "image/png"}
    settings = Settings(model_repository=served_repository, api_keys=["s3cret"], protect_metrics=True,
                        cors_origins=["https://app.example"])
    with live_server(settings) as url:
        assert httpx.post(f"{url}/classify", content=blob, headers=png).status_code == 401
        assert httpx.post(f"{url}/classify", content=blob, headers={**png, "X-API-Key": "s3cret"}).status_code == 200
        bearer = {**png, "Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/classify", content=blob, headers=bearer).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401
        preflight = httpx.options(f"{url}/classify", headers={"Origin": "https://app.example",
                                                              "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    with live_server(Settings(model_repository=served_repository)) as url:
        assert httpx.post(f"{url}/classify", content=blob, headers=png).status_code == 200
        plain = httpx.get(f"{url}/healthz", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in plain.headers


def test_openapi_documents_bounds_statuses_and_metrics_type(served) -> None:
    url, _ = served
    schema = httpx.get(f"{url}/openapi.json").json()
    classify = schema["paths"]["/classify"]["post"]
    budget = next(p for p in classify["parameters"] if p["name"] == "budget")["schema"]
    assert budget["exclusiveMinimum"] == 0 and budget["maximum"] == 1
    assert {"404", "413", "415", "422", "503"} <= set(classify["responses"])
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
