"""Side-by-side benchmark: exitserve (early exit) vs full depth vs a plain FastAPI server.

One run starts both servers on loopback, sends the same Fashion-MNIST test images to each
and prints a Markdown report (also written as JSON). Traffic goes only to 127.0.0.1 and
is bounded in count.

    python -m loadtest.benchmark --repository model_repository --model msdnet_fmnist
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import numpy as np
from tqdm import tqdm

from loadtest.images import encode_image
from models.data import load_splits


def start(cmd: list[str], url: str, env: dict | None = None, timeout: float = 180) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} was not ready in {timeout} s")


class KeepAliveClient:
    """A lean client for concurrency-1 latency: stdlib ``http.client`` on one keep-alive
    connection. httpx spends about 0.5 ms of its own Python per request here, which would
    be counted as server latency; both servers are measured with this same client."""

    BOUNDARY = "exitserve-benchmark-boundary"

    def __init__(self, url: str) -> None:
        parsed = urlsplit(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)

    def post_image(self, path: str, blob: bytes, params: dict, raw: bool = False) -> dict:
        query = f"{path}?{urlencode(params)}" if params else path
        if raw:
            body, content_type = blob, "image/png"
        else:
            head = (f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
                    "Content-Type: image/png\r\n\r\n").encode()
            body, content_type = head + blob + f"\r\n--{self.BOUNDARY}--\r\n".encode(), \
                f"multipart/form-data; boundary={self.BOUNDARY}"
        self.conn.request("POST", query, body=body, headers={"Content-Type": content_type})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {query}: {response.status} {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def sequential_latency(url: str, blobs: list[bytes], params: dict, desc: str, raw: bool = False) -> dict:
    """Concurrency 1: one request at a time; client-side wall time per request."""
    client = KeepAliveClient(url)
    wall, server_inference, exits, costs = [], [], [], []
    try:
        for blob in tqdm(blobs, desc=desc, leave=False):
            started = time.perf_counter()
            body = client.post_image("/classify", blob, params, raw)
            wall.append((time.perf_counter() - started) * 1000)
            if "timings_ms" in body:
                server_inference.append(body["timings_ms"]["inference"])
                exits.append(body["exit"]["index"])
                costs.append(body["exit"]["cost_fraction"])
    finally:
        client.close()
    out = {"median_ms": statistics.median(wall), "p90_ms": float(np.percentile(wall, 90)), "requests": len(wall)}
    if server_inference:
        out |= {"server_inference_median_ms": statistics.median(server_inference),
                "mean_exit": float(np.mean(exits)), "mean_cost": float(np.mean(costs))}
    return out


def _median_inference_ms(blobs: list[bytes], spec, infer) -> dict:
    """Decode and normalize each image first, then time ``infer(image)`` alone."""
    from server.preprocess import decode_image

    times = []
    for blob in blobs:
        image = spec.normalize(decode_image(blob, spec, 10**8)[None])
        started = time.perf_counter()
        infer(image)
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(times)}


def engine_latency(folder: Path, blobs: list[bytes], budget: float) -> dict:
    """The engine's own time for the same single images, in-process, no HTTP."""
    from server.engine import ModelEngine

    engine = ModelEngine.load(folder, default_budget=budget, provider="cpu", online_budget=False)
    engine.warm_up()
    thresholds = engine.policy.thresholds_for(budget)[None]
    return _median_inference_ms(blobs, engine.manifest.input, lambda image: engine.run_thresholds(image, thresholds))


def full_model_latency(folder: Path, blobs: list[bytes]) -> dict:
    """The plain server's own inference time: one ORT session of ``full_model.onnx``, in-process."""
    import onnxruntime as ort

    from exitserve.repository.format import load_manifest

    manifest = load_manifest(folder)
    session = ort.InferenceSession(str(folder / manifest.full_model), providers=["CPUExecutionProvider"])
    return _median_inference_ms(blobs, manifest.input, lambda image: session.run(["probs"], {"image": image}))


def batch_pass(client: httpx.Client, url: str, blobs: list[bytes], labels: np.ndarray, budget: float,
               batch: int, desc: str) -> dict:
    """All images through POST /classify/batch, ``batch`` per request."""
    correct, cost, inference_ms, wall = 0, 0.0, 0.0, 0.0
    for start in tqdm(range(0, len(blobs), batch), desc=desc, leave=False):
        files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs[start:start + batch])]
        t0 = time.perf_counter()
        response = client.post(url, files=files, data={"budget": str(budget)})
        wall += time.perf_counter() - t0
        response.raise_for_status()
        body = response.json()
        got = np.array([item["result"]["class_index"] for item in body["results"]])
        correct += int((got == labels[start:start + batch]).sum())
        cost += body["summary"]["mean_cost_fraction"] * len(got)
        inference_ms += body["timings_ms"]["inference"]
    n = len(blobs)
    return {"budget": budget, "accuracy": correct / n, "mean_cost": cost / n,
            "inference_ms_per_image": inference_ms / n, "images_per_s": n / wall}


async def concurrent_throughput(url: str, blobs: list[bytes], params: dict, concurrency: int) -> dict:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for blob in blobs:
        queue.put_nowait(blob)
    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            blob = queue.get_nowait()
            t0 = time.perf_counter()
            response = await client.post(url, files={"file": ("x.png", blob, "image/png")}, params=params)
            response.raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1000)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "images_per_s": len(blobs) / elapsed,
            "median_ms": statistics.median(latencies), "p90_ms": float(np.percentile(latencies, 90))}


def pick_budget(report: dict, tolerance: float = 0.003) -> float:
    """Smallest budget whose held-out accuracy is within ``tolerance`` of the full network."""
    curve = report["curve"]
    full_expected = curve[-1]["expected_accuracy"]  # budget 1.0: the full network
    return next(p["budget"] for p in curve if p["expected_accuracy"] >= full_expected - tolerance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--latency-images", type=int, default=500)
    parser.add_argument("--throughput-images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark.json"))
    args = parser.parse_args(argv)

    folder = args.repository / args.model
    report = json.loads((folder / "calibration_report.json").read_text())
    test = load_splits("fashion-mnist").test
    blobs = [encode_image(p) for p in tqdm(test.images, desc="encode test images", leave=False)]
    labels = test.labels
    budget = pick_budget(report)
    ours_url, plain_url = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{args.port + 1}"
    py = sys.executable
    ours = start([py, "-m", "exitserve.cli", "serve", "--model-repository", str(args.repository),
                  "--port", str(args.port), "--log-level", "warning"], ours_url,
                 env={"EXITSERVE_ONLINE_BUDGET": "false", "EXITSERVE_MAX_BATCH_SIZE": "64"})
    plain = start([py, "-m", "loadtest.plain_server", str(folder), "--port", str(args.port + 1)], plain_url)
    results: dict = {"model": args.model, "budget_within_0.3": budget, "cpu_count": os.cpu_count()}
    try:
        lat = blobs[: args.latency_images]
        for _ in range(2):  # warm-up passes, discarded
            sequential_latency(ours_url, lat[:50], {"budget": budget}, "warm-up")
            sequential_latency(plain_url, lat[:50], {}, "warm-up")
        results["latency_c1"] = {
            "exitserve_early_exit": sequential_latency(ours_url, lat, {"budget": budget}, "exitserve c=1"),
            "exitserve_early_exit_raw_body": sequential_latency(ours_url, lat, {"budget": budget},
                                                                "exitserve raw c=1", raw=True),
            "exitserve_full_depth": sequential_latency(ours_url, lat, {"budget": 1.0}, "exitserve full c=1"),
            "plain_fastapi_full_depth": sequential_latency(plain_url, lat, {}, "plain c=1"),
            "engine_in_process": engine_latency(folder, lat, budget),
            "full_model_session_in_process": full_model_latency(folder, lat),
        }
        with httpx.Client(timeout=120) as client:
            budgets = sorted({budget, 0.2, 0.35, 1.0})
            results["batch"] = [
                batch_pass(client, f"{ours_url}/classify/batch", blobs, labels, b, args.batch, f"batch b={b}")
                for b in budgets
            ]
        tp = blobs[: args.throughput_images]
        results["throughput_c16"] = {
            "exitserve_early_exit": asyncio.run(concurrent_throughput(f"{ours_url}/classify", tp,
                                                                      {"budget": budget}, 16)),
            "exitserve_full_depth": asyncio.run(concurrent_throughput(f"{ours_url}/classify", tp,
                                                                      {"budget": 1.0}, 16)),
            "plain_fastapi_full_depth": asyncio.run(concurrent_throughput(f"{plain_url}/classify", tp, {}, 16)),
        }
    finally:
        for proc in (ours, plain):
            proc.terminate()
            proc.wait(timeout=30)
    results["offline"] = offline_reference(report, [b["budget"] for b in results["batch"]],
                                           [b["mean_cost"] for b in results["batch"]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


def offline_reference(report: dict, budgets: list[float], costs: list[float]) -> list[dict]:
    """The calibration report's test accuracy at each budget (threshold policy), and the
    threshold policy's test accuracy at the batch's measured mean cost (interpolated)."""
    curve = sorted(report["curve"], key=lambda p: p["budget"])
    by_cost = sorted(((p["test"]["cost"], p["test"]["accuracy"]) for p in curve))
    out = []
    for budget, cost in zip(budgets, costs):
        point = max((p for p in curve if p["budget"] <= budget + 1e-9), key=lambda p: p["budget"])
        xs, ys = zip(*by_cost)
        out.append({"budget": budget, "threshold_test_accuracy": point["test"]["accuracy"],
                    "threshold_test_cost": point["test"]["cost"],
                    "threshold_accuracy_at_batch_cost": float(np.interp(cost, xs, np.maximum.accumulate(ys)))})
    return out


def markdown(r: dict) -> str:
    lat = r["latency_c1"]
    ours, raw, full, plain, engine, plain_engine = (
        lat["exitserve_early_exit"], lat["exitserve_early_exit_raw_body"], lat["exitserve_full_depth"],
        lat["plain_fastapi_full_depth"], lat["engine_in_process"], lat["full_model_session_in_process"])
    lines = [
        f"Model `{r['model']}`; budget within 0.3 pt of full depth (held-out): **{r['budget_within_0.3']:.3f}**",
        "",
        "| concurrency 1, /classify | median ms | p90 ms | server inference median ms | mean exit | mean cost |",
        "|---|---|---|---|---|---|",
        f"| exitserve, early exit (multipart) | {ours['median_ms']:.3f} | {ours['p90_ms']:.3f} | "
        f"{ours['server_inference_median_ms']:.3f} | {ours['mean_exit']:.2f} | {ours['mean_cost']:.3f} |",
        f"| exitserve, early exit (raw body) | {raw['median_ms']:.3f} | {raw['p90_ms']:.3f} | "
        f"{raw['server_inference_median_ms']:.3f} | {raw['mean_exit']:.2f} | {raw['mean_cost']:.3f} |",
        f"| exitserve, budget 1.0 (full depth, multipart) | {full['median_ms']:.3f} | {full['p90_ms']:.3f} | "
        f"{full['server_inference_median_ms']:.3f} | {full['mean_exit']:.2f} | {full['mean_cost']:.3f} |",
        f"| plain FastAPI + one ORT session (full depth, multipart) | {plain['median_ms']:.3f} | {plain['p90_ms']:.3f} "
        "| - | - | 1.000 |",
        f"| exitserve engine alone, in process (early exit) | {engine['median_ms']:.3f} | - | - | - | - |",
        f"| full_model.onnx session alone, in process | {plain_engine['median_ms']:.3f} | - | - | - | - |",
        "",
        f"HTTP overhead at c=1 (median minus the engine's own median): exitserve multipart "
        f"**{ours['median_ms'] - engine['median_ms']:.3f} ms**, raw body **{raw['median_ms'] - engine['median_ms']:.3f} ms**; "
        f"plain FastAPI **{plain['median_ms'] - plain_engine['median_ms']:.3f} ms**. "
        f"Early exit vs plain server median latency: **{ours['median_ms'] / plain['median_ms']:.2f}x**",
        "",
        "| /classify/batch, 10,000 test images | accuracy | mean cost | inference ms / image | images/s | offline (threshold policy) accuracy | threshold policy at the same cost |",
        "|---|---|---|---|---|---|---|",
    ]
    full_batch = next(b for b in r["batch"] if b["budget"] == 1.0)
    for b, off in zip(r["batch"], r["offline"]):
        lines.append(
            f"| budget {b['budget']:.3f} | {100 * b['accuracy']:.2f}% | {b['mean_cost']:.3f} | "
            f"{b['inference_ms_per_image']:.4f} ({b['inference_ms_per_image'] / full_batch['inference_ms_per_image']:.2f}x full) | "
            f"{b['images_per_s']:.0f} | {100 * off['threshold_test_accuracy']:.2f}% | "
            f"{100 * off['threshold_accuracy_at_batch_cost']:.2f}% |"
        )
    tp = r["throughput_c16"]
    lines += ["", "| concurrency 16, /classify | images/s | median ms | p90 ms |", "|---|---|---|---|"]
    for name, key in (("exitserve, early exit", "exitserve_early_exit"), ("exitserve, full depth", "exitserve_full_depth"),
                      ("plain FastAPI (full depth)", "plain_fastapi_full_depth")):
        t = tp[key]
        lines.append(f"| {name} | {t['images_per_s']:.0f} | {t['median_ms']:.2f} | {t['p90_ms']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
