"""The v2 protocol's bodies on their own: the binary tensor extension's framing, JSON
tensors, compressed bodies (no server, no model)."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from exitserve.server.http.errors import RequestProblem
from exitserve.server.http.v2_codec import OutputTensor, decompress, encode_response, parse_request, to_array


def framed(header: dict, *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


def test_binary_inputs_are_cut_in_input_order() -> None:
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    strings = [b"first", b"", b"third"]
    packed = b"".join(struct.pack("<I", len(s)) + s for s in strings)
    body, length = framed({"inputs": [
        {"name": "a", "shape": [2, 3, 4], "datatype": "UINT8", "parameters": {"binary_data_size": pixels.nbytes}},
        {"name": "b", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(packed)}},
        {"name": "c", "shape": [2], "datatype": "FP32", "data": [[0.5], [1.5]]},
    ]}, pixels.tobytes(), packed)
    request, blobs = parse_request(body, length)
    a, b, c = (to_array(t, blob) for t, blob in zip(request.inputs, blobs))
    assert (a == pixels).all() and a.dtype == np.uint8
    assert b.tolist() == strings
    assert c.dtype == np.float32 and c.tolist() == [0.5, 1.5]


@pytest.mark.parametrize("data, datatype, says", [
    ([1.5], "UINT8", "integers in [0, 255]"),
    ([-1], "UINT8", "integers in [0, 255]"),
    (["1"], "FP32", "must be numbers"),
    ([[1, 2], [3]], "FP32", "evenly nested"),
    ([1, 2], "FP32", "needs 3"),
    ([1, 2, 3], "BF16", "unknown datatype"),
    (["not base64!"], "BYTES", "not base64"),
])
def test_json_data_that_would_change_in_the_cast_is_refused(data, datatype: str, says: str) -> None:
    shape = [1] if datatype == "BYTES" else [3]
    request, blobs = parse_request(json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype,
                                                           "data": data}]}).encode(), None)
    with pytest.raises(RequestProblem) as refused:
        to_array(request.inputs[0], blobs[0])
    assert refused.value.status == 400 and says in refused.value.detail


def test_answers_put_binary_outputs_after_the_header() -> None:
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    body, length = encode_response({"model_name": "m"}, [
        OutputTensor("probabilities", "FP32", probs, binary=True),
        OutputTensor("class_index", "INT64", np.array([1]), binary=False),
        OutputTensor("top", "BYTES", np.array([[b"0.75:1:b"]], dtype=object), binary=True),
    ])
    header = json.loads(body[:length])
    assert header["outputs"][1] == {"name": "class_index", "datatype": "INT64", "shape": [1], "data": [1]}
    sizes = [header["outputs"][i]["parameters"]["binary_data_size"] for i in (0, 2)]
    assert sizes == [8, 4 + 8] and len(body) == length + sum(sizes)
    assert np.frombuffer(body[length:length + 8], "<f4").tolist() == [0.25, 0.75]
    assert body[length + 8:] == struct.pack("<I", 8) + b"0.75:1:b"
    only_json, none = encode_response({}, [OutputTensor("class_index", "INT64", np.array([1]), binary=False)])
    assert none is None and json.loads(only_json)["outputs"][0]["data"] == [1]


def test_compressed_bodies_inflate_within_the_limit() -> None:
    body = b'{"inputs": []}' * 10
    assert decompress(gzip.compress(body), "gzip", 1000) == body
    assert decompress(zlib.compress(body), "deflate", 1000) == body
    assert decompress(body, None, 1000) == body
    bomb = gzip.compress(b"\0" * 1_000_000)
    for data, encoding, status in ((bomb, "gzip", 413), (gzip.compress(body)[:-12], "gzip", 400),
                                   (b"plain", "gzip", 400), (body, "br", 400)):
        with pytest.raises(RequestProblem) as refused:
            decompress(data, encoding, 1000)
        assert refused.value.status == status, refused.value.detail
