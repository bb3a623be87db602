"""GPU check kit: does the CUDA path really run, agree with the CPU, and keep carried
tensors on the device? Writes everything it measures to one JSON file.

On the GPU machine (see docs/gpu.md):   python3 scripts/device/check.py --provider cuda
Here, on the CPU, as CI does:            python scripts/device/check.py --provider cpu --images 64

For each model folder of the repository it checks:

* every stage session runs on the asked provider (``session.get_providers()``): CUDA asked
  but CPU loaded is a failure, never a silent fallback;
* per exit, the provider's probabilities against CPU ONNX Runtime (no binding) on the same
  images: max |difference| and argmax agreement;
* with IO binding, where each carried tensor lives (``OrtValue.device_name()``) after stage
  0 and after a compacting stage 1, and that only the probabilities reach the host;
* per-stage latency at batch 1 and 64 on the provider and on the CPU;
* the engine's images/s at budgets 0.2 and 1.0 and their time ratio against their cost
  ratio (does wall time follow the FLOPs?), on the provider and on the CPU.

Needs numpy, onnxruntime(-gpu) and pydantic only: no PyTorch, no HTTP stack.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a bare checkout

import onnxruntime as ort  # noqa: E402

from exitserve.repository.format import load_manifest  # noqa: E402
from exitserve.repository.runtime import CPU, CUDA, StagedModel  # noqa: E402
from exitserve.exporter.latency import measure_stage_latency  # noqa: E402
from exitserve.server.engine import ModelEngine  # noqa: E402

PROVIDERS = {"cuda": CUDA, "cpu": CPU}
PROBS_TOLERANCE = 1e-3  # fp32 kernels differ between providers by rounding, not by answers
BATCH = 64
ENGINE_BUDGETS = (0.2, 1.0)


def device_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        names = ""
    return names or f"{platform.processor() or platform.machine()} CPU ({platform.node()})"


def load_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x C test images and labels: from the kit's .npz on the GPU
    machine, from the dataset loader where the dataset is installed."""
    if args.images_file:
        data = np.load(args.images_file)
        return data["images"][: args.images], data["labels"][: args.images]
    from exitserve.models.data import load_splits

    test = load_splits("fashion-mnist").test
    return test.images[: args.images], test.labels[: args.images]


def exit_probs(staged: StagedModel, images: np.ndarray) -> list[np.ndarray]:
    chunks = [[out.probs for _, _, out in staged.iter_stages(images[i:i + BATCH])] for i in range(0, len(images), BATCH)]
    return [np.concatenate(per_exit) for per_exit in zip(*chunks)]


def provider_report(staged: StagedModel, expected: str) -> dict[str, Any]:
    per_stage = [s.get_providers() for s in staged.sessions]
    wrong = [k for k, p in enumerate(per_stage) if p[0] != expected]
    return {"expected": expected, "per_stage": per_stage, "passed": not wrong,
            "error": f"stages {wrong} did not load {expected}" if wrong else None}


def agreement(candidate: StagedModel, reference: StagedModel, images: np.ndarray, labels: np.ndarray) -> dict:
    got, want = exit_probs(candidate, images), exit_probs(reference, images)
    exits = []
    for k, (g, w) in enumerate(zip(got, want)):
        exits.append({"exit": k, "max_abs_diff": float(np.abs(g.astype(np.float32) - w).max()),
                      "argmax_agreement": float((g.argmax(1) == w.argmax(1)).mean()),
                      "accuracy": float((g.argmax(1) == labels).mean())})
    passed = all(e["max_abs_diff"] <= PROBS_TOLERANCE for e in exits)
    return {"images": len(images), "tolerance": PROBS_TOLERANCE, "exits": exits, "passed": passed}


def binding_report(staged: StagedModel, images: np.ndarray, expected_device: str) -> dict:
    """Where the carried tensors live after stage 0 and after a compacting stage 1."""
    if not staged.use_binding:
        return {"passed": False, "error": "IO binding is off"}
    first = staged.run_stage(0, [images[:8]])
    steps = [("stage 0", first)]
    if staged.num_stages > 1:
        steps.append(("stage 1, 3 of 8 kept", staged.run_stage(1, first.carried, np.array([0, 2, 5]))))
    seen = []
    for name, out in steps:
        devices = [v.device_name() if isinstance(v, ort.OrtValue) else "host numpy" for v in out.carried]
        seen.append({"after": name, "carried_devices": devices, "probs_on_host": isinstance(out.probs, np.ndarray),
                     "probs_rows": int(out.probs.shape[0])})
    passed = all(all(d == expected_device for d in s["carried_devices"]) and s["probs_on_host"] for s in seen)
    return {"expected_device": expected_device, "steps": seen, "passed": passed}


def engine_throughput(folder: Path, provider: str, images: np.ndarray, min_seconds: float) -> dict:
    engine = ModelEngine.load(folder, default_budget=0.25, provider=provider, online_budget=False)
    engine.warm_up()
    normalized = engine.manifest.input.normalize(images)
    out: dict[str, Any] = {"provider": engine.runtime.provider, "io_binding": engine.runtime.use_binding}
    for budget in ENGINE_BUDGETS:
        thresholds = engine.policy.thresholds_for(budget)
        done, costs, started = 0, [], time.perf_counter()
        while done == 0 or time.perf_counter() - started < min_seconds:
            for i in range(0, len(normalized), BATCH):
                batch = normalized[i:i + BATCH]
                results = engine.run_thresholds(batch, np.tile(thresholds, (len(batch), 1))).results
                costs += [r.cost_fraction for r in results]
                done += len(batch)
        elapsed = time.perf_counter() - started
        out[f"budget_{budget}"] = {"images_per_s": done / elapsed, "ms_per_image": 1000 * elapsed / done,
                                   "mean_cost": float(np.mean(costs))}
    low, full = (out[f"budget_{b}"] for b in ENGINE_BUDGETS)
    out["time_ratio"] = low["ms_per_image"] / full["ms_per_image"]
    out["cost_ratio"] = low["mean_cost"] / full["mean_cost"]
    return out


def check_model(folder: Path, provider: str, images: np.ndarray, labels: np.ndarray, args) -> dict:
    manifest = load_manifest(folder)
    expected = PROVIDERS[provider]
    candidate = StagedModel(folder, manifest, provider, io_binding="on")
    reference = StagedModel(folder, manifest, "cpu", io_binding="off")
    normalized = manifest.input.normalize(images)
    report: dict[str, Any] = {"providers": provider_report(candidate, expected)}
    if not report["providers"]["passed"]:  # what follows would measure the fallback under the wrong name
        return {**report, "passed": False}
    report["agreement_with_cpu"] = agreement(candidate, reference, normalized, labels)
    report["io_binding"] = binding_report(candidate, normalized, "cuda" if provider == "cuda" else "cpu")
    latency = {}
    for name, staged in (("provider", candidate), ("cpu", reference)):
        specs = measure_stage_latency(staged, normalized[0], repeats=args.latency_repeats)
        latency[name] = [{"stage": k, "batch_1_ms": s.batch_1_ms, "batch_64_ms": s.batch_64_ms}
                         for k, s in enumerate(specs)]
    report["stage_latency_ms"] = latency
    report["engine"] = {"provider": engine_throughput(folder, provider, images, args.min_seconds)}
    if provider != "cpu":
        report["engine"]["cpu"] = engine_throughput(folder, "cpu", images, args.min_seconds)
    report["passed"] = all(report[k]["passed"] for k in ("providers", "agreement_with_cpu", "io_binding"))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--repository", type=Path, default=ROOT / ".device/kit/repository")
    parser.add_argument("--model", action="append", help="model folder name (repeatable; default: every one)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--images-file", type=Path, default=None, help=".npz with images and labels (the kit's)")
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="engine timing per budget, at least")
    parser.add_argument("--out", type=Path, default=Path("runs/device_check.json"))
    args = parser.parse_args(argv)

    if args.provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* Python packages, where that is how they are installed
    folders = sorted(p for p in args.repository.iterdir() if (p / "manifest.json").is_file())
    if args.model:
        folders = [args.repository / name for name in args.model]
    images, labels = load_images(args)
    result: dict[str, Any] = {
        "device": device_name(), "provider": args.provider, "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(), "python": platform.python_version(),
        "images": len(images), "models": {},
    }
    for folder in folders:
        print(f"checking {folder.name} on {args.provider} ...", flush=True)
        try:
            result["models"][folder.name] = check_model(folder, args.provider, images, labels, args)
        except Exception as exc:  # report and go on: the JSON must say what broke, and where
            result["models"][folder.name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        print(f"  passed: {result['models'][folder.name]['passed']}", flush=True)
    result["passed"] = bool(folders) and all(m["passed"] for m in result["models"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}: passed={result['passed']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
