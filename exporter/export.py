"""``exitserve export``: checkpoint -> model repository folder.

Writes into a temporary sibling folder and renames it into place only after every ONNX
file passed ``onnx.checker`` and the parity gate, so a failed export never leaves a
half-written repository where the server would find it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

import exitserve
from exitserve.errors import ExitserveError
from exitserve.repository.format import (
    DEFAULT_OPSET,
    InputSpec,
    Manifest,
    SourceSpec,
    StageSpec,
    load_manifest,
    write_json,
)
from exitserve.repository.preprocessing import normalize
from exitserve.repository.runtime import StagedModel
from exitserve.exporter.latency import measure_stage_latency
from exitserve.exporter.onnx_export import ExportedStage, export_full_model, export_stages
from exitserve.exporter.parity import ParityError, ParityReport, check_parity, require_parity
from exitserve.models.checkpoint import Checkpoint, file_sha256, load_checkpoint, model_from_checkpoint
from exitserve.models.cost import ExitCost, exit_costs
from exitserve.models.data import load_splits
from exitserve.models.early_exit import EarlyExitModel

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2


class ExportError(ExitserveError, RuntimeError):
    """The export cannot proceed (bad output location, unusable model)."""


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        work.chmod(0o755)
        return work
    except OSError as exc:
        raise ExportError(f"cannot write to {out.parent}: {exc}") from exc


def export_repository(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    data_dir: str | None = None,
    parity_images: int = 512,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Manifest, ParityReport]:
    out = Path(out)
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    if not isinstance(model, EarlyExitModel):
        raise ExportError(f"{checkpoint.model} does not implement the early-exit interface")
    prep, dataset = checkpoint.preprocessing, checkpoint.dataset_name
    shape = (prep.channels, prep.size, prep.size)
    costs = _exit_costs(model, shape, checkpoint)
    work = _prepare_out(out, overwrite)
    steps = tqdm(total=4, desc=f"export {out.name}", unit="step", disable=not progress)
    try:
        steps.set_postfix_str("tracing stages")
        exported = export_stages(model, shape, work, opset=opset, fp16=fp16)
        full_file = export_full_model(model, shape, work, opset)
        steps.update()

        steps.set_postfix_str("parity")
        test = load_splits(dataset, data_dir, prep.size).test
        # float32 whatever the precision: PyTorch computes the reference logits from these
        images = normalize(test.images[:parity_images], prep.mean, prep.std, np.float32)
        manifest = _manifest(out.name, checkpoint, Path(checkpoint_path), exported, costs, opset, fp16)
        staged = StagedModel(work, manifest, provider="auto" if fp16 else "cpu")
        report = check_parity(model, staged, images, FP16_TOLERANCE if fp16 else FP32_TOLERANCE,
                              "fp16" if fp16 else "fp32")
        require_parity(report)
        full_diff = _full_model_parity(work / full_file, model, images)
        if full_diff > FP32_TOLERANCE:
            raise ParityError(f"{full_file} disagrees with PyTorch's last exit by {full_diff:.3g}")
        manifest.parity = {**report.to_dict(), "full_model_max_abs_diff": full_diff}
        manifest.full_model = full_file
        steps.update()

        steps.set_postfix_str("latency")
        sample = images[0].astype(np.float16) if fp16 else images[0]
        for spec, latency in zip(manifest.stages, measure_stage_latency(StagedModel(work, manifest), sample)):
            spec.latency = latency
        steps.update()

        steps.set_postfix_str("writing")
        write_json(work / "manifest.json", manifest)
        load_manifest(work)  # what we wrote must read back
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        steps.update()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        steps.close()
    return manifest, report


def _full_model_parity(path: Path, model, images: np.ndarray) -> float:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": images})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(images))[-1].numpy()
    return float(np.abs(got - want).max())


def _exit_costs(model: EarlyExitModel, shape: tuple[int, int, int], checkpoint: Checkpoint) -> list[ExitCost]:
    """Every exit's cost, measured on the model being exported (not read back from the
    checkpoint, which recorded them when it was trained)."""
    costs = exit_costs(model, shape)
    recorded = [e.name for e in checkpoint.exits]
    if [c.name for c in costs] != recorded:
        raise ExportError(f"the model has exits {[c.name for c in costs]} but the checkpoint records {recorded}")
    return costs


def _manifest(
    name: str,
    checkpoint: Checkpoint,
    checkpoint_path: Path,
    exported: list[ExportedStage],
    costs: list[ExitCost],
    opset: int,
    fp16: bool,
) -> Manifest:
    total = costs[-1].flops
    stages = [
        StageSpec(
            index=e.index, file=e.file, carried_inputs=e.carried_inputs, keep_input=e.keep_input,
            carried_outputs=e.carried_outputs, exit_name=c.name, flops=c.stage_flops, cumulative_flops=c.flops,
            params=c.stage_params, cost_fraction=c.flops / total, test_accuracy=x.test_accuracy,
        )
        for e, c, x in zip(exported, costs, checkpoint.exits, strict=True)
    ]
    prep = checkpoint.preprocessing
    return Manifest(
        name=name,
        exporter_version=exitserve.__version__,
        opset=opset,
        precision="fp16" if fp16 else "fp32",
        input=InputSpec(channels=prep.channels, size=prep.size, mean=prep.mean, std=prep.std,
                        dtype="float16" if fp16 else "float32"),
        labels=list(checkpoint.labels),
        stages=stages,
        source=SourceSpec(checkpoint=str(checkpoint_path), sha256=file_sha256(checkpoint_path),
                          model=checkpoint.model, config=checkpoint.config, dataset=checkpoint.dataset_name),
    )
