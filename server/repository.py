"""Loading a model repository: every model folder's manifest, calibration, serving.json and
stage sessions, checked against each other and the server's settings. Any fault is a
``RepositoryError`` naming the file: a repository that cannot be served stops the start."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from exitserve.repository.format import (
    SERVING_FILE,
    RepositoryError,
    ServingConfig,
    load_calibration,
    load_manifest,
    load_serving_config,
)
from exitserve.server.catalog import ServedModel
from exitserve.server.engine import ModelEngine
from exitserve.server.errors import InvalidOptions
from exitserve.server.preprocess import model_max_pixels
from exitserve.server.settings import Settings, default_intra_op_threads

log = logging.getLogger(__name__)


def find_models(repository: Path) -> list[Path]:
    if not repository.is_dir():
        raise RepositoryError(f"model repository {repository} does not exist")
    folders = sorted(p for p in repository.iterdir() if (p / "manifest.json").is_file())
    if not folders:
        raise RepositoryError(f"model repository {repository} holds no model folder with a manifest.json")
    return folders


def relative_to_repository(message: str, repository: Path) -> str:
    """Messages name files relative to the model repository: responses carry no absolute paths."""
    return message.replace(str(repository.resolve()) + "/", "").replace(str(repository) + "/", "")


def load_model(folder: Path, settings: Settings) -> ServedModel:
    serving = load_serving_config(folder)
    _check_queue_holds_a_request(folder.name, serving, settings)
    default_budget = serving.default_budget or settings.default_budget
    engine = ModelEngine.load(
        folder, default_budget=default_budget, provider=settings.provider, io_binding=settings.io_binding,
        intra_op_threads=settings.intra_op_threads or default_intra_op_threads(settings.workers),
        online_budget=settings.online_budget,
    )
    if default_budget < engine.policy.min_budget - 1e-9:
        source = f"{folder.name}/{SERVING_FILE}" if serving.default_budget else "EXITSERVE_DEFAULT_BUDGET"
        raise RepositoryError(
            f"{folder.name}: the default budget {default_budget:g} (from {source}) is below the cost of its "
            f"first exit ({engine.policy.min_budget:.4f}): set default_budget in {folder.name}/{SERVING_FILE} "
            f"to at least that")
    objective_ms = serving.latency_slo_ms or settings.latency_slo_ms
    if objective_ms is not None:
        try:
            engine.policy.attach_objective(objective_ms, serving.slo_floor_budget or settings.slo_floor_budget)
        except InvalidOptions as exc:
            raise RepositoryError(f"{folder.name}: {exc.detail}") from None
    own_limit = serving.max_pixels or model_max_pixels(engine.manifest.input.size, settings.max_pixels)
    log.info("loaded %s: %d stages on %s (IO binding %s)", engine.name, engine.num_exits,
             engine.runtime.provider, "on" if engine.runtime.use_binding else "off")
    return ServedModel(engine, serving, max_pixels=min(own_limit, settings.max_pixels))


def _check_queue_holds_a_request(name: str, serving: ServingConfig, settings: Settings) -> None:
    """A request may carry ``max_files`` images: the model's queue must be able to hold
    them, or such a request could never be served, however idle the server."""
    queue = serving.max_queue_images or settings.max_queue_images
    if settings.max_files > queue:
        source = f"{name}/{SERVING_FILE}" if serving.max_queue_images else "EXITSERVE_MAX_QUEUE_IMAGES"
        raise RepositoryError(
            f"{name}: a request may carry {settings.max_files} images (EXITSERVE_MAX_FILES) but the queue holds "
            f"{queue} (from {source}): raise the queue to at least {settings.max_files} or lower "
            f"EXITSERVE_MAX_FILES to at most {queue}")


def _check_default_model(settings: Settings, names: Collection[str]) -> None:
    wanted = settings.default_model
    if wanted and wanted not in names:
        raise RepositoryError(f"default model {wanted!r} is not in the repository")


def check_repository(settings: Settings) -> None:
    """The files of ``settings.model_repository`` without ONNX Runtime: every manifest and
    its stage files, calibration (against its manifest) and ``serving.json``, and the
    default model. Milliseconds, so the command can refuse an operator's mistake in one
    line before a server starts; what only sessions show still fails the load."""
    names: set[str] = set()
    for folder in find_models(settings.model_repository):
        manifest = load_manifest(folder)
        load_calibration(folder, manifest)
        _check_queue_holds_a_request(folder.name, load_serving_config(folder), settings)
        names.add(manifest.name)
    _check_default_model(settings, names)


def load_repository(settings: Settings) -> dict[str, ServedModel]:
    """Every model of ``settings.model_repository`` (blocking: sessions load here)."""
    models = {}
    for folder in find_models(settings.model_repository):
        model = load_model(folder, settings)
        models[model.name] = model
    _check_default_model(settings, models)
    return models
