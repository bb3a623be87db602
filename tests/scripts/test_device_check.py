"""The GPU check kit runs on the CPU here, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from exitserve.models.data import load_splits
from exitserve.repository.runtime import CUDA

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "device" / "check.py"


def run_check(repository: Path, out: Path, provider: str, *extra: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CHECK), "--provider", provider, "--repository", str(repository), "--images", "48",
               "--min-seconds", "0.2", "--latency-repeats", "2", "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})


def test_cpu_run_passes_and_reports_every_check(served_repository: Path, tmp_path: Path) -> None:
    test = load_splits("fashion-mnist").test
    images = tmp_path / "images.npz"  # the kit's file format, as the GPU machine reads it
    np.savez_compressed(images, images=test.images[:64], labels=test.labels[:64])
    done = run_check(served_repository, tmp_path / "check.json", "cpu", "--images-file", str(images))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] and report["images"] == 48
    model = report["models"]["msdnet_fmnist"]
    stages = len(model["providers"]["per_stage"])
    assert stages == 5 and model["providers"]["passed"]
    assert all(e["max_abs_diff"] == 0.0 and e["argmax_agreement"] == 1.0 for e in model["agreement_with_cpu"]["exits"])
    assert [s["carried_devices"] for s in model["io_binding"]["steps"]] == [["cpu"] * 3, ["cpu"] * 3]
    assert [s["probs_rows"] for s in model["io_binding"]["steps"]] == [8, 3]
    assert len(model["stage_latency_ms"]["provider"]) == stages
    engine = model["engine"]["provider"]
    assert engine["budget_1.0"]["mean_cost"] == 1.0 and engine["budget_0.2"]["mean_cost"] <= 0.2 + 1e-9
    assert engine["time_ratio"] > 0 and engine["budget_0.2"]["images_per_s"] > 0


def gpu_present() -> bool:
    """A CUDA GPU this machine's driver lists (``nvidia-smi -L``); not whether ONNX Runtime can use it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def test_asking_for_cuda_where_it_does_not_load_fails_loudly(served_repository: Path, tmp_path: Path) -> None:
    """Not silently on the CPU: the providers check fails and says which stages. Any GPU is
    hidden from the check (CUDA_VISIBLE_DEVICES empty), so this runs on a GPU machine too."""
    out = tmp_path / "check.json"
    done = run_check(served_repository, out, "cuda", "--model", "msdnet_fmnist", env={"CUDA_VISIBLE_DEVICES": ""})
    report = json.loads(out.read_text())
    model = report["models"]["msdnet_fmnist"]
    if model["providers"]["per_stage"][0][0] == CUDA:
        pytest.skip("CUDA loads here even with every GPU hidden: there is no failure to refuse")
    assert done.returncode == 1 and not report["passed"], done.stdout + done.stderr
    assert not model["passed"] and not model["providers"]["passed"]
    assert "did not load CUDAExecutionProvider" in model["providers"]["error"]
    assert "agreement_with_cpu" not in model  # nothing measured under the wrong name


@pytest.mark.gpu
def test_on_a_gpu_every_check_passes_on_cuda(served_repository: Path, tmp_path: Path) -> None:
    """Where a GPU is present the kit's CUDA run must pass: every stage on CUDA, the CPU's
    answers, carried tensors on the device, and the engine running there."""
    if not gpu_present():
        pytest.skip("no CUDA GPU on this machine (nvidia-smi lists none)")
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (not onnxruntime-gpu)")
    out = tmp_path / "check.json"
    done = run_check(served_repository, out, "cuda", "--model", "msdnet_fmnist")
    report = json.loads(out.read_text())
    model = report["models"]["msdnet_fmnist"]
    assert done.returncode == 0 and report["passed"] and model["passed"], \
        done.stdout[-2000:] + done.stderr[-2000:] + json.dumps(model)[:2000]
    assert [providers[0] for providers in model["providers"]["per_stage"]] == [CUDA] * 5
    agreement = model["agreement_with_cpu"]
    assert all(e["max_abs_diff"] <= agreement["tolerance"] for e in agreement["exits"])
    assert all(e["argmax_agreement"] >= 0.97 for e in agreement["exits"])  # rounding may flip a near tie, no more
    assert [s["carried_devices"] for s in model["io_binding"]["steps"]] == [["cuda"] * 3, ["cuda"] * 3]
    assert [s["probs_rows"] for s in model["io_binding"]["steps"]] == [8, 3]
    engine = model["engine"]
    assert engine["provider"]["provider"] == CUDA and engine["provider"]["io_binding"] is True
    assert engine["provider"]["budget_1.0"]["mean_cost"] == 1.0
    assert engine["provider"]["budget_0.2"]["mean_cost"] <= 0.2 + 1e-9
    assert engine["cpu"]["provider"] == "CPUExecutionProvider"
