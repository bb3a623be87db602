"""HTTP API against a real uvicorn on a loopback port."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exitserve.models.data import load_splits
from exitserve.server.engine import ModelEngine
from exitserve.server.http.schemas import ClassifyResponse, ExitInfo, Timings, TopK
from exitserve.server.preprocess import decode_image
from exitserve.server.settings import Settings
from tests.support.images import bomb_png, encode, fashion_images
from tests.support.live import live_server

COUNT = 60
BATCH_BUDGET = 0.25  # the first exit costs about 0.11 and alone scores over a point less


@pytest.fixture(scope="module")
def url(served_repository: Path) -> Iterator[str]:
    settings = Settings(model_repository=served_repository, max_body_bytes=2_000_000, max_files=16,
                        max_pixels=4_000_000, online_budget=False)
    with live_server(settings) as base:
        yield base


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return fashion_images(COUNT)


def classify(url: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"file": ("x.png", data, "image/png")}, params=params, timeout=30)


def test_classify_png_and_jpeg_match_the_engine(url: str, served_repository: Path, images) -> None:
    pixels, labels = images
    engine = ModelEngine.load(served_repository / "msdnet_fmnist", default_budget=0.25, provider="cpu",
                              online_budget=False)
    thresholds = engine.policy.thresholds_for(0.5)
    for fmt in ("PNG", "JPEG"):
        blobs = [encode(p, fmt) for p in pixels[:20]]
        decoded = np.stack([decode_image(b, engine.manifest.input, 10**6) for b in blobs])
        offline = engine.run_thresholds(engine.manifest.input.normalize(decoded), np.tile(thresholds, (20, 1))).results
        for blob, expected in zip(blobs, offline):
            body = classify(url, blob, budget=0.5).json()
            assert body["class_index"] == int(np.argmax(expected.probs))
            assert body["exit"]["index"] == expected.exit_index
            assert body["label"] == engine.manifest.labels[body["class_index"]]
            assert set(body["timings_ms"]) == {"queue", "decode", "inference", "total"}
    correct = [classify(url, encode(p)).json()["class_index"] == y for p, y in zip(pixels, labels)]
    assert np.mean(correct) >= 0.9  # 57 of these 60 are right; a random or constant answer gets under 20


def test_raw_body_fast_path_and_top_k(url: str, images) -> None:
    blob = encode(images[0][0])
    raw = httpx.post(f"{url}/classify", content=blob, headers={"content-type": "image/png"},
                     params={"top_k": 3, "budget": 1.0}).json()
    multipart = classify(url, blob, top_k=3, budget=1.0).json()
    assert raw["class_index"] == multipart["class_index"] and len(raw["top_k"]) == 3
    probs = [t["probability"] for t in raw["top_k"]]
    assert probs == sorted(probs, reverse=True) and raw["top_k"][0]["class_index"] == raw["class_index"]
    assert raw["exit"]["stages_run"] == raw["exit"]["index"] + 1


def test_answers_have_exactly_the_documented_shape(url: str, images) -> None:
    """/classify builds its answer as plain data on the hot path: it must still be exactly
    ClassifyResponse, the schema /docs shows, with nothing missing or extra."""
    blob = encode(images[0][0])
    for params in ({"top_k": 2}, {"budget": 0.01}, {"thresholds": "0.5,0.5,0.5,0.5"}):
        body = httpx.post(f"{url}/classify", content=blob, headers={"content-type": "image/png"},
                          params=params).json()
        parsed = ClassifyResponse.model_validate(body)
        assert parsed.model_dump(mode="json") == body  # no field outside the schema, none missing
        assert set(body["exit"]) == set(ExitInfo.model_fields) and set(body["timings_ms"]) == set(Timings.model_fields)
        for item in body["top_k"]:
            assert set(item) == set(TopK.model_fields)


def test_budgets_move_mean_exit_depth_monotonically(url: str, images) -> None:
    blobs = [encode(p) for p in images[0]]
    depths = []
    for budget in (0.01, 0.3, 0.6, 1.0):
        depths.append(np.mean([classify(url, b, budget=budget).json()["exit"]["index"] for b in blobs]))
    assert depths == sorted(depths) and depths[0] == 0 and depths[-1] > depths[0]
    full = classify(url, blobs[0], budget=1.0).json()
    assert full["exit"]["cost_fraction"] == 1.0  # budget 1.0 is the full network


def test_explicit_thresholds(url: str, images) -> None:
    blob = encode(images[0][0])
    models = httpx.get(f"{url}/v1/models").json()["models"]
    exits = models[0]["exits"]
    early = classify(url, blob, thresholds=",".join(["0"] * (exits - 1))).json()
    assert early["exit"]["index"] == 0 and early["policy"] == "thresholds"
    late = classify(url, blob, thresholds=",".join(["2"] * (exits - 1))).json()
    assert late["exit"]["index"] == exits - 1
    assert classify(url, blob, thresholds="0.5").status_code == 422
    assert classify(url, blob, thresholds="0.5,0.5,0.5,0.5", budget=0.5).json()["error"] == "conflicting_options"


def test_deadline_answers_with_the_best_exit_so_far(url: str, images) -> None:
    blob = encode(images[0][0])
    body = classify(url, blob, budget=1.0, deadline_ms=0.001).json()
    assert body["exit"]["deadline_hit"] is True and body["exit"]["stages_run"] == 1
    relaxed = classify(url, blob, budget=1.0, deadline_ms=60_000).json()
    assert relaxed["exit"]["deadline_hit"] is False and relaxed["exit"]["cost_fraction"] == 1.0


# ---------------------------------------------------------------------------- deadlines between stages

DEADLINE_BATCH = 64  # images per request: then each stage takes ~10 ms, far above an HTTP request's jitter here
V2_LATENCY = "exitserve_request_latency_seconds"  # labelled by route: only the v2 route is used here
STAGE_LATENCY = "exitserve_stage_latency_seconds"


def v2_pixels(client: httpx.Client, pixels: np.ndarray, **parameters: float) -> list[float]:
    """One Open Inference Protocol request, the images as raw binary pixels (nothing to
    decode or parse: the time goes to the stages); each image's cost fraction."""
    header = json.dumps({
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes}}],
        "outputs": [{"name": "cost_fraction", "parameters": {"binary_data": False}}],
        "parameters": parameters}).encode()
    response = client.post("/v2/models/msdnet_fmnist/infer", content=header + pixels.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header)),
                                    "content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return output["data"]


def server_metrics(client: httpx.Client) -> dict[tuple[str, str], float]:
    """(sample name, its route or stage label) -> value, for the v2 route's request latency
    and the model's stage latencies: the server's own clock."""
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name in (V2_LATENCY, STAGE_LATENCY):
            for sample in family.samples:
                if sample.labels.get("model") == "msdnet_fmnist" and not sample.name.endswith("_bucket"):
                    found[(sample.name, sample.labels.get("stage", ""))] = sample.value
    return found


def timed_by_the_server(client: httpx.Client,
                        request: Callable[[], list[float]]) -> tuple[list[float], float, list[float]]:
    """Make one v2 ``request`` (the only one in flight) and read the server's own times for
    it: (its answer, its time from arrival to answer in ms, each stage's time in ms; 0 for
    a stage it did not run). The metrics are written as the answer leaves: poll for them."""
    before = server_metrics(client)
    answer = request()
    count = before.get((f"{V2_LATENCY}_count", ""), 0.0)
    deadline = time.monotonic() + 10
    while (after := server_metrics(client)).get((f"{V2_LATENCY}_count", ""), 0.0) < count + 1:
        assert time.monotonic() < deadline, "the request never reached the latency metric"
    assert after[(f"{V2_LATENCY}_count", "")] == count + 1

    def spent(name: str, label: str = "") -> float:
        return 1000 * (after.get((name, label), 0.0) - before.get((name, label), 0.0))

    stages = [spent(f"{STAGE_LATENCY}_sum", str(k)) for k in range(5)]
    return answer, spent(f"{V2_LATENCY}_sum"), stages


def test_a_deadline_between_stage_boundaries_stops_at_the_last_stage_that_fits(served_repository: Path) -> None:
    """Before each stage the server asks its per-stage latency predictor whether the stage
    would end past the request's deadline; if so the images are answered from what already
    ran. For deadlines in the middle of the gaps between the predicted cumulative stage
    times, checked against the server's own clock (its metrics) for each request:

    * no stage ran that the predictor said would end past the deadline (time from arrival
      to the stage's start, at least the stages before it, plus its prediction);
    * the next stage was skipped only because it would have (the request's whole time so
      far plus that stage's prediction is past the deadline): the last stage that fits;
    * the request took at most the deadline plus one stage (two tries in three: a stall
      on a busy machine may break one);
    * it stopped within one stage of the gap the deadline was put in, unless a stage it ran
      stalled (over twice its prediction), which rightly stops it earlier.

    The predictor learns from noise (a stalled run makes the next predictions longer), so
    the stage a request stops at is checked against the times it really had, not against
    the predictions alone. Ignoring deadlines runs every stage: the first check fails."""
    settings = Settings(model_repository=served_repository, online_budget=False, max_batch_size=DEADLINE_BATCH,
                        provider="cpu")
    pixels = fashion_images(DEADLINE_BATCH)[0][..., 0]  # N x 28 x 28
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        stages = client.get("/v1/models/msdnet_fmnist").json()["manifest"]["stages"]
        costs = [round(s["cost_fraction"], 6) for s in stages]
        batch_1, batch_64 = (np.array([s["latency"][key] for s in stages]) for key in ("batch_1_ms", "batch_64_ms"))
        for _ in range(10):  # the predictor learns what a batch of 64 costs on this machine now
            assert v2_pixels(client, pixels, budget=1.0) == [1.0] * DEADLINE_BATCH

        def predicted_ms() -> np.ndarray:
            """Each stage's predicted time for this batch, as the server predicts it now:
            its batch-64 measurement scaled by the running ratio of measured to predicted
            (which GET /v1/models shows on the batch-1 prediction)."""
            at_batch_1 = np.array(client.get("/v1/models/msdnet_fmnist").json()["stage_latency_ms"])
            return batch_64 * at_batch_1 / batch_1

        for gap in range(len(stages) - 1):  # between the end of stage `gap` and the end of the next
            within_time = 0
            for _ in range(3):
                predicted = predicted_ms()
                deadline = float(np.cumsum(predicted)[gap] + predicted[gap + 1] / 2)
                answer, took_ms, stage_ms = timed_by_the_server(
                    client, partial(v2_pixels, client, pixels, budget=1.0, deadline_ms=deadline))
                ran = {costs.index(round(cost, 6)) for cost in answer}
                assert len(ran) == 1, ran  # one batch, one deadline: all stop together
                last = ran.pop()
                assert all(ms > 0 for ms in stage_ms[:last + 1]) and not any(stage_ms[last + 1:]), stage_ms
                slack = 0.05  # ms: the predictions are read back rounded
                if last > 0:  # it started stage `last` only if that was predicted to end in time
                    assert sum(stage_ms[:last]) + predicted[last] <= deadline + slack, (gap, last, stage_ms, predicted)
                if last < len(stages) - 1:  # and skipped the next only if that would not have
                    assert took_ms + predicted[last + 1] > deadline - slack, (gap, last, took_ms, predicted)
                # where it stopped follows from the times it really had: a stage that stalled (more
                # than twice its prediction) rightly moves the stop earlier, so the gap is checked
                # only when none did (the two checks above hold either way)
                stalled = any(ms > 2 * p for ms, p in zip(stage_ms[:last + 1], predicted[:last + 1]))
                assert stalled or gap - 1 <= last <= gap + 1, (gap, last, deadline, stage_ms, predicted)
                within_time += took_ms <= deadline + predicted.max()
            assert within_time >= 2, f"over the deadline plus one stage in {3 - within_time} tries of 3"
        # past the last stage's predicted end: nothing is cut
        assert v2_pixels(client, pixels, budget=1.0, deadline_ms=float(3 * predicted_ms().sum())) == \
            [1.0] * DEADLINE_BATCH


def test_batch_respects_its_budget_and_upload_order(url: str, images) -> None:
    pixels, labels = images
    files = [("files", (f"{i}.png", encode(p), "image/png")) for i, p in enumerate(pixels[:16])]
    for budget in (0.2, 0.4, 1.0):
        body = httpx.post(f"{url}/classify/batch", files=files, data={"budget": str(budget)}, timeout=60).json()
        summary = body["summary"]
        assert summary["count"] == summary["classified"] == 16 and summary["failed"] == 0
        assert summary["mean_cost_fraction"] <= budget + 1e-9
        assert sum(summary["exit_histogram"]) == 16
        assert [item["index"] for item in body["results"]] == list(range(16))
        assert [item["filename"] for item in body["results"]] == [f"{i}.png" for i in range(16)]
        assert 0 < summary["expected_accuracy"] <= 1


def test_the_budgeted_batch_buys_the_calibrated_accuracy_with_its_budget(served_repository: Path) -> None:
    """The whole Fashion-MNIST test set (10,000 images) through POST /classify/batch at a
    budget the first exit alone cannot reach: the accuracy the calibration promises for that
    budget (within half a point), for at least 90% of the budget spent, and never more than
    the budget in any request. Sending every image out at the first exit would score the
    first exit's accuracy, over half a point lower (checked first), and spend under half.
    (One request of 256 easy images may spend under 90%: its thresholds let them go; the
    set as a whole must not.)"""
    test = load_splits("fashion-mnist").test
    settings = Settings(model_repository=served_repository, online_budget=False)
    per_request = settings.max_files
    correct, spent, promised = 0, 0.0, set()
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        stages = client.get("/v1/models/msdnet_fmnist").json()["manifest"]["stages"]
        assert stages[0]["cost_fraction"] < BATCH_BUDGET / 2
        for start in range(0, len(test.labels), per_request):
            pixels, labels = test.images[start:start + per_request], test.labels[start:start + per_request]
            files = [("files", (f"{start + i}.png", encode(p), "image/png")) for i, p in enumerate(pixels)]
            response = client.post("/classify/batch", params={"budget": BATCH_BUDGET}, files=files)
            assert response.status_code == 200, response.text
            summary = response.json()["summary"]
            assert summary["classified"] == len(labels) and summary["budget"] == BATCH_BUDGET
            assert summary["mean_cost_fraction"] <= BATCH_BUDGET + 1e-9  # never over, in any request
            spent += summary["mean_cost_fraction"] * len(labels)
            promised.add(summary["expected_accuracy"])
            answers = [item["result"]["class_index"] for item in response.json()["results"]]
            correct += int(np.sum(np.asarray(answers) == labels))
    (expected,) = promised
    first_exit_alone = stages[0]["test_accuracy"]  # measured on this same test set
    assert first_exit_alone < expected - 0.005, "the first exit alone would pass: pick another budget"
    assert spent / (BATCH_BUDGET * len(test.labels)) >= 0.9, "the budget was not spent"
    accuracy = correct / len(test.labels)
    assert accuracy >= expected - 0.005, f"{accuracy:.4f} on {len(test.labels)} test images, promised {expected:.4f}"


def test_one_bad_file_fails_only_itself(url: str, images) -> None:
    good = encode(images[0][0])
    files = [("files", ("a.png", good, "image/png")), ("files", ("bad.txt", b"hello", "text/plain")),
             ("files", ("c.png", good[: len(good) // 2], "image/png")), ("files", ("d.png", good, "image/png"))]
    body = httpx.post(f"{url}/classify/batch", files=files, data={"budget": "0.5"}).json()
    items = body["results"]
    assert [i["error"] for i in items] == [None, "not_an_image", "corrupt_image", None]
    assert items[0]["result"]["class_index"] == items[3]["result"]["class_index"]
    assert body["summary"]["failed"] == 2


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"", 422, "empty_file"),
        (b"definitely not an image", 415, "not_an_image"),
        (bomb_png(), 413, "image_too_large"),
    ],
)
def test_bad_uploads_are_clear_4xx(url: str, data: bytes, status: int, code: str) -> None:
    response = classify(url, data)
    assert response.status_code == status
    assert response.json()["error"] == code and response.json()["detail"]


def test_truncated_png_and_jpeg(url: str, images) -> None:
    for fmt in ("PNG", "JPEG"):
        blob = encode(images[0][0], fmt)
        response = classify(url, blob[: len(blob) // 2])
        assert response.status_code in (415, 422) and response.json()["error"] in ("corrupt_image", "not_an_image")


def test_oversized_body_is_413(url: str) -> None:
    big = b"\x00" * 2_500_000
    response = httpx.post(f"{url}/classify", content=big, headers={"content-type": "image/png"})
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(30):
            yield b"\x00" * 100_000

    streamed = httpx.post(f"{url}/classify", content=chunks(), headers={"content-type": "image/png"})
    assert streamed.status_code == 413


@pytest.mark.parametrize("params, code", [
    ({"budget": "0"}, "invalid_budget"), ({"budget": "1.5"}, "invalid_budget"), ({"budget": "abc"}, "invalid_budget"),
    ({"budget": "nan"}, "invalid_budget"), ({"deadline_ms": "-1"}, "invalid_deadline_ms"),
    ({"top_k": "0"}, "invalid_top_k"), ({"top_k": "99"}, "invalid_top_k"),
])
def test_bad_options_are_422(url: str, images, params: dict, code: str) -> None:
    response = classify(url, encode(images[0][0]), **params)
    assert response.status_code == 422 and response.json()["error"] == code


def test_request_shape_errors(url: str, images) -> None:
    blob = encode(images[0][0])
    assert httpx.post(f"{url}/classify", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
    missing = httpx.post(f"{url}/classify", files={"other": ("x.png", blob, "image/png")})
    assert missing.status_code == 422 and missing.json()["error"] == "missing_file"
    unknown = classify(url, blob, model="nope")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_model"
    many = [("files", (f"{i}.png", blob, "image/png")) for i in range(17)]
    too_many = httpx.post(f"{url}/classify/batch", files=many)
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_files"
    low = httpx.post(f"{url}/classify/batch", files=many[:2], data={"budget": "0.001"})
    assert low.status_code == 422 and low.json()["error"] == "invalid_budget"
    assert httpx.get(f"{url}/nowhere").json()["error"] == "not_found"


def test_models_health_docs_and_metrics(url: str, images) -> None:
    classify(url, encode(images[0][0]))
    models = httpx.get(f"{url}/v1/models").json()["models"]
    assert models[0]["name"] == "msdnet_fmnist" and models[0]["default"] is True
    assert models[0]["provider"] == "CPUExecutionProvider"
    detail = httpx.get(f"{url}/v1/models/msdnet_fmnist").json()
    assert detail["manifest"]["input"]["size"] == 28 and detail["calibration"]["rule"] == "max_softmax"
    assert detail["budget"] == 0.25
    assert httpx.get(f"{url}/v1/models/zzz").status_code == 404
    assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert "/classify/batch" in paths and "post" in paths["/classify"]  # documented, though answered directly
    assert httpx.get(f"{url}/classify").status_code == 405  # the router still answers what is not POST
    assert httpx.get(f"{url}/docs").status_code == 200
    text = httpx.get(f"{url}/metrics").text
    for name in ("exitserve_request_latency_seconds_bucket", "exitserve_images_total", "exitserve_exits_total",
                 "exitserve_stage_latency_seconds_bucket", "exitserve_batch_size_bucket", "exitserve_budget"):
        assert name in text
