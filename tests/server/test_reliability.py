"""Faults, floods, slow and vanishing clients, shutdown: the server fails fast, refuses
cheaply, and never hangs. Traffic goes to 127.0.0.1 only, bounded in count and time."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from exitserve.server import decoder as decoder_module
from exitserve.server.preprocess import LARGE_IMAGE_PIXELS
from exitserve.server.settings import Settings

from tests.support.images import encode, fashion_images
from tests.support.live import live_server
from tests.support.processes import (
    MARGIN_S,
    ServerProcess,
    eventually,
    readiness,
    running,
)
from tests.support.raw_http import metric, post_head, raw_request

MODEL = "msdnet_fmnist"


# ---------------------------------------------------------------------------- start-up faults


def broken_copy(served_repository: Path, tmp_path: Path, fault: str) -> Path:
    root = tmp_path / "repo"
    folder = root / MODEL
    if fault == "missing repository":
        return tmp_path / "nowhere"
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
    elif fault == "manifest with a bad field":
        raw = json.loads((folder / "manifest.json").read_text())
        raw["input"]["channels"] = "grey"
        (folder / "manifest.json").write_text(json.dumps(raw))
    elif fault == "calibration for another export":
        raw = json.loads((folder / "calibration.json").read_text())
        raw["cost_fractions"][0] += 0.01
        (folder / "calibration.json").write_text(json.dumps(raw))
    elif fault == "calibration with a point short of a threshold":
        raw = json.loads((folder / "calibration.json").read_text())
        raw["curve"][3]["thresholds"].pop()
        (folder / "calibration.json").write_text(json.dumps(raw))
    elif fault == "misspelt serving.json":
        (folder / "serving.json").write_text(json.dumps({"max_batch": 4}))
    return root


@pytest.mark.parametrize("fault, names", [
    ("missing repository", "nowhere does not exist"),
    ("empty repository", "holds no model folder"),
    ("truncated stage", "msdnet_fmnist/stage_01.onnx: not a loadable ONNX stage"),
    ("missing stage", "msdnet_fmnist: stage file stage_02.onnx is missing"),
    ("unreadable manifest", "msdnet_fmnist/manifest.json: unreadable JSON"),
    ("manifest with a bad field", "msdnet_fmnist/manifest.json: 1 validation error for Manifest: input.channels: "),
    ("calibration for another export", "msdnet_fmnist/calibration.json: exit 0 costs"),
    ("calibration with a point short of a threshold", "msdnet_fmnist/calibration.json: 1 validation error for "
                                                      "Calibration: the point at budget"),
    ("misspelt serving.json", "msdnet_fmnist/serving.json: 1 validation error for ServingConfig: max_batch: Extra"),
    ("unknown default model", "default model 'nope' is not in the repository"),
])
def test_a_repository_that_cannot_be_served_stops_the_start_in_one_line(served_repository: Path, tmp_path: Path,
                                                                        fault: str, names: str) -> None:
    """An operator's mistake: exit status 3 and one line that names the file and the
    problem; no traceback, no link to pydantic's site."""
    env = {"default_model": "nope"} if fault == "unknown default model" else {}
    server = ServerProcess(broken_copy(served_repository, tmp_path, fault), **env)
    try:
        code, output = server.wait_exit(timeout=90)
    finally:
        server.stop()
    assert code == 3, output
    assert len([line for line in output.splitlines() if names in line]) == 1, output
    assert "Traceback" not in output and "https://errors.pydantic.dev" not in output, output
    if fault == "calibration for another export":
        assert "calibrate this export again" in output, output


# ---------------------------------------------------------------------------- timeouts and shutdown


@pytest.fixture
def process(served_repository: Path) -> Iterator[ServerProcess]:
    with running(served_repository, header_timeout_s=1, body_timeout_s=2) as server:
        yield server


def test_slow_headers_and_slow_bodies_are_cut_off(process: ServerProcess) -> None:
    partial = b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-"
    got, after, closed = raw_request(process.port, partial, wait_s=6)
    assert closed and 0.8 < after < 4 and got.startswith(b"HTTP/1.1 408") and b"header_timeout" in got
    silent, after, closed = raw_request(process.port, b"", wait_s=6)  # connects, says nothing
    assert closed and after < 4
    got, after, closed = raw_request(process.port, post_head("/classify", 50_000), b"\x89PNG" * 10, wait_s=8)
    assert closed and 1.5 < after < 6 and got.startswith(b"HTTP/1.1 408") and b"body_timeout" in got


GRACE_S = 4.0
SHUTDOWN_S = 3.0


def test_sigterm_drains_visibly_then_exits_despite_a_stalled_upload(served_repository: Path) -> None:
    with running(served_repository, body_timeout_s=2, drain_grace_s=GRACE_S, shutdown_timeout_s=SHUTDOWN_S) as server:
        blob = encode(fashion_images(1)[0][0])
        with socket.create_connection(("127.0.0.1", server.port)) as stalled, \
                httpx.Client(base_url=server.url) as keep_alive:
            stalled.sendall(post_head("/classify", 100_000) + blob[:100])  # and never the rest
            assert keep_alive.post("/classify", content=blob, headers={"content-type": "image/png"}).status_code == 200
            server.proc.send_signal(signal.SIGTERM)
            eventually(lambda: readiness(server.url) == "draining", GRACE_S, "/readyz says draining")
            answered = keep_alive.post("/classify", content=blob, headers={"content-type": "image/png"})
            assert answered.status_code == 200  # still served during the grace period ...
            assert answered.headers["connection"] == "close"  # ... and told to go elsewhere next time
            code, output = server.wait_exit(timeout=GRACE_S + SHUTDOWN_S + MARGIN_S)
    assert code in (0, -signal.SIGTERM), output


def test_a_request_stuck_past_the_grace_period_is_cut_at_the_shutdown_timeout(served_repository: Path) -> None:
    """A whole request that cannot finish (its image waits ten minutes for a batch to fill)
    must not hold the process: it exits once the grace period and the shutdown timeout are
    over, not when the request would be done."""
    env = dict(max_queue_delay_ms=600_000, watchdog_s=0.5, drain_grace_s=1, shutdown_timeout_s=2)
    with running(served_repository, **env) as server:
        blob = encode(fashion_images(1)[0][0])
        with socket.create_connection(("127.0.0.1", server.port)) as stuck:
            stuck.sendall(post_head("/classify", len(blob)) + blob)
            # the watchdog sees an image waiting and no batch finishing: it is inside, stuck
            eventually(lambda: readiness(server.url) == "stalled", 60, "the request waits in the batcher")
            server.proc.send_signal(signal.SIGTERM)
            code, output = server.wait_exit(timeout=1 + 2 + MARGIN_S)  # vs 600 s without the timeout
            stuck.settimeout(5)
            try:
                answer = stuck.recv(65536)  # a 500, or the connection closed with the process
            except ConnectionResetError:
                answer = b""
    assert code in (0, -signal.SIGTERM), output
    assert not answer.startswith(b"HTTP/1.1 200"), answer


def test_a_second_signal_skips_the_grace_period(served_repository: Path) -> None:
    with running(served_repository, drain_grace_s=600, shutdown_timeout_s=2) as server:
        server.proc.send_signal(signal.SIGTERM)
        eventually(lambda: readiness(server.url) == "draining", 60, "/readyz says draining")
        server.proc.send_signal(signal.SIGTERM)
        code, output = server.wait_exit(timeout=2 + MARGIN_S)  # vs 600 s of grace
    assert code in (0, -signal.SIGTERM), output


# ---------------------------------------------------------------------------- live server in-process


@pytest.fixture(scope="module")
def served(served_repository: Path) -> Iterator[tuple[str, object]]:
    apps: list = []
    settings = Settings(model_repository=served_repository, online_budget=False, max_large_decodes=2,
                        max_body_bytes=8_000_000)
    with live_server(settings, apps=apps) as url:
        yield url, apps[0]


def test_a_client_that_vanishes_mid_upload_is_a_499_not_a_500(served, caplog: pytest.LogCaptureFixture) -> None:
    url, app = served
    port = int(url.rsplit(":", 1)[1])
    before = httpx.get(f"{url}/metrics").text
    state = app.state.service.state
    with caplog.at_level("INFO"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(post_head("/classify", 200_000) + b"\x89PNG" * 250)
            eventually(lambda: state.in_flight == 1, 10, "the upload is inside the app")  # then it vanishes
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


def test_a_refused_small_body_keeps_its_connection(served) -> None:
    """A retrying client must not pay a reconnect per refusal (nor the server an accept):
    a small body is read with the refusal, and the next request rides the same connection."""
    url, app = served
    port = int(url.rsplit(":", 1)[1])
    batcher = app.state.service.models[MODEL].batcher
    batcher.waiting_images = batcher.max_queue_images  # the queue is full
    body = b"\x89PNG" * 1000
    try:
        got, _, closed = raw_request(port, (post_head("/classify", len(body)) + body) * 2, wait_s=1.5)
    finally:
        batcher.waiting_images = 0
    assert got.count(b"HTTP/1.1 503") == 2 and b"connection: close" not in got.lower()
    assert not closed


def test_refused_bodies_are_not_drained(served) -> None:
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    for head in (post_head("/classify", 5_000_000, "text/plain"), post_head("/healthz", 5_000_000)):
        got, after, closed = raw_request(port, head, b"x" * 65536, wait_s=5)
        assert got.split(b" ")[1] in (b"415", b"405") and b"connection: close" in got.lower()
        assert closed and after < 2


class HeldConversions:
    """Stands in for the decoder's ``to_pixels``: holds every large conversion until
    released, counting how many are inside at once."""

    def __init__(self, convert: Callable) -> None:
        self.convert = convert
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.peak = 0

    def __call__(self, img, spec):
        if img.width * img.height <= LARGE_IMAGE_PIXELS:
            return self.convert(img, spec)
        with self.lock:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
        try:
            self.release.wait(60)
            return self.convert(img, spec)
        finally:
            with self.lock:
                self.inside -= 1


def test_per_model_pixel_limit_and_bounded_large_decodes(served, monkeypatch: pytest.MonkeyPatch) -> None:
    url, app = served
    decoder = app.state.service.plane.decoder
    big = np.zeros((2100, 2100, 1), np.uint8)  # 4.41 MP: over a 28x28 model's 4,194,304
    refused = httpx.post(f"{url}/classify", content=encode(big), headers={"content-type": "image/png"})
    assert refused.status_code == 413 and "4194304" in refused.json()["detail"]

    # eight 1.44 MP uploads at once, each conversion held until all eight have been opened:
    # exactly max_large_decodes (2) may be converting, the other six must wait their turn
    held = HeldConversions(decoder_module.to_pixels)
    opened = []
    open_image = decoder_module.open_image
    monkeypatch.setattr(decoder_module, "to_pixels", held)
    monkeypatch.setattr(decoder_module, "open_image", lambda *a: opened.append(1) or open_image(*a))
    large = encode(np.random.default_rng(0).integers(0, 255, (1200, 1200, 1), dtype=np.uint8))
    decoder.large_peak = 0
    with ThreadPoolExecutor(8) as pool:
        try:
            answers = [pool.submit(httpx.post, f"{url}/classify", content=large, timeout=120,
                                   headers={"content-type": "image/png"}) for _ in range(8)]
            eventually(lambda: len(opened) == 8 and held.inside == 2, 60, "8 uploads opened, 2 converting")
            assert decoder.large_running == 2  # the six others wait at the bound, none converts beside
        finally:
            held.release.set()
        codes = [answer.result().status_code for answer in answers]
    assert codes == [200] * 8
    assert held.peak == decoder.large_peak == 2  # the bound was reached and never passed


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
