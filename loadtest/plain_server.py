"""The baseline users would otherwise write: a hand-written FastAPI app with one ONNX
Runtime session of the full network (``full_model.onnx`` from a model folder).

Only the benchmark uses it, to compare side by side with exitserve on the same images.
Run: ``python -m exitserve.loadtest.plain_server MODEL_FOLDER --port 8001``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image


def create_plain_app(folder: Path) -> FastAPI:
    manifest = json.loads((folder / "manifest.json").read_text())
    spec = manifest["input"]
    labels = manifest["labels"]
    session = ort.InferenceSession(str(folder / manifest["full_model"]), providers=["CPUExecutionProvider"])
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    mode = "L" if spec["channels"] == 1 else "RGB"
    app = FastAPI(title="plain full-depth server")

    def answer(data: bytes) -> dict:
        img = Image.open(io.BytesIO(data)).convert(mode).resize((spec["size"], spec["size"]))
        pixels = np.asarray(img, np.float32)
        pixels = pixels[None, :, :, None] if pixels.ndim == 2 else pixels[None]
        batch = (pixels.transpose(0, 3, 1, 2) / 255.0 - mean) / std
        probs = session.run(["probs"], {"image": batch.astype(np.float32)})[0][0]
        best = int(probs.argmax())
        return {"label": labels[best], "class_index": best, "confidence": float(probs[best])}

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        """Multipart field ``file``, or the image as the raw body (what ``wrk`` sends)."""
        if request.headers.get("content-type", "").startswith("multipart/"):
            upload = (await request.form())["file"]
            data = await upload.read()
        else:
            data = await request.body()
        return await run_in_threadpool(answer, data)

    @app.post("/noop")
    async def noop(request: Request) -> dict:
        """The framework's floor: read the body, answer a constant."""
        await request.body()
        return {"label": "noop", "class_index": 0, "confidence": 1.0}

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_plain_app(args.folder), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
