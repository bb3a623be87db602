"""A LitServe baseline: the same ``full_model.onnx`` as ``loadtest.plain_server``, served by
LitServe (PyPI ``litserve``, the ``bench`` extra) with LitServe's own dynamic batching.

Only the benchmark (``loadtest.wrk_bench``) uses it, to compare exitserve with a serving
framework that batches requests itself, on the same images and the same route shape:
POST /classify with the raw PNG as the body, answering
``{"class_index", "label", "confidence"}``; GET /health answers 200 once the model is loaded.

Run: ``python -m exitserve.loadtest.litserve_server MODEL_FOLDER --port 8002``.

Settings, and why:

* One ONNX Runtime CPU session with **1 intra-op thread**. That is the rule exitserve applies
  on this machine (``server.settings.default_intra_op_threads``: the cores per worker minus one
  for the event loop, at least one; on 2 cores with one worker, 1 thread). A pool spanning
  both cores fights the HTTP process for them; giving LitServe the same single inference
  thread keeps the comparison fair (same model, same arithmetic resources for inference).
* ``max_batch_size=32``, ``batch_timeout=0.002`` s: LitServe collects up to 32 requests, waiting
  at most 2 ms for more, and runs them as one batch (the model's batch axis is dynamic).
* ``fast_queue=True`` (ZeroMQ between the HTTP process and the inference worker) when the
  installed LitServe accepts it; LitServe's default is a multiprocessing queue.
* One HTTP server process and one inference worker process (LitServe's defaults for one
  CPU worker): LitServe's architecture always separates them.

LitServe hands ``decode_request`` whatever the endpoint received, after pickling it through its
queue to the inference worker, so a starlette ``Request`` cannot travel; the endpoint's request
parameter is therefore declared as ``Annotated[bytes, Depends(_raw_body)]``: FastAPI reads the raw
body in the HTTP process and LitServe queues the bytes. (No ``from __future__ import annotations``
in this module: LitServe reads that annotation with ``inspect.signature`` and hands it to FastAPI.)
"""

import argparse
import inspect
import io
import json
import os
from pathlib import Path
from typing import Annotated

import litserve as ls
import numpy as np
from fastapi import Depends, Request
from PIL import Image

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.002
INTRA_OP_THREADS = 1


async def _raw_body(request: Request) -> bytes:
    return await request.body()


RawBody = Annotated[bytes, Depends(_raw_body)]


class OnnxClassifierAPI(ls.LitAPI):
    """Decode + normalise each PNG like the plain server, run the batch through one session."""

    def __init__(self, folder: Path, **kwargs):
        super().__init__(**kwargs)
        self.folder = Path(folder)

    def setup(self, device):
        import onnxruntime as ort

        manifest = json.loads((self.folder / "manifest.json").read_text())
        spec = manifest["input"]
        self.labels = manifest["labels"]
        self.size = spec["size"]
        self.mode = "L" if spec["channels"] == 1 else "RGB"
        self.input_name = spec.get("name", "image")
        self.mean = np.asarray(spec["mean"], np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(spec["std"], np.float32).reshape(-1, 1, 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = INTRA_OP_THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.folder / manifest["full_model"]), options,
                                            providers=["CPUExecutionProvider"])

    def decode_request(self, request: RawBody) -> np.ndarray:
        img = Image.open(io.BytesIO(request)).convert(self.mode).resize((self.size, self.size))
        pixels = np.asarray(img, np.float32)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # CHW
        return ((pixels / 255.0 - self.mean) / self.std).astype(np.float32)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        if x.ndim == 3:  # a single request (max_batch_size=1, or LitServe bypassed batching)
            x = x[None]
        return self.session.run(["probs"], {self.input_name: x})[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output) -> dict:
        probs = np.asarray(output).reshape(-1)
        best = int(probs.argmax())
        return {"class_index": best, "label": self.labels[best], "confidence": float(probs[best])}


def build_server(folder: Path, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout: float = BATCH_TIMEOUT_S) -> ls.LitServer:
    api = OnnxClassifierAPI(folder, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                            api_path="/classify")
    kwargs = {"accelerator": "cpu", "devices": 1, "workers_per_device": 1}
    if "fast_queue" in inspect.signature(ls.LitServer.__init__).parameters:
        kwargs["fast_queue"] = True
    return ls.LitServer(api, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT_S)
    args = parser.parse_args()
    # The HTTP process does no inference; keep numpy's BLAS (if any) from spawning a pool too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    server = build_server(args.folder, args.max_batch_size, args.batch_timeout)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
