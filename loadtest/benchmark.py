"""The side-by-side benchmark: exitserve (early exit) vs full depth vs a plain FastAPI server
vs LitServe, with the no-op route as the ceiling. One run, in three parts:

1. **Throughput and tail under wrk** (``loadtest.wrk_bench``): wrk at C = 1, 8 and 32
   against exitserve at the near-full budget, the default budget and budget 1.0, exitserve
   with two workers, the plain server, LitServe (when installed: the ``bench`` extra) and
   the no-op route, one server at a time; client and server CPU; ratios.
2. **Accuracy and latency with a Python client at concurrency 1**: every answer checked
   against the test labels (exitserve early exit, raw and multipart, budget 1.0, the plain
   server), and the engine's and ``full_model.onnx``'s own time in process.
3. **The batch path** (``/classify/batch``, all 10,000 test images per budget): accuracy,
   mean cost, engine time per image against full depth, images/s.

``--guard`` exits 1 when the default budget's C=32 throughput is under 2.5x the plain
server's, or when the engine time per image at budget 0.2 is over 0.3x full depth's.
Traffic goes only to 127.0.0.1 and is bounded in count and time.

    python -m exitserve.loadtest.benchmark --repository model_repository --model msdnet_fmnist
"""

from __future__ import annotations

import argparse
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

from exitserve.loadtest.images import encode_image
from exitserve.loadtest import wrk_bench
from exitserve.models.data import load_splits


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


def sequential_latency(url: str, blobs: list[bytes], labels: np.ndarray, params: dict, desc: str,
                       raw: bool = False) -> dict:
    """Concurrency 1: one request at a time; client-side wall time per request, and the
    accuracy of the answers against ``labels``."""
    client = KeepAliveClient(url)
    wall, server_inference, exits, costs, correct = [], [], [], [], 0
    try:
        for blob, label in tqdm(zip(blobs, labels, strict=True), total=len(blobs), desc=desc, leave=False):
            started = time.perf_counter()
            body = client.post_image("/classify", blob, params, raw)
            wall.append((time.perf_counter() - started) * 1000)
            correct += int(body["class_index"] == int(label))
            if "timings_ms" in body:
                server_inference.append(body["timings_ms"]["inference"])
                exits.append(body["exit"]["index"])
                costs.append(body["exit"]["cost_fraction"])
    finally:
        client.close()
    out = {"median_ms": statistics.median(wall), "p90_ms": float(np.percentile(wall, 90)),
           "p99_ms": float(np.percentile(wall, 99)), "requests": len(wall), "accuracy": correct / len(wall)}
    if server_inference:
        out |= {"server_inference_median_ms": statistics.median(server_inference),
                "mean_exit": float(np.mean(exits)), "mean_cost": float(np.mean(costs))}
    return out


def _median_inference_ms(blobs: list[bytes], spec, infer) -> dict:
    """Decode and normalize each image first, then time ``infer(image)`` alone."""
    from exitserve.server.preprocess import decode_image

    times = []
    for blob in blobs:
        image = spec.normalize(decode_image(blob, spec, 10**8)[None])
        started = time.perf_counter()
        infer(image)
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(times)}


def engine_latency(folder: Path, blobs: list[bytes], budget: float) -> dict:
    """The engine's own time for the same single images, in-process, no HTTP."""
    from exitserve.server.engine import ModelEngine

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


def pick_budget(report: dict, tolerance: float = 0.003) -> float:
    """Smallest budget whose held-out accuracy is within ``tolerance`` of the full network."""
    curve = report["curve"]
    full_expected = curve[-1]["expected_accuracy"]  # budget 1.0: the full network
    return next(p["budget"] for p in curve if p["expected_accuracy"] >= full_expected - tolerance)


GUARD_ENGINE_RATIO = 0.3  # engine time per image at budget 0.2, against full depth
GUARD_BUDGET = 0.2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    wrk_bench.add_arguments(parser)
    parser.add_argument("--latency-images", type=int, default=500, help="Python-client requests per row at C=1")
    parser.add_argument("--batch", type=int, default=256, help="images per /classify/batch request")
    parser.add_argument("--guard", action="store_true",
                        help=f"exit 1 when the C={wrk_bench.GUARD_CONCURRENCY} ratio to the plain server is under "
                             f"{wrk_bench.GUARD_RATIO}x or the engine time at budget {GUARD_BUDGET} is over "
                             f"{GUARD_ENGINE_RATIO}x full depth")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark.json"))
    args = parser.parse_args(argv)
    wrk_bench.parse_concurrency(parser, args)

    results: dict = {"model": args.model, "cpu_count": os.cpu_count()}
    results["wrk"] = wrk_bench.run(args)
    results |= python_client_part(args)
    verdicts = guard(results)
    results["guard"] = verdicts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    wrk_report = results["wrk"]
    print("## Throughput and tail under wrk\n")
    print(wrk_bench.markdown(wrk_report["results"], wrk_report["ratios"], wrk_report["notes"], args))
    print("\n## Python client and batch path\n")
    print(markdown(results))
    print("\n" + "\n".join(v["verdict"] for v in verdicts))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    if args.guard and not all(v["passed"] for v in verdicts):
        print("--guard: FAILED", file=sys.stderr)
        return 1
    return 0


def python_client_part(args: argparse.Namespace) -> dict:
    """Parts 2 and 3: both servers up at once, the Python client, accuracy checked."""
    folder = args.repository / args.model
    report = json.loads((folder / "calibration_report.json").read_text())
    test = load_splits("fashion-mnist").test
    blobs = [encode_image(p) for p in tqdm(test.images, desc="encode test images", leave=False)]
    labels = test.labels
    budget = pick_budget(report)
    port = args.port + 20  # clear of the wrk part's ports
    ours_url, plain_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    py = sys.executable
    ours = start([py, "-m", "exitserve.cli", "serve", "--model-repository", str(args.repository),
                  "--port", str(port), "--log-level", "warning"], ours_url,
                 env={"EXITSERVE_ONLINE_BUDGET": "false", "EXITSERVE_MAX_BATCH_SIZE": "64",
                      "EXITSERVE_DEFAULT_MODEL": args.model})
    plain = start([py, "-m", "exitserve.loadtest.plain_server", str(folder), "--port", str(port + 1)], plain_url)
    results: dict = {"budget_within_0.3": budget}
    try:
        lat, lat_labels = blobs[: args.latency_images], labels[: args.latency_images]
        q = {"model": args.model}
        for _ in range(2):  # warm-up passes, discarded
            sequential_latency(ours_url, lat[:50], lat_labels[:50], {**q, "budget": budget}, "warm-up")
            sequential_latency(plain_url, lat[:50], lat_labels[:50], {}, "warm-up")
        results["latency_c1"] = {
            "exitserve_early_exit": sequential_latency(ours_url, lat, lat_labels, {**q, "budget": budget},
                                                       "exitserve c=1"),
            "exitserve_early_exit_raw_body": sequential_latency(ours_url, lat, lat_labels, {**q, "budget": budget},
                                                                "exitserve raw c=1", raw=True),
            "exitserve_full_depth": sequential_latency(ours_url, lat, lat_labels, {**q, "budget": 1.0},
                                                       "exitserve full c=1"),
            "plain_fastapi_full_depth": sequential_latency(plain_url, lat, lat_labels, {}, "plain c=1"),
            "engine_in_process": engine_latency(folder, lat, budget),
            "full_model_session_in_process": full_model_latency(folder, lat),
        }
        with httpx.Client(timeout=120) as client:
            budgets = sorted({budget, GUARD_BUDGET, 0.35, 1.0})
            results["batch"] = [
                batch_pass(client, f"{ours_url}/classify/batch?model={args.model}", blobs, labels, b, args.batch,
                           f"batch b={b}")
                for b in budgets
            ]
    finally:
        for proc in (ours, plain):
            proc.terminate()
            proc.wait(timeout=30)
    results["offline"] = offline_reference(report, [b["budget"] for b in results["batch"]],
                                           [b["mean_cost"] for b in results["batch"]])
    return results


def guard(results: dict) -> list[dict]:
    """The two guarded ratios: C=32 throughput against the plain server, and the batch
    path's engine time at budget 0.2 against full depth."""
    passed, verdict = wrk_bench.guard(results["wrk"]["results"])
    out = [{"passed": passed, "verdict": verdict}]
    by_budget = {b["budget"]: b for b in results["batch"]}
    ratio = by_budget[GUARD_BUDGET]["inference_ms_per_image"] / by_budget[1.0]["inference_ms_per_image"]
    out.append({"passed": ratio <= GUARD_ENGINE_RATIO,
                "verdict": f"guard: engine time per image at budget {GUARD_BUDGET}: {ratio:.3f}x full depth "
                           f"(required: <= {GUARD_ENGINE_RATIO}x)"})
    return out


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
        f"| concurrency 1, /classify, {ours['requests']} test images (Python client) | accuracy | median ms | p90 ms "
        "| p99 ms | server inference median ms | mean exit | mean cost |",
        "|---|---|---|---|---|---|---|---|",
        f"| exitserve, early exit (multipart) | {100 * ours['accuracy']:.2f}% | {ours['median_ms']:.3f} | "
        f"{ours['p90_ms']:.3f} | {ours['p99_ms']:.3f} | "
        f"{ours['server_inference_median_ms']:.3f} | {ours['mean_exit']:.2f} | {ours['mean_cost']:.3f} |",
        f"| exitserve, early exit (raw body) | {100 * raw['accuracy']:.2f}% | {raw['median_ms']:.3f} | "
        f"{raw['p90_ms']:.3f} | {raw['p99_ms']:.3f} | "
        f"{raw['server_inference_median_ms']:.3f} | {raw['mean_exit']:.2f} | {raw['mean_cost']:.3f} |",
        f"| exitserve, budget 1.0 (full depth, multipart) | {100 * full['accuracy']:.2f}% | {full['median_ms']:.3f} | "
        f"{full['p90_ms']:.3f} | {full['p99_ms']:.3f} | "
        f"{full['server_inference_median_ms']:.3f} | {full['mean_exit']:.2f} | {full['mean_cost']:.3f} |",
        f"| plain FastAPI + one ORT session (full depth, multipart) | {100 * plain['accuracy']:.2f}% | "
        f"{plain['median_ms']:.3f} | {plain['p90_ms']:.3f} | {plain['p99_ms']:.3f} | - | - | 1.000 |",
        f"| exitserve engine alone, in process (early exit) | - | {engine['median_ms']:.3f} | - | - | - | - | - |",
        f"| full_model.onnx session alone, in process | - | {plain_engine['median_ms']:.3f} | - | - | - | - | - |",
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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
