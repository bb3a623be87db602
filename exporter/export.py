"""``exitserve export``: a multi-exit model -> model repository folder.

Three ways in, one way out. ``export_repository`` takes a checkpoint of a registered family
(``--checkpoint``); ``export_factory`` a user's ``package.module:function`` returning an
``EarlyExitModel`` (``--model``); ``export_model`` the model object itself (the Python API,
``exitserve.export_model``). Each resolves the model, its metadata (input, normalisation,
labels) and where it came from, and hands them to ``_write_repository``, the one export: cost
measurement (``models.cost``), per-stage ONNX, the parity gate, latency, atomic write.

It writes into a temporary sibling folder and renames it into place only after every ONNX
file passed ``onnx.checker`` and the parity gate, so a failed export never leaves a
half-written repository where the server would find it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import exitserve
from exitserve.errors import ConfigurationError, ExitserveError
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
from exitserve.models.checkpoint import (
    file_sha256,
    load_checkpoint,
    load_weights,
    load_weights_into,
    model_from_checkpoint,
)
from exitserve.models.cost import ExitCost, exit_costs
from exitserve.models.data import DataSource, ImageDataset, resolve_data
from exitserve.models.early_exit import EarlyExitModel, check_stages
from exitserve.models.metadata import DEFAULT_FIT, ModelMetadata, ResolvedMetadata
from exitserve.repository.preprocessing import Geometry
from exitserve.models.user_code import import_object

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2
RANDOM_PARITY_SEED = 0


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


# ----------------------------------------------------------------------------- three ways in


def export_repository(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    parity_images: int = 512,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Manifest, ParityReport]:
    """A checkpoint of a registered family (``exitserve export --checkpoint``): it carries
    its metadata; ``data`` may only name the dataset it records (with its folder)."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    if not isinstance(model, EarlyExitModel):
        raise ExportError(f"{checkpoint.model} does not implement the early-exit interface")
    source = resolve_data(data, data_dir, default=checkpoint.dataset_name)
    if source.name != checkpoint.dataset_name:
        raise ConfigurationError(f"--data {data} conflicts with the checkpoint's dataset {checkpoint.dataset_name}")
    prep = checkpoint.preprocessing
    metadata = ResolvedMetadata(prep.size, prep.channels, list(prep.mean), list(prep.std), list(checkpoint.labels))
    spec = SourceSpec(checkpoint=str(checkpoint_path), sha256=file_sha256(checkpoint_path), model=checkpoint.model,
                      config=checkpoint.config, dataset=checkpoint.dataset_name)
    return _write_repository(
        model, Path(out), metadata, spec, source, parity_images=parity_images, fp16=fp16, opset=opset,
        overwrite=overwrite, progress=progress, expected_exits=[e.name for e in checkpoint.exits],
        test_accuracies=[e.test_accuracy for e in checkpoint.exits],
    )


def export_factory(
    factory: str,
    out: str | Path,
    *,
    weights: str | Path | None = None,
    model_config: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[Manifest, ParityReport]:
    """A user's ``package.module:function`` (``exitserve export --model``), imported with the
    working directory on ``sys.path`` and called with ``model_config``; ``weights`` (a state
    dict file) is loaded into what it returns. ``options`` as for :func:`export_model`."""
    model = import_object(factory, "--model")(**(model_config or {}))
    if not isinstance(model, EarlyExitModel):
        kind = type(model).__name__
        raise ExportError(
            f"--model {factory} returns a {kind}, not an exitserve.EarlyExitModel: for a plain module with exit "
            "heads return exitserve.MultiExit(module, exits={'submodule': head, ...}); to add exits to a "
            "trained single-exit classifier, use `exitserve retrofit`")
    if weights is not None:
        load_weights_into(model, load_weights(weights), weights)
    source = SourceSpec(kind="factory", model=factory, config=dict(model_config or {}),
                        checkpoint=str(weights) if weights is not None else None,
                        sha256=file_sha256(weights) if weights is not None else None)
    return export_model(model, out, source=source, **options)


def export_model(
    model: EarlyExitModel,
    out: str | Path,
    *,
    input_size: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    fit: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    parity_images: int = 512,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: bool = True,
    source: SourceSpec | None = None,
) -> tuple[Manifest, ParityReport]:
    """Export a multi-exit model object to a model repository folder ``out``.

    ``model`` is an :class:`exitserve.EarlyExitModel`: a subclass with its own ``stages()``
    (no registration needed), or :class:`exitserve.MultiExit` for a plain module with exit
    heads, whose stages torch.fx cuts. Input size, channels, normalisation (``mean``,
    ``std``: per channel, of pixels scaled to [0, 1]) and class ``labels`` come from these
    arguments or the model's ``exitserve_metadata``; a value given in both must agree. A
    dataset (``data``: ``fashion-mnist``, ``cifar10:PATH``, ``image-folder:PATH``, ...) fills
    size, channels and labels it decides, gives the parity gate real images (the first
    ``parity_images`` of its test split; without one, seeded random pixels) and is what
    ``exitserve calibrate`` uses unless told otherwise. Returns the manifest written and
    the parity report.
    """
    if not isinstance(model, EarlyExitModel):
        raise ExportError(f"{type(model).__name__} is not an exitserve.EarlyExitModel (for a plain module with exit "
                          "heads: exitserve.MultiExit(module, exits={...}))")
    given = ModelMetadata(input_size, channels, None if mean is None else tuple(mean),
                          None if std is None else tuple(std), None if labels is None else tuple(labels), data, fit)
    merged = given.merge(ModelMetadata.of(model), "the arguments", f"{type(model).__name__}.exitserve_metadata")
    dataset = resolve_data(merged.dataset, data_dir)
    geometry = Geometry(fit=merged.fit or DEFAULT_FIT)
    test = dataset.load(merged.input_size, merged.channels, geometry).test if dataset else None
    metadata = merged.resolve(test, dataset.name if dataset else None)
    if source is None:
        kind = type(model)
        source = SourceSpec(kind="object", model=f"{kind.__module__}.{kind.__qualname__}",
                            config=_jsonable(model.config_dict()))
    source = source.model_copy(update={"dataset": dataset.name if dataset else None})
    return _write_repository(model, Path(out), metadata, source, dataset, parity_images=parity_images, fp16=fp16,
                             opset=opset, overwrite=overwrite, progress=progress, parity_data=test)


# ----------------------------------------------------------------------------- one way out


def _write_repository(
    model: EarlyExitModel,
    out: Path,
    metadata: ResolvedMetadata,
    source: SourceSpec,
    dataset: DataSource | None,
    *,
    parity_images: int,
    fp16: bool,
    opset: int,
    overwrite: bool,
    progress: bool,
    expected_exits: list[str] | None = None,
    test_accuracies: Sequence[float | None] | None = None,
    parity_data: ImageDataset | None = None,
) -> tuple[Manifest, ParityReport]:
    shape = metadata.input_shape
    model = model.eval()
    logits = check_stages(model, shape)
    widths = sorted({t.shape[1] for t in logits})
    if widths != [len(metadata.labels)]:
        raise ExportError(f"the exits give {' and '.join(map(str, widths))} logits but there are "
                          f"{len(metadata.labels)} labels")
    costs = exit_costs(model, shape)  # measured on the model being exported, never read back from a record
    if expected_exits is not None and [c.name for c in costs] != expected_exits:
        raise ExportError(f"the model has exits {[c.name for c in costs]} but the checkpoint records {expected_exits}")
    work = _prepare_out(out, overwrite)
    steps = tqdm(total=4, desc=f"export {out.name}", unit="step", disable=not progress)
    try:
        steps.set_postfix_str("tracing stages")
        exported = export_stages(model, shape, work, opset=opset, fp16=fp16)
        full_file = export_full_model(model, shape, work, opset)
        steps.update()

        steps.set_postfix_str("parity")
        images, parity_source = _parity_images(metadata, dataset, parity_data, parity_images)
        manifest = _manifest(out.name, metadata, source, exported, costs, opset, fp16,
                             test_accuracies or [None] * len(costs))
        staged = StagedModel(work, manifest, provider="auto" if fp16 else "cpu")
        report = check_parity(model, staged, images, FP16_TOLERANCE if fp16 else FP32_TOLERANCE,
                              "fp16" if fp16 else "fp32")
        require_parity(report)
        full_diff = _full_model_parity(work / full_file, model, images)
        if full_diff > FP32_TOLERANCE:
            raise ParityError(f"{full_file} disagrees with PyTorch's last exit by {full_diff:.3g}")
        manifest.parity = {**report.to_dict(), "full_model_max_abs_diff": full_diff, "data": parity_source}
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


def _parity_images(metadata: ResolvedMetadata, dataset: DataSource | None, test: ImageDataset | None,
                   count: int) -> tuple[np.ndarray, str]:
    """Normalized float32 images for the parity gate (PyTorch computes the reference from
    these whatever the precision): the test split's first ``count``, else seeded random
    pixels, said in the manifest."""
    if dataset is not None:
        geometry = Geometry(fit=metadata.fit)  # an image folder is fitted as the server will fit uploads
        test = test if test is not None else dataset.load(metadata.input_size, metadata.channels, geometry).test
        pixels, said = test.images[:count], f"{dataset.name} test split"
    else:
        rng = np.random.default_rng(RANDOM_PARITY_SEED)
        size, channels = metadata.input_size, metadata.channels
        pixels = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
        said = f"random pixels (seed {RANDOM_PARITY_SEED}): no dataset given"
    return normalize(pixels, metadata.mean, metadata.std, np.float32), said


def _jsonable(value: Any) -> Any:
    """What JSON can hold of a user's config (anything else as its text)."""
    return json.loads(json.dumps(value, default=str))


def _full_model_parity(path: Path, model, images: np.ndarray) -> float:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": images})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(images))[-1].numpy()
    return float(np.abs(got - want).max())


def _manifest(
    name: str,
    metadata: ResolvedMetadata,
    source: SourceSpec,
    exported: list[ExportedStage],
    costs: list[ExitCost],
    opset: int,
    fp16: bool,
    test_accuracies: Sequence[float | None],
) -> Manifest:
    total = costs[-1].flops
    stages = [
        StageSpec(
            index=e.index, file=e.file, carried_inputs=e.carried_inputs, keep_input=e.keep_input,
            carried_outputs=e.carried_outputs, exit_name=c.name, flops=c.stage_flops, cumulative_flops=c.flops,
            params=c.stage_params, cost_fraction=c.flops / total, test_accuracy=accuracy,
        )
        for e, c, accuracy in zip(exported, costs, test_accuracies, strict=True)
    ]
    return Manifest(
        name=name,
        exporter_version=exitserve.__version__,
        opset=opset,
        precision="fp16" if fp16 else "fp32",
        input=InputSpec(channels=metadata.channels, size=metadata.input_size, mean=metadata.mean, std=metadata.std,
                        fit=metadata.fit, dtype="float16" if fp16 else "float32"),
        labels=list(metadata.labels),
        stages=stages,
        source=source,
    )
