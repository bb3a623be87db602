"""The Open Inference Protocol (KServe v2) spoken to Triton's own HTTP client
(``tritonclient``) on a live server; every answer compared with what /classify or
/classify/batch says for the same images."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from exitserve.repository.format import load_manifest
from exitserve.server.http.app import create_app
from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server

MODEL = "msdnet_fmnist"
COUNT = 12
MAX_IMAGES = 16
OUTPUTS = ("probabilities", "class_index", "exit_index", "cost_fraction")
PROBABILITY_TOLERANCE = 2e-6  # /classify rounds to 6 decimals; a batch of 8 may differ from one of 1 in the last bits


@pytest.fixture(scope="module")
def url(served_repository: Path) -> Iterator[str]:
    settings = Settings(model_repository=served_repository, online_budget=False, max_files=MAX_IMAGES,
                        max_body_bytes=2_000_000)
    with live_server(settings) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return fashion_images(COUNT)[0]  # N x 28 x 28 x 1 uint8


# ---------------------------------------------------------------------------- helpers


def bytes_input(blobs: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(blobs)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(blobs, dtype=object))
    else:  # JSON carries encoded images as base64 strings
        tensor.set_data_from_numpy(np.array([base64.b64encode(b) for b in blobs], dtype=object), binary_data=False)
    return tensor


def array_input(name: str, datatype: str, array: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def classify(url: str, blob: bytes, **params) -> dict:
    response = httpx.post(f"{url}/classify", content=blob, headers={"content-type": "image/png"},
                          params={"top_k": 10, **params}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def assert_matches(result: triton.InferResult, expected: list[dict]) -> None:
    """Each image's class, exit, cost and probabilities equal /classify's answer for it."""
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(expected), 10)
    assert result.as_numpy("class_index").dtype == np.int64 and result.as_numpy("exit_index").dtype == np.int32
    for i, answer in enumerate(expected):
        assert result.as_numpy("class_index")[i] == answer["class_index"], i
        assert result.as_numpy("exit_index")[i] == answer["exit"]["index"], i
        assert result.as_numpy("cost_fraction")[i] == pytest.approx(answer["exit"]["cost_fraction"], abs=1e-6)
        for entry in answer["top_k"]:
            assert probs[i, entry["class_index"]] == pytest.approx(entry["probability"], abs=PROBABILITY_TOLERANCE)


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# ---------------------------------------------------------------------------- health and metadata


def test_health_readiness_and_metadata(client: triton.InferenceServerClient, url: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("no_such_model") and not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] == "exitserve" and "binary_tensor_data" in server["extensions"]

    metadata = client.get_model_metadata(MODEL)
    assert metadata == client.get_model_metadata(MODEL, "1")
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert inputs == {"images": ("BYTES", [-1]), "pixels": ("UINT8", [-1, -1, -1, -1]),
                      "normalized": ("FP32", [-1, 1, 28, 28])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, 10]), "class_index": ("INT64", [-1]),
                       "exit_index": ("INT32", [-1]), "cost_fraction": ("FP32", [-1])}
    assert all(t["parameters"]["description"] for t in metadata["inputs"] + metadata["outputs"])
    assert metadata["parameters"]["exits"] == 5 and metadata["parameters"]["max_images"] == MAX_IMAGES

    for call in (lambda: client.get_model_metadata("no_such_model"), lambda: client.get_model_metadata(MODEL, "7")):
        assert error_of(call).status() == "404"
    response = httpx.get(f"{url}/v2/models/no_such_model")
    assert response.status_code == 404 and list(response.json()) == ["error"]


# ---------------------------------------------------------------------------- inference equals /classify


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("count", [1, 8])
def test_bytes_images_match_classify(client, url: str, pixels: np.ndarray, binary: bool, count: int) -> None:
    blobs = [encode(p) for p in pixels[:count]]
    result = client.infer(MODEL, [bytes_input(blobs, binary)], parameters={"budget": 0.5},
                          outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS])
    expected = [classify(url, b, budget=0.5) for b in blobs]
    assert_matches(result, expected)
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1"
    parameters = response["parameters"]
    assert parameters["policy"] == "budget" and parameters["budget"] == 0.5 and parameters["deadline_hits"] == 0
    mean = np.mean([e["exit"]["cost_fraction"] for e in expected])
    assert parameters["mean_cost_fraction"] == pytest.approx(mean, abs=1e-6)
    binary_outputs = [o for o in response["outputs"] if "binary_data_size" in o.get("parameters", {})]
    assert len(binary_outputs) == (4 if binary else 0)


def test_default_budget_and_budgets_that_change_the_exit(client, url: str, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels]
    default = client.infer(MODEL, [bytes_input(blobs, True)])  # no outputs named: all four, binary
    assert default.get_response()["parameters"]["budget"] == 0.25
    assert_matches(default, [classify(url, b) for b in blobs])
    full = client.infer(MODEL, [bytes_input(blobs, True)], parameters={"budget": 1.0})
    assert (full.as_numpy("exit_index") == 4).all() and (full.as_numpy("cost_fraction") == 1.0).all()
    cheap = client.infer(MODEL, [bytes_input(blobs, True)], parameters={"budget": 0.12})
    assert (cheap.as_numpy("exit_index") == 0).all()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_match_classify_of_the_same_pixels(client, url: str, pixels: np.ndarray, binary: bool) -> None:
    expected = [classify(url, encode(p), budget=0.4) for p in pixels[:6]]
    grey = pixels[:6, :, :, 0]  # N x H x W
    for array in (grey, pixels[:6]):  # [N, H, W] and [N, H, W, 1]
        result = client.infer(MODEL, [array_input("pixels", "UINT8", array, binary)], parameters={"budget": 0.4})
        assert_matches(result, expected)
    # other sizes and channels are converted as a decoded image of those pixels would be
    rgb = np.repeat(np.repeat(np.repeat(pixels[:6], 3, axis=-1), 2, axis=1), 2, axis=2)  # N x 56 x 56 x 3
    rgb[:, :4, :4, 0] = 255  # a little colour, so the grey conversion matters
    result = client.infer(MODEL, [array_input("pixels", "UINT8", rgb, binary)], parameters={"budget": 0.4})
    assert_matches(result, [classify(url, encode(p), budget=0.4) for p in rgb])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_normalized_matches_classify(client, url: str, served_repository: Path, pixels: np.ndarray,
                                          binary: bool) -> None:
    normalized = load_manifest(served_repository / MODEL).input.normalize(pixels[:5])  # N x 1 x 28 x 28
    result = client.infer(MODEL, [array_input("normalized", "FP32", normalized, binary)], parameters={"budget": 0.3})
    assert_matches(result, [classify(url, encode(p), budget=0.3) for p in pixels[:5]])


@pytest.fixture(scope="module")
def hard_blobs(url: str) -> list[bytes]:
    """The 12 of 48 test images least confident at the first exit: per-image thresholds
    overspend a small budget on them, so the batch's cap has to bind."""
    blobs = [encode(p) for p in fashion_images(48)[0]]
    first_exit = [classify(url, b, thresholds="0,0,0,0")["confidence"] for b in blobs]
    return [blobs[i] for i in np.argsort(first_exit, kind="stable")[:12]]


@pytest.mark.parametrize("budget", [0.2, 0.3])
def test_batch_budget_matches_classify_batch(client, url: str, hard_blobs: list[bytes], budget: float) -> None:
    result = client.infer(MODEL, [bytes_input(hard_blobs, True)], parameters={"batch_budget": budget})
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(hard_blobs)]
    batch = httpx.post(f"{url}/classify/batch", files=files, data={"budget": str(budget), "top_k": "10"},
                       timeout=60).json()
    assert_matches(result, [item["result"] for item in batch["results"]])
    parameters = result.get_response()["parameters"]
    assert parameters["policy"] == "batch_budget" and parameters["budget"] == budget
    assert parameters["mean_cost_fraction"] == pytest.approx(batch["summary"]["mean_cost_fraction"], abs=1e-6)
    assert parameters["expected_accuracy"] == batch["summary"]["expected_accuracy"]
    # the whole request's budget holds, and is spent; each image on its own would overspend it
    assert budget * 0.9 <= parameters["mean_cost_fraction"] <= budget + 1e-9
    each = client.infer(MODEL, [bytes_input(hard_blobs, True)], parameters={"budget": budget})
    assert each.get_response()["parameters"]["mean_cost_fraction"] > budget


def test_deadline_answers_early(client, url: str, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels[:4]]
    rushed = client.infer(MODEL, [bytes_input(blobs, True)], parameters={"budget": 1.0, "deadline_ms": 0.001})
    assert (rushed.as_numpy("exit_index") == 0).all()
    assert rushed.get_response()["parameters"]["deadline_hits"] == 4
    expected = [classify(url, b, budget=1.0, deadline_ms=0.001) for b in blobs]
    assert all(e["exit"]["deadline_hit"] and e["exit"]["index"] == 0 for e in expected)
    assert (rushed.as_numpy("class_index") == [e["class_index"] for e in expected]).all()
    relaxed = client.infer(MODEL, [bytes_input(blobs, True)], parameters={"budget": 1.0, "deadline_ms": 60_000})
    assert (relaxed.as_numpy("exit_index") == 4).all() and relaxed.get_response()["parameters"]["deadline_hits"] == 0


# ---------------------------------------------------------------------------- outputs


def test_a_subset_of_outputs_binary_or_json(client, url: str, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels[:3]]
    outputs = [triton.InferRequestedOutput("exit_index", binary_data=False),
               triton.InferRequestedOutput("class_index", binary_data=True)]
    result = client.infer(MODEL, [bytes_input(blobs, True)], outputs=outputs, parameters={"budget": 0.5})
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["exit_index", "class_index"]
    assert "data" in response["outputs"][0] and response["outputs"][1]["parameters"]["binary_data_size"] == 3 * 8
    assert result.as_numpy("probabilities") is None
    expected = [classify(url, b, budget=0.5) for b in blobs]
    assert result.as_numpy("class_index").tolist() == [e["class_index"] for e in expected]
    assert result.as_numpy("exit_index").tolist() == [e["exit"]["index"] for e in expected]

    # Triton's classification extension: "probability:index:label", most probable first
    for binary in (False, True):
        top = client.infer(MODEL, [bytes_input(blobs, False)], parameters={"budget": 0.5},
                           outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)])
        rows = top.as_numpy("probabilities")
        assert rows.shape == (3, 3)
        for row, answer in zip(rows, expected):
            fields = [(entry.decode() if binary else entry).split(":") for entry in row]
            assert [int(f[1]) for f in fields] == [t["class_index"] for t in answer["top_k"][:3]]
            assert [f[2] for f in fields] == [t["label"] for t in answer["top_k"][:3]]
            assert [float(f[0]) for f in fields] == pytest.approx([t["probability"] for t in answer["top_k"][:3]],
                                                                  abs=PROBABILITY_TOLERANCE)


def test_raw_json_request_and_binary_response_on_the_wire(url: str, pixels: np.ndarray) -> None:
    """Without the client library: a JSON request, and the binary extension's framing."""
    blob = encode(pixels[0])
    body = {"id": "r1", "parameters": {"budget": 0.5, "binary_data_output": True},
            "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(blob).decode()]}]}
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    assert header["id"] == "r1" and [o["name"] for o in header["outputs"]] == list(OUTPUTS)
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [40, 8, 4, 4] and len(response.content) == length + sum(sizes)
    probs = np.frombuffer(response.content[length:length + 40], dtype="<f4")
    assert int(np.argmax(probs)) == classify(url, blob, budget=0.5)["class_index"]

    plain = httpx.post(f"{url}/v2/models/{MODEL}/versions/1/infer", timeout=60,
                       json={**body, "parameters": {"budget": 0.5}})
    assert plain.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in plain.headers
    assert [o["data"] for o in plain.json()["outputs"]][1] == [int(np.argmax(probs))]


def test_compressed_request(client, url: str, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels[:2]]
    for algorithm in ("gzip", "deflate"):
        result = client.infer(MODEL, [bytes_input(blobs, True)], parameters={"budget": 0.5},
                              request_compression_algorithm=algorithm)
        assert_matches(result, [classify(url, b, budget=0.5) for b in blobs])


# ---------------------------------------------------------------------------- errors


def bad_request(client, inputs, status: str = "400", **kwargs) -> str:
    error = error_of(lambda: client.infer(kwargs.pop("model", MODEL), inputs, **kwargs))
    assert error.status() == status, error.message()
    return error.message()


def test_a_bad_element_fails_the_request_and_is_named(client, url: str, pixels: np.ndarray) -> None:
    good = encode(pixels[0])
    for bad, says in ((b"hello", "not an image"), (good[: len(good) // 2], "truncated or corrupt"), (b"", "empty")):
        message = bad_request(client, [bytes_input([good, good, bad, good], True)])
        assert message.startswith("input 'images' element 2:") and says in message, message
    json_garbage = triton.InferInput("images", [2], "BYTES")
    json_garbage.set_data_from_numpy(np.array([base64.b64encode(good), b"%%%"], dtype=object), binary_data=False)
    assert "element 1" in bad_request(client, [json_garbage])
    assert client.infer(MODEL, [bytes_input([good], True)]).as_numpy("class_index").shape == (1,)  # the server goes on


def test_bad_datatypes_shapes_and_values_are_400(client, pixels: np.ndarray) -> None:
    grey = pixels[:2, :, :, 0]
    cases = [
        ([array_input("pixels", "FP32", grey.astype(np.float32), True)], "input 'pixels' is UINT8, got FP32"),
        ([array_input("normalized", "UINT8", grey, True)], "input 'normalized' is FP32, got UINT8"),
        ([array_input("picture", "UINT8", grey, True)], "no input 'picture'"),
        ([array_input("pixels", "UINT8", grey[0, 0], True)], "[N, H, W] or [N, H, W, C]"),
        ([array_input("pixels", "UINT8", np.zeros((1, 28, 28, 2), np.uint8), True)], "1, 3 or 4 channels"),
        ([array_input("normalized", "FP32", np.zeros((2, 3, 28, 28), np.float32), False)], "[N, 1, 28, 28]"),
        ([array_input("normalized", "FP32", np.full((1, 1, 28, 28), np.nan, np.float32), True)], "finite"),
        ([array_input("pixels", "UINT8", grey, True), array_input("pixels", "UINT8", grey, True)], "exactly one input"),
        ([array_input("pixels", "UINT8", np.zeros((MAX_IMAGES + 1, 28, 28), np.uint8), True)], f"1 to {MAX_IMAGES}"),
        ([array_input("pixels", "UINT8", np.zeros((1, 0, 0), np.uint8), False)], "hold no image"),
        ([array_input("pixels", "UINT8", np.zeros((1, 28, 0, 1), np.uint8), True)], "hold no image"),
    ]
    for inputs, says in cases:
        message = bad_request(client, inputs)
        assert says in message, message
    blob = encode(pixels[0])
    for parameters, says in (({"budget": 2}, "budget must be in (0, 1]"), ({"budget": "cheap"}, "must be a number"),
                             ({"deadline_ms": -1}, "deadline_ms"),
                             ({"batch_budget": 0.5, "budget": 0.5}, "batch_budget"),
                             ({"batch_budget": 0.01}, "below the cost of the first exit")):
        message = bad_request(client, [bytes_input([blob], True)], parameters=parameters)
        assert says in message, message
    message = bad_request(client, [bytes_input([blob], True)], outputs=[triton.InferRequestedOutput("logits")])
    assert "no output 'logits'" in message


def test_unknown_model_or_version_is_404(client, pixels: np.ndarray) -> None:
    inputs = [bytes_input([encode(pixels[0])], True)]
    assert "no model 'no_such_model'" in bad_request(client, inputs, "404", model="no_such_model")
    assert "no version '3'" in bad_request(client, inputs, "404", model_version="3")


@pytest.mark.parametrize("body, says", [
    (b"not json", "not an inference request"),
    (b'{"inputs": []}', "inputs"),
    (b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES"}]}', "neither data nor"),
    (b'{"inputs": [{"name": "pixels", "shape": [1, 2, 2], "datatype": "UINT8", "data": [1, 2, 3]}]}', "needs 4"),
    (b'{"inputs": [{"name": "pixels", "shape": [1, 1, 2], "datatype": "UINT8", "data": [1, 300]}]}', "[0, 255]"),
    (b'{"inputs": [{"name": "pixels", "shape": [1, 1, 1], "datatype": "UINT8", "data": [1]}], '
     b'"parameters": {"budget": {"a": 1}}}', "not an inference request"),
])
def test_malformed_bodies_are_400_with_the_protocol_error_body(url: str, body: bytes, says: str) -> None:
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and list(response.json()) == ["error"], response.text
    assert says in response.json()["error"]


def test_binary_framing_errors_are_400(url: str) -> None:
    header = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 10}}]}).encode()

    def post(body: bytes, length: int | str) -> httpx.Response:
        return httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body,
                          headers={"inference-header-content-length": str(length)})

    for body, length, says in ((header + b"\x05\x00\x00\x00ab", len(header), "past the end"),
                               (header + b"\x06\x00\x00\x00abcdef" + b"x", len(header), "belong to no input"),
                               (header, len(header) + 5, "but the body has"),
                               (header, "abc", "must be an integer"),
                               # 10 bytes that frame one element, which is not an image
                               (header + b"\x06\x00\x00\x00abcdef", len(header), "element 0")):
        response = post(body, length)
        assert response.status_code == 400 and says in response.json()["error"], response.text


def test_v2_requests_have_their_own_route_label(client, url: str, pixels: np.ndarray) -> None:
    def count(status: str) -> float:
        text = httpx.get(f"{url}/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "exitserve_requests_total"
                   and s.labels == {"route": "/v2/models/{name}/infer", "status": status})

    ok, missing = count("200"), count("404")
    client.infer(MODEL, [bytes_input([encode(pixels[0])], True)])
    error_of(lambda: client.infer("no_such_model", [bytes_input([encode(pixels[0])], True)]))
    assert count("200") == ok + 1 and count("404") == missing + 1
    text = httpx.get(f"{url}/metrics").text
    assert f'exitserve_request_latency_seconds_count{{model="{MODEL}",route="/v2/models/{{name}}/infer"}}' in text
    assert 'exitserve_request_latency_seconds_count{model="unknown",route="/v2/models/{name}/infer"}' in text


# ---------------------------------------------------------------------------- before the models are ready


def test_503_while_models_load(tmp_path: Path) -> None:
    """The app without its lifespan has loaded nothing: what a server answers while loading."""
    client = TestClient(create_app(Settings(model_repository=tmp_path)))
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False and "loading" in ready.json()["error"]
    for response in (client.get(f"/v2/models/{MODEL}/ready"), client.get(f"/v2/models/{MODEL}"),
                     client.post(f"/v2/models/{MODEL}/infer", json={"inputs": []})):
        assert response.status_code == 503 and list(response.json()) == ["error"], response.text
        assert "loading" in response.json()["error"] and response.headers["retry-after"]
