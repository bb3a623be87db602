"""The GPU check kit runs on the CPU here, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from exitserve.models.data import load_splits

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "device" / "check.py"


def run_check(repository: Path, out: Path, provider: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CHECK), "--provider", provider, "--repository", str(repository), "--images", "48",
               "--min-seconds", "0.2", "--latency-repeats", "2", "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


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


def test_asking_for_cuda_where_it_does_not_load_fails_loudly(served_repository: Path, tmp_path: Path) -> None:
    """Not silently on the CPU: the providers check fails and says which stages."""
    done = run_check(served_repository, tmp_path / "check.json", "cuda", "--model", "msdnet_fmnist")
    report = json.loads((tmp_path / "check.json").read_text())
    if report["models"]["msdnet_fmnist"]["providers"]["per_stage"][0][0] == "CUDAExecutionProvider":
        return  # a machine with a working GPU: nothing to refuse
    assert done.returncode == 1 and not report["passed"]
    assert "did not load CUDAExecutionProvider" in report["models"]["msdnet_fmnist"]["providers"]["error"]
