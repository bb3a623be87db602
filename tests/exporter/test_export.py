import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exitserve.cli import main as cli
from exitserve.repository.format import RepositoryError, load_manifest
from exitserve.repository.runtime import StagedModel
from exitserve.exporter.export import ExportError, export_repository
from exitserve.exporter.parity import ParityError, check_parity, require_parity
from exitserve.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from exitserve.models.cost import exit_costs
from exitserve.models.data import load_splits


def test_manifest_schema_and_files(small_repository: Path, small_checkpoint: Path) -> None:
    manifest = load_manifest(small_repository)
    raw = json.loads((small_repository / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["opset"] >= 17
    assert raw["input"]["channels"] == 1 and raw["input"]["size"] == 28 and raw["input"]["layout"] == "NCHW"
    assert len(raw["input"]["mean"]) == 1 and raw["labels"][9] == "Ankle boot"
    assert manifest.source.sha256 and manifest.source.model == "msdnet"
    assert [s.file for s in manifest.stages] == ["stage_00.onnx", "stage_01.onnx", "stage_02.onnx"]
    assert manifest.stages[0].keep_input is None and all(s.keep_input == "keep" for s in manifest.stages[1:])
    assert manifest.stages[-1].carried_outputs == [] and manifest.stages[-1].cost_fraction == 1.0
    costs = manifest.cost_fractions()
    assert costs == sorted(costs)
    for stage in manifest.stages:
        assert stage.latency.batch_1_ms > 0 and stage.latency.batch_64_ms > 0
        assert stage.latency.provider == "CPUExecutionProvider"
        assert stage.flops > 0 and stage.params > 0
        model = onnx.load(str(small_repository / stage.file))
        onnx.checker.check_model(model)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert raw["parity"]["passed"] and raw["parity"]["images"] == 512
    assert not [p for p in small_repository.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_manifest_costs_are_measured_on_the_model(
    small_repository: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    manifest = load_manifest(small_repository)
    checkpoint = load_checkpoint(small_checkpoint)
    costs = exit_costs(model_from_checkpoint(checkpoint), (1, 28, 28))
    assert [(s.exit_name, s.flops, s.cumulative_flops, s.params) for s in manifest.stages] == [
        (c.name, c.stage_flops, c.flops, c.stage_params) for c in costs]
    assert [s.test_accuracy for s in manifest.stages] == [e.test_accuracy for e in checkpoint.exits]
    checkpoint.exits = [  # costs recorded by an older cost counter: not what the manifest says
        replace(e, stage_flops=2 * e.stage_flops, flops=3 * e.flops, stage_params=e.stage_params + 1)
        for e in checkpoint.exits]
    save_checkpoint(tmp_path / "stale.pt", checkpoint)
    stale, _ = export_repository(tmp_path / "stale.pt", tmp_path / "stale", parity_images=16, progress=False)
    assert [s.model_dump(exclude={"latency"}) for s in stale.stages] == [
        s.model_dump(exclude={"latency"}) for s in manifest.stages]


def test_compaction_in_graph_matches_full_forward(small_repository: Path, small_checkpoint: Path) -> None:
    manifest = load_manifest(small_repository)
    model = model_from_checkpoint(load_checkpoint(small_checkpoint))
    staged = StagedModel(small_repository, manifest, provider="cpu")
    test = load_splits("fashion-mnist").test
    images = manifest.input.normalize(test.images[:40])
    with torch.no_grad():
        full = [t.numpy() for t in model(torch.from_numpy(images))]
    rng = np.random.default_rng(0)
    alive = np.arange(40)  # original index of every row still running
    carried: list = [images]
    for k in range(manifest.num_exits):
        keep = None
        if k > 0:  # arbitrary, unsorted subset of the rows still running
            keep = np.sort(rng.choice(len(alive), size=max(1, len(alive) * 2 // 3), replace=False))[::-1].copy()
            alive = alive[keep]
        out = staged.run_stage(k, carried, keep, want_logits=True)
        np.testing.assert_allclose(out.logits, full[k][alive], atol=1e-4, rtol=0)
        carried = out.carried


def test_dynamic_batch_sizes(small_repository: Path) -> None:
    manifest = load_manifest(small_repository)
    staged = StagedModel(small_repository, manifest, provider="cpu")
    for batch in (1, 7):
        carried: list = [np.zeros((batch, 1, 28, 28), np.float32)]
        for k in range(manifest.num_exits):
            out = staged.run_stage(k, carried)
            assert out.probs.shape == (batch, 10)
            np.testing.assert_allclose(out.probs.sum(1), 1.0, atol=1e-5)
            carried = out.carried


def test_parity_gate_reports_stage_and_difference(small_repository: Path, small_checkpoint: Path) -> None:
    manifest = load_manifest(small_repository)
    model = model_from_checkpoint(load_checkpoint(small_checkpoint))
    images = manifest.input.normalize(load_splits("fashion-mnist").test.images[:64])
    staged = StagedModel(small_repository, manifest, provider="cpu")
    assert check_parity(model, staged, images, 1e-4).passed
    with torch.no_grad():  # the exported graphs no longer match this model's last exit
        model.classifier[2].linear.bias.add_(0.5)
    report = check_parity(model, staged, images, 1e-4)
    assert not report.passed
    with pytest.raises(ParityError, match=r"stage 2 \(fp32\).*max \|logit difference\| 0\.5"):
        require_parity(report)


def test_export_refuses_existing_output_and_bad_inputs(small_checkpoint: Path, tmp_path: Path) -> None:
    existing = tmp_path / "taken"
    existing.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_repository(small_checkpoint, existing, progress=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot write"):
        export_repository(small_checkpoint, blocker / "repo", progress=False)


def test_export_cli_errors_are_clear(small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    checkpoint = load_checkpoint(small_checkpoint)
    checkpoint.model = "no_such_model"
    save_checkpoint(tmp_path / "unknown.pt", checkpoint)
    assert cli(["export", "--checkpoint", str(tmp_path / "unknown.pt"), "--out", str(tmp_path / "r")]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere; the file-as-parent case above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli(["export", "--checkpoint", str(small_checkpoint), "--out", str(locked / "r")]) == 2


def test_broken_repository_is_reported(small_repository: Path, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="manifest.json is missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(RepositoryError, match="validation error"):
        load_manifest(tmp_path)
    manifest = json.loads((small_repository / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match="stage file stage_00.onnx is missing"):
        load_manifest(tmp_path)
