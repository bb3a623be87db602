"""The Open Inference Protocol over gRPC, spoken by Triton's own gRPC client (``tritonclient``)
to ``exitserve serve`` with ``EXITSERVE_GRPC_PORT`` on loopback: every input kind, raw and
typed contents, every parameter; each answer compared with /classify (or /classify/batch)
and with v2 over HTTP on the same server; errors as status codes, API keys, request ids,
metrics and the drain after SIGTERM.

The servers are processes of their own, not threads of this one: Triton's client registers
its own copy of the protocol's messages (package ``inference``) in protobuf's default pool,
which then refuses the server's copy in the same process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from exitserve.loadtest.overload import check_listener, process_tree
from exitserve.repository.format import load_manifest
from tests.server.test_v2_protocol import PROBABILITY_TOLERANCE, assert_matches, classify
from tests.support.images import encode, fashion_images
from tests.support.live import free_port
from tests.support.processes import MARGIN_S, ServerProcess, eventually, running

MODEL = "msdnet_fmnist"
MAX_IMAGES = 16
OUTPUTS = ("probabilities", "class_index", "exit_index", "cost_fraction")
ROUTE = "grpc:ModelInfer"


@dataclass
class Live:
    server: ServerProcess
    target: str  # host:port of the gRPC listener

    @property
    def url(self) -> str:
        return self.server.url


@contextmanager
def serving(served_repository: Path, **env: object) -> Iterator[Live]:
    """``exitserve serve`` with a gRPC port; the gRPC listener checked to be that process's."""
    port = free_port()
    with running(served_repository, grpc_port=port, **env) as server:
        check_listener(port, process_tree(server.proc.pid), "exitserve gRPC")
        yield Live(server, f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def live(served_repository: Path) -> Iterator[Live]:
    with serving(served_repository, online_budget="false", max_files=MAX_IMAGES, max_body_bytes=2_000_000) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: Live) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(live.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(live: Live) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(live.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(live: Live) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """Triton's generated stub on a plain channel: typed contents, metadata both ways."""
    with grpc.insecure_channel(live.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return fashion_images(12)[0]  # N x 28 x 28 x 1 uint8


# ---------------------------------------------------------------------------- helpers


def images(blobs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=object))  # raw_input_contents
    return tensor


def array_input(name: str, datatype: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def http_input(name: str, datatype: str, array: np.ndarray) -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def parameters_of(result: triton.InferResult) -> dict:
    return {name: getattr(value, value.WhichOneof("parameter_choice"))
            for name, value in result.get_response().parameters.items()}


def assert_same_answer(result: triton.InferResult, over_http: triton_http.InferResult) -> None:
    """gRPC's answer is v2 over HTTP's: the same tensors and the same parameters."""
    for name in ("class_index", "exit_index", "cost_fraction"):
        ours, theirs = result.as_numpy(name), over_http.as_numpy(name)
        assert ours.dtype == theirs.dtype and (ours == theirs).all(), name
    np.testing.assert_allclose(result.as_numpy("probabilities"), over_http.as_numpy("probabilities"),
                               atol=PROBABILITY_TOLERANCE)
    assert parameters_of(result) == over_http.get_response()["parameters"]


def typed_request(name: str, datatype: str, shape: list[int], parameters: dict | None = None,
                  **contents: object) -> pb.ModelInferRequest:
    """A request with typed contents (``InferTensorContents``), as Triton's client never sends."""
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents))])
    for key, value in (parameters or {}).items():
        request.parameters[key].double_param = value
    return request


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def refused(client: triton.InferenceServerClient, inputs: list, code: str, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(kwargs.pop("model", MODEL), inputs, **kwargs)
    assert caught.value.status() == f"StatusCode.{code}", caught.value.message()
    return caught.value.message()


def requests_counted(url: str) -> dict[tuple[str, str], float]:
    """exitserve_requests_total by (route, status)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.labels["route"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "exitserve_requests_total"}


# ---------------------------------------------------------------------------- health and metadata


def test_health_and_metadata(client: triton.InferenceServerClient,
                             http_client: triton_http.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    for name, version in (("no_such_model", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as caught:
            client.is_model_ready(name, version)
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "exitserve" and set(server["extensions"]) == {"classification", "parameters"}
    assert server["version"] == http_client.get_server_metadata()["version"]

    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata == client.get_model_metadata(MODEL, "1", as_json=True)
    over_http = http_client.get_model_metadata(MODEL)
    for key in ("name", "versions", "platform"):
        assert metadata[key] == over_http[key]
    for kind in ("inputs", "outputs"):  # protobuf's JSON writes int64 as strings
        assert [(t["name"], t["datatype"], [int(s) for s in t["shape"]]) for t in metadata[kind]] == \
               [(t["name"], t["datatype"], t["shape"]) for t in over_http[kind]]
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("no_such_model")
    assert caught.value.status() == "StatusCode.NOT_FOUND" and "no model 'no_such_model'" in caught.value.message()


# ---------------------------------------------------------------------------- answers equal /classify and v2 over HTTP


@pytest.mark.parametrize("count", [1, 8])
def test_bytes_images_match_classify_and_v2_over_http(client, http_client, live: Live, pixels: np.ndarray,
                                                      count: int) -> None:
    blobs = [encode(p) for p in pixels[:count]]
    result = client.infer(MODEL, [images(blobs)], parameters={"budget": 0.5})
    assert_matches(result, [classify(live.url, b, budget=0.5) for b in blobs])
    over_http = triton_http.InferInput("images", [count], "BYTES")
    over_http.set_data_from_numpy(np.array(blobs, dtype=object))
    assert_same_answer(result, http_client.infer(MODEL, [over_http], parameters={"budget": 0.5}))
    response = result.get_response()
    assert response.model_name == MODEL and response.model_version == "1"
    assert [o.name for o in response.outputs] == list(OUTPUTS) and len(response.raw_output_contents) == 4
    parameters = parameters_of(result)
    assert parameters["policy"] == "budget" and parameters["budget"] == 0.5 and parameters["deadline_hits"] == 0


def test_typed_bytes_contents_equal_raw_contents(client, stub, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels[:5]]
    raw = client.infer(MODEL, [images(blobs)], parameters={"budget": 0.5})
    typed = triton.InferResult(stub.ModelInfer(typed_request("images", "BYTES", [5], {"budget": 0.5},
                                                             bytes_contents=blobs)))
    for name in ("class_index", "exit_index", "cost_fraction"):
        assert (typed.as_numpy(name) == raw.as_numpy(name)).all(), name
    np.testing.assert_allclose(typed.as_numpy("probabilities"), raw.as_numpy("probabilities"),
                               atol=PROBABILITY_TOLERANCE)
    assert parameters_of(typed) == parameters_of(raw)


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_uint8_pixels_match_classify_of_the_same_pixels(client, stub, http_client, live: Live, pixels: np.ndarray,
                                                        contents: str) -> None:
    rgb = np.repeat(np.repeat(np.repeat(pixels[:4], 3, axis=-1), 2, axis=1), 2, axis=2)  # N x 56 x 56 x 3
    rgb[:, :4, :4, 0] = 255  # a little colour, so the grey conversion matters
    cases = [(pixels[:4, :, :, 0], pixels[:4]), (pixels[:4], pixels[:4]), (rgb, rgb)]  # [N,H,W], [N,H,W,1], resized
    for array, as_png in cases:
        if contents == "raw":
            result = client.infer(MODEL, [array_input("pixels", "UINT8", array)], parameters={"budget": 0.4})
        else:
            result = triton.InferResult(stub.ModelInfer(typed_request(
                "pixels", "UINT8", list(array.shape), {"budget": 0.4}, uint_contents=array.ravel().tolist())))
        assert_matches(result, [classify(live.url, encode(p), budget=0.4) for p in as_png])
        assert_same_answer(result, http_client.infer(MODEL, [http_input("pixels", "UINT8", array)],
                                                     parameters={"budget": 0.4}))


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_fp32_normalized_matches_classify(client, stub, http_client, live: Live, served_repository: Path,
                                          pixels: np.ndarray, contents: str) -> None:
    normalized = load_manifest(served_repository / MODEL).input.normalize(pixels[:5])  # N x 1 x 28 x 28
    if contents == "raw":
        result = client.infer(MODEL, [array_input("normalized", "FP32", normalized)], parameters={"budget": 0.3})
    else:
        result = triton.InferResult(stub.ModelInfer(typed_request(
            "normalized", "FP32", list(normalized.shape), {"budget": 0.3}, fp32_contents=normalized.ravel().tolist())))
    assert_matches(result, [classify(live.url, encode(p), budget=0.3) for p in pixels[:5]])
    assert_same_answer(result, http_client.infer(MODEL, [http_input("normalized", "FP32", normalized)],
                                                 parameters={"budget": 0.3}))


def test_default_budget_and_budgets_that_change_the_exit(client, live: Live, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels]
    default = client.infer(MODEL, [images(blobs)])
    assert parameters_of(default)["budget"] == 0.25
    assert_matches(default, [classify(live.url, b) for b in blobs])
    full = client.infer(MODEL, [images(blobs)], parameters={"budget": 1})  # an int64 parameter counts too
    assert (full.as_numpy("exit_index") == 4).all() and (full.as_numpy("cost_fraction") == 1.0).all()
    cheap = client.infer(MODEL, [images(blobs)], parameters={"budget": "0.12"})  # and a decimal string
    assert (cheap.as_numpy("exit_index") == 0).all()


@pytest.mark.parametrize("budget", [0.2, 0.3])
def test_batch_budget_matches_classify_batch_and_v2_over_http(client, http_client, live: Live,
                                                              budget: float) -> None:
    blobs = [encode(p) for p in fashion_images(16)[0]]
    result = client.infer(MODEL, [images(blobs)], parameters={"batch_budget": budget})
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    batch = httpx.post(f"{live.url}/classify/batch", files=files, data={"budget": str(budget), "top_k": "10"},
                       timeout=60).json()
    assert_matches(result, [item["result"] for item in batch["results"]])
    over_http = triton_http.InferInput("images", [len(blobs)], "BYTES")
    over_http.set_data_from_numpy(np.array(blobs, dtype=object))
    assert_same_answer(result, http_client.infer(MODEL, [over_http], parameters={"batch_budget": budget}))
    parameters = parameters_of(result)
    assert parameters["policy"] == "batch_budget" and parameters["budget"] == budget
    assert parameters["expected_accuracy"] == batch["summary"]["expected_accuracy"]
    assert parameters["mean_cost_fraction"] == pytest.approx(batch["summary"]["mean_cost_fraction"], abs=1e-6)
    assert parameters["mean_cost_fraction"] <= budget + 1e-9


def test_deadline_answers_early(client, live: Live, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels[:4]]
    rushed = client.infer(MODEL, [images(blobs)], parameters={"budget": 1.0, "deadline_ms": 0.001})
    assert (rushed.as_numpy("exit_index") == 0).all() and parameters_of(rushed)["deadline_hits"] == 4
    expected = [classify(live.url, b, budget=1.0, deadline_ms=0.001) for b in blobs]
    assert (rushed.as_numpy("class_index") == [e["class_index"] for e in expected]).all()
    relaxed = client.infer(MODEL, [images(blobs)], parameters={"budget": 1.0, "deadline_ms": 60_000})
    assert (relaxed.as_numpy("exit_index") == 4).all() and parameters_of(relaxed)["deadline_hits"] == 0


def test_a_subset_of_outputs_and_the_classification_extension(client, live: Live, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels[:3]]
    expected = [classify(live.url, b, budget=0.5) for b in blobs]
    outputs = [triton.InferRequestedOutput("exit_index"), triton.InferRequestedOutput("class_index")]
    result = client.infer(MODEL, [images(blobs)], outputs=outputs, parameters={"budget": 0.5})
    assert [o.name for o in result.get_response().outputs] == ["exit_index", "class_index"]
    assert result.as_numpy("probabilities") is None
    assert result.as_numpy("class_index").tolist() == [e["class_index"] for e in expected]
    assert result.as_numpy("exit_index").tolist() == [e["exit"]["index"] for e in expected]

    top = client.infer(MODEL, [images(blobs)], parameters={"budget": 0.5},
                       outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])
    rows = top.as_numpy("probabilities")
    assert rows.shape == (3, 3)
    for row, answer in zip(rows, expected):
        fields = [entry.decode().split(":") for entry in row]
        assert [int(f[1]) for f in fields] == [t["class_index"] for t in answer["top_k"][:3]]
        assert [f[2] for f in fields] == [t["label"] for t in answer["top_k"][:3]]
        assert [float(f[0]) for f in fields] == pytest.approx([t["probability"] for t in answer["top_k"][:3]],
                                                              abs=PROBABILITY_TOLERANCE)


def test_compressed_requests(client, live: Live, pixels: np.ndarray) -> None:
    blobs = [encode(p) for p in pixels[:2]]
    for algorithm in ("gzip", "deflate"):
        result = client.infer(MODEL, [images(blobs)], parameters={"budget": 0.5}, compression_algorithm=algorithm)
        assert_matches(result, [classify(live.url, b, budget=0.5) for b in blobs])


# ---------------------------------------------------------------------------- request ids


def test_request_ids_round_trip_and_reach_the_answer_memory(stub, live: Live, pixels: np.ndarray) -> None:
    blob = encode(pixels[1])  # a trouser
    request = typed_request("images", "BYTES", [1], bytes_contents=[blob])
    answer, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "grpc-test.1")])
    assert dict(call.trailing_metadata())["x-request-id"] == "grpc-test.1"
    labelled = httpx.post(f"{live.url}/v1/models/{MODEL}/labels", timeout=10, json={"labels": [
        {"request_id": "grpc-test.1", "label": int(triton.InferResult(answer).as_numpy("class_index")[0])}]})
    assert labelled.status_code == 200 and labelled.json()["matched"] == 1, labelled.text

    _, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "not a safe id")])  # replaced
    fresh = dict(call.trailing_metadata())["x-request-id"]
    assert len(fresh) == 32 and int(fresh, 16) >= 0
    failed = rpc_error(lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="no_such_model"),
                                               metadata=[("x-request-id", "grpc-test.2")]))
    assert dict(failed.trailing_metadata())["x-request-id"] == "grpc-test.2"  # errors carry it too


# ---------------------------------------------------------------------------- errors


def test_bad_inputs_and_options_are_invalid_argument(client, stub, pixels: np.ndarray) -> None:
    good = encode(pixels[0])
    for bad, says in ((b"hello", "not an image"), (good[: len(good) // 2], "truncated or corrupt"), (b"", "empty")):
        message = refused(client, [images([good, good, bad, good])], "INVALID_ARGUMENT")
        assert message.startswith("input 'images' element 2:") and says in message, message
    grey = pixels[:2, :, :, 0]
    cases = [
        ([array_input("pixels", "FP32", grey.astype(np.float32))], "input 'pixels' is UINT8, got FP32"),
        ([array_input("picture", "UINT8", grey)], "no input 'picture'"),
        ([array_input("pixels", "UINT8", grey[0, 0])], "[N, H, W] or [N, H, W, C]"),
        ([array_input("pixels", "UINT8", np.zeros((1, 28, 28, 2), np.uint8))], "1, 3 or 4 channels"),
        ([array_input("normalized", "FP32", np.zeros((2, 3, 28, 28), np.float32))], "[N, 1, 28, 28]"),
        ([array_input("normalized", "FP32", np.full((1, 1, 28, 28), np.nan, np.float32))], "finite"),
        ([array_input("pixels", "UINT8", grey), array_input("pixels", "UINT8", grey)], "exactly one input"),
        ([array_input("pixels", "UINT8", np.zeros((MAX_IMAGES + 1, 28, 28), np.uint8))], f"1 to {MAX_IMAGES}"),
    ]
    for inputs, says in cases:
        assert says in refused(client, inputs, "INVALID_ARGUMENT")
    for parameters, says in (({"budget": 2.0}, "budget must be in (0, 1]"), ({"budget": "cheap"}, "must be a number"),
                             ({"budget": True}, "must be a number"), ({"deadline_ms": -1}, "deadline_ms"),
                             ({"batch_budget": 0.5, "budget": 0.5}, "batch_budget"),
                             ({"batch_budget": 0.01}, "below the cost of the first exit")):
        assert says in refused(client, [images([good])], "INVALID_ARGUMENT", parameters=parameters)
    assert "no output 'logits'" in refused(client, [images([good])], "INVALID_ARGUMENT",
                                           outputs=[triton.InferRequestedOutput("logits")])

    # the framing of raw and typed contents, without Triton's client (it always sends raw)
    both = typed_request("images", "BYTES", [1], bytes_contents=[good])
    both.raw_input_contents.append(b"")
    out_of_range = typed_request("pixels", "UINT8", [1, 1, 2], uint_contents=[1, 300])
    wrong_field = typed_request("pixels", "UINT8", [1, 1, 2], fp32_contents=[1.0, 2.0])
    short = typed_request("pixels", "UINT8", [1, 2, 2], uint_contents=[1, 2, 3])
    no_data = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="images", datatype="BYTES", shape=[1])])
    cut = pb.ModelInferRequest(model_name=MODEL, inputs=no_data.inputs, raw_input_contents=[b"\x05\x00\x00\x00ab"])
    for request, says in ((both, "one or the other"), (out_of_range, "[0, 255]"), (wrong_field, "uint_contents"),
                          (short, "needs 4"), (no_data, "no data"), (cut, "past the end")):
        error = rpc_error(lambda: stub.ModelInfer(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and says in error.details(), error.details()
    assert client.infer(MODEL, [images([good])]).as_numpy("class_index").shape == (1,)  # the server goes on


def test_unknown_model_or_version_is_not_found(client, pixels: np.ndarray) -> None:
    inputs = [images([encode(pixels[0])])]
    assert "no model 'no_such_model'" in refused(client, inputs, "NOT_FOUND", model="no_such_model")
    assert "no version '3'" in refused(client, inputs, "NOT_FOUND", model_version="3")
    assert "model_name" in refused(client, inputs, "INVALID_ARGUMENT", model="")  # never the default model


def test_a_message_over_the_body_limit_is_refused(client) -> None:
    noise = np.zeros((8, 300, 300, 3), np.uint8)  # 2.16 MB, over the 2 MB body limit
    refused(client, [array_input("pixels", "UINT8", noise)], "RESOURCE_EXHAUSTED")


def test_requests_are_counted_under_their_own_route(client, live: Live, pixels: np.ndarray) -> None:
    before = requests_counted(live.url)
    client.infer(MODEL, [images([encode(pixels[0])])])
    refused(client, [images([encode(pixels[0])])], "NOT_FOUND", model="no_such_model")
    refused(client, [images([b"hello"])], "INVALID_ARGUMENT")
    after = requests_counted(live.url)
    for status in ("200", "404", "400"):
        assert after.get((ROUTE, status), 0) == before.get((ROUTE, status), 0) + 1, status
    text = httpx.get(f"{live.url}/metrics").text
    assert f'exitserve_request_latency_seconds_count{{model="{MODEL}",route="{ROUTE}"}}' in text
    assert f'exitserve_request_latency_seconds_count{{model="unknown",route="{ROUTE}"}}' in text


# ---------------------------------------------------------------------------- keys and overload


def test_api_keys_and_overload(served_repository: Path, pixels: np.ndarray) -> None:
    env = dict(api_keys="key-one,key-two", max_files=4, max_queue_images=4, max_queue_delay_ms=400)
    with serving(served_repository, **env) as live, grpc.insecure_channel(live.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = typed_request("images", "BYTES", [4], {"budget": 1.0}, bytes_contents=[encode(p) for p in pixels[:4]])
        with_key = [("authorization", "Bearer key-one")]

        # keys: health answers without one, as /v2/health does; everything else needs one
        assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
        for metadata in ([], [("authorization", "Bearer wrong")], [("x-api-key", "wrong")],
                         [("authorization", "key-one")]):
            for call in (lambda: stub.ModelInfer(request, metadata=metadata),
                         lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=metadata)):
                error = rpc_error(call)
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in error.details()
        for metadata in (with_key, [("x-api-key", "key-two")]):
            assert len(stub.ModelInfer(request, metadata=metadata).outputs) == 4
        assert requests_counted(live.url).get((ROUTE, "401"), 0) == 4

        # a full queue: the first request's 4 images wait 400 ms for a batch, the others find no room
        calls = [stub.ModelInfer.future(request, metadata=with_key) for _ in range(6)]
        outcomes = []
        for call in calls:
            try:
                call.result(timeout=60)
                outcomes.append("OK")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                assert "waiting" in error.details() and dict(error.trailing_metadata())["retry-after"] == "1"
                outcomes.append("UNAVAILABLE")
        assert "OK" in outcomes and "UNAVAILABLE" in outcomes, outcomes
        assert requests_counted(live.url).get((ROUTE, "503"), 0) == outcomes.count("UNAVAILABLE")


# ---------------------------------------------------------------------------- drain


GRACE_S, SHUTDOWN_S = 3, 3


def test_sigterm_drains_then_stops_within_the_shutdown_timeout(served_repository: Path, pixels: np.ndarray) -> None:
    """Draining: ServerReady false and calls still answered; then a call that cannot finish
    (its image waits ten minutes for a batch to fill) is cut at the shutdown timeout."""
    env = dict(drain_grace_s=GRACE_S, shutdown_timeout_s=SHUTDOWN_S, max_queue_delay_ms=600_000)
    with serving(served_repository, **env) as live, grpc.insecure_channel(live.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        full_batch = typed_request("images", "BYTES", [32], bytes_contents=[encode(p) for p in fashion_images(32)[0]])
        one = typed_request("images", "BYTES", [1], bytes_contents=[encode(pixels[0])])
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        live.server.proc.send_signal(signal.SIGTERM)
        eventually(lambda: not stub.ServerReady(pb.ServerReadyRequest()).ready, GRACE_S,
                   "ServerReady false after SIGTERM")
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
        assert len(stub.ModelInfer(full_batch, timeout=30).outputs) == 4  # still served while draining
        stuck = stub.ModelInfer.future(one)
        code, output = live.server.wait_exit(GRACE_S + SHUTDOWN_S + MARGIN_S)  # vs 600 s for the batch
        assert code in (0, -signal.SIGTERM), output[-4000:]
        with pytest.raises(grpc.RpcError) as cut:
            stuck.result(timeout=10)
        assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), cut.value
        error = rpc_error(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------- the extra


def imported_by_serving(served_repository: Path, grpc_port: int | None) -> set[str]:
    """Which of grpc, protobuf and torch a served app has imported once it is ready (a
    process of its own: this one has Triton's client loaded)."""
    script = textwrap.dedent(f"""
        import json, sys, time
        from fastapi.testclient import TestClient
        from exitserve.server.http.app import create_app
        from exitserve.server.settings import Settings
        settings = Settings(model_repository={str(served_repository)!r}, grpc_port={grpc_port!r})
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            print(json.dumps(sorted({{"grpc", "google.protobuf", "torch"}} & set(sys.modules))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_grpc_is_imported_only_with_a_port_and_torch_never(served_repository: Path) -> None:
    assert imported_by_serving(served_repository, None) == set()
    assert imported_by_serving(served_repository, free_port()) == {"grpc", "google.protobuf"}


def test_a_port_without_the_extra_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['grpc'] = None  # as if not installed\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "exitserve.cli", "serve", "--model-repository", str(tmp_path),
                           "--grpc-port", str(free_port())], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "pip install 'exitserve[grpc]'" in done.stderr, done.stderr
