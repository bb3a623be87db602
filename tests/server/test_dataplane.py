"""One data plane under every protocol: options parsed once and strictly, the same numbers
from /classify, /classify/batch and the Open Inference Protocol for the same request, and
requests the HTTP parser refuses answered in the server's own error format."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exitserve.server.errors import InvalidOptions
from exitserve.server.options import InferenceOptions, parse_model, parse_options
from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server
from tests.support.raw_http import raw_request

MODEL = "msdnet_fmnist"


# ---------------------------------------------------------------------------- options, without a server


@pytest.mark.parametrize("name", ["budget", "thresholds", "top_k", "deadline_ms", "batch_budget"])
def test_an_empty_option_is_an_error_not_absent(name: str) -> None:
    with pytest.raises(InvalidOptions, match="empty"):
        parse_options({name: ""})


@pytest.mark.parametrize("raw", [{"budget": "1_0"}, {"budget": " 0.5"}, {"budget": "nan"}, {"budget": "inf"},
                                 {"budget": "0x1"}, {"top_k": "1.0"}, {"top_k": "1_0"},
                                 {"thresholds": "1_0,1,1,1"}, {"thresholds": "0.5,,0.5"},
                                 {"deadline_ms": "infinity"}, {"budget": True}, {"deadline_ms": [5]},
                                 {"top_k": 2.5}])
def test_only_plain_numbers_are_numbers(raw: dict) -> None:
    with pytest.raises(InvalidOptions):
        parse_options(raw)


def test_text_and_json_give_the_same_options() -> None:
    assert parse_options({"budget": "0.25", "deadline_ms": "5e1", "top_k": "3"}) == \
        parse_options({"budget": 0.25, "deadline_ms": 50, "top_k": 3}) == \
        InferenceOptions("budget", 0.25, deadline_ms=50.0, top_k=3)
    assert parse_options({"thresholds": "0.9,.5,1e-1"}).thresholds == (0.9, 0.5, 0.1)


@pytest.mark.parametrize("raw", [{"budget": "0.3", "thresholds": "0.5"}, {"batch_budget": 0.3, "budget": 0.3},
                                 {"batch_budget": 0.3, "deadline_ms": 10}])
def test_conflicting_options(raw: dict) -> None:
    with pytest.raises(InvalidOptions) as refused:
        parse_options(raw)
    assert refused.value.code == "conflicting_options"


def test_the_batch_endpoints_budget_is_the_whole_batchs() -> None:
    assert parse_options({"budget": "0.3"}, whole_batch=True) == InferenceOptions("batch_budget", 0.3)
    assert parse_options({}, whole_batch=True).policy == "batch_budget"
    with pytest.raises(InvalidOptions, match="whole batch"):
        parse_options({"deadline_ms": "5"}, whole_batch=True)


def test_an_empty_model_name_is_an_error() -> None:
    assert parse_model(None) is None and parse_model("m") == "m"
    with pytest.raises(InvalidOptions) as refused:
        parse_model("")
    assert refused.value.code == "invalid_model"


# ---------------------------------------------------------------------------- one live server


@pytest.fixture(scope="module")
def url(served_repository: Path) -> Iterator[str]:
    with live_server(Settings(model_repository=served_repository, online_budget=False)) as base:
        yield base


def classify(url: str, image: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{url}/classify", content=image, params=params, headers={"content-type": "image/png"})


def v2_infer(url: str, images: list[bytes], **parameters: object) -> dict:
    body = {"parameters": parameters, "inputs": [{
        "name": "images", "datatype": "BYTES", "shape": [len(images)],
        "data": [base64.b64encode(i).decode() for i in images]}]}
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("query", ["thresholds=", "budget=", "top_k=", "deadline_ms=", "model=",
                                   "thresholds=1_0,1,1,1", "budget=1_0", "top_k=%201"])
def test_classify_refuses_empty_and_malformed_options(url: str, query: str) -> None:
    image = encode(fashion_images(1)[0][0])
    response = httpx.post(f"{url}/classify?{query}", content=image, headers={"content-type": "image/png"})
    assert response.status_code == 422, (query, response.text)
    assert response.json()["error"].startswith("invalid_") and response.json()["request_id"]


def test_v2_refuses_malformed_parameters(url: str) -> None:
    image = encode(fashion_images(1)[0][0])
    for parameters in ({"budget": ""}, {"budget": "1_0"}, {"deadline_ms": True}):
        body = {"parameters": parameters, "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                      "data": [base64.b64encode(image).decode()]}]}
        response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body)
        assert response.status_code == 400, (parameters, response.text)
        assert next(iter(parameters)) in response.json()["error"]


@pytest.mark.parametrize("budget", [0.15, 0.3, 1.0])
def test_classify_and_v2_report_the_same_fields(url: str, budget: float) -> None:
    pixels, _ = fashion_images(6)
    images = [encode(p) for p in pixels]
    answer = v2_infer(url, images, budget=budget)
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    for i, image in enumerate(images):
        single = classify(url, image, budget=budget).json()
        assert single["class_index"] == outputs["class_index"][i]
        assert single["exit"]["index"] == outputs["exit_index"][i]
        assert single["exit"]["cost_fraction"] == pytest.approx(outputs["cost_fraction"][i], abs=1e-6)
        classes = len(outputs["probabilities"]) // len(images)
        assert single["confidence"] == pytest.approx(max(outputs["probabilities"][i * classes:(i + 1) * classes]),
                                                     abs=2e-6)
        assert (single["budget"], single["budget_applied"], single["policy"]) == \
            (answer["parameters"]["budget"], answer["parameters"]["budget_applied"], answer["parameters"]["policy"])


def test_classify_batch_and_v2_batch_budget_report_the_same_summary(url: str) -> None:
    pixels, _ = fashion_images(16)
    images = [encode(p) for p in pixels]
    batch = httpx.post(f"{url}/classify/batch", params={"budget": 0.2},
                       files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]).json()
    answer = v2_infer(url, images, batch_budget=0.2)
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    summary, parameters = batch["summary"], answer["parameters"]
    assert [r["result"]["exit"]["index"] for r in batch["results"]] == outputs["exit_index"]
    assert [r["result"]["class_index"] for r in batch["results"]] == outputs["class_index"]
    for key in ("budget", "mean_cost_fraction", "spent_fraction", "expected_accuracy"):
        assert summary[key] == parameters[key], key
    assert parameters["policy"] == "batch_budget"


def test_both_protocols_report_the_budget_the_latency_objective_applied(served_repository: Path) -> None:
    """A forced cap: the objective held at its floor (its step pinned there, never calm long
    enough to step up). Before the data plane, v2 reported the budget before the cut."""
    apps: list = []
    settings = Settings(model_repository=served_repository, online_budget=False, latency_slo_ms=60_000)
    with live_server(settings, apps=apps) as base:
        objective = apps[0].state.service.catalog.get(MODEL).engine.policy.objective
        objective.hold = 10**9
        objective.step = len(objective.ladder) - 1
        floor = objective.floor_budget
        image = encode(fashion_images(1)[0][0])
        single = classify(base, image).json()
        answer = v2_infer(base, [image])["parameters"]
        assert objective.budget_cap == floor
    assert single["budget_applied"] == answer["budget_applied"] == floor < single["budget"] == answer["budget"]
    assert single["budget_note"] == answer["budget_note"] and "latency objective" in single["budget_note"]


# ---------------------------------------------------------------------------- what the HTTP parser refuses


@pytest.mark.parametrize("headers", [
    b"Content-Length: 3\r\nContent-Length: 4\r\n",
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    b"Bad Header: x\r\nContent-Length: 3\r\n",
])
def test_requests_the_parser_refuses_get_the_json_error_and_a_request_id(url: str, headers: bytes) -> None:
    port = int(url.rsplit(":", 1)[1])
    got, _, _ = raw_request(port, b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: image/png\r\n"
                                  + headers + b"\r\nabc")
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 400"), got
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert fields["content-type"] == "application/json" and fields["connection"] == "close"
    error = json.loads(body)
    assert error["error"] == "bad_request" and error["request_id"] == fields["x-request-id"]
