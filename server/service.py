"""The inference service the routes depend on: models, batchers, policy options.

Routes validate and await; everything about running models lives behind this class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.batcher import BatchOutcome, DynamicBatcher, QueueFull
from server.engine import ExitResult, ModelEngine
from server.errors import APIError
from server.metrics import Metrics
from server.preprocess import decode_image, normalize
from server.repository import RepositoryError
from server.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

INLINE_DECODE_BYTES = 32 * 1024


@dataclass
class RequestOptions:
    budget: float | None = None
    deadline_ms: float | None = None
    top_k: int = 1
    thresholds: list[float] | None = None


def find_models(repository: Path) -> list[Path]:
    if not repository.is_dir():
        raise RepositoryError(f"model repository {repository} does not exist")
    folders = sorted(p for p in repository.iterdir() if (p / "manifest.json").is_file())
    if not folders:
        raise RepositoryError(f"model repository {repository} holds no model folder with a manifest.json")
    return folders


class InferenceService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engines: dict[str, ModelEngine] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.default_model: str | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def _load_engines(self) -> dict[str, ModelEngine]:
        engines = {}
        for folder in find_models(self.settings.model_repository):
            engine = ModelEngine(
                folder, default_budget=self.settings.default_budget, provider=self.settings.provider,
                io_binding=self.settings.io_binding, intra_op_threads=self.settings.intra_op_threads,
                online_budget=self.settings.online_budget,
            )
            engine.warm_up(self.settings.warmup_batches)
            log.info("loaded %s: %d stages on %s (IO binding %s)", engine.name, engine.num_exits,
                     engine.staged.provider, "on" if engine.staged.use_binding else "off")
            engines[engine.name] = engine
        return engines

    async def start(self) -> None:
        """Load and warm up every model off the event loop; ready only when all are."""
        try:
            engines = await asyncio.to_thread(self._load_engines)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model repository: %s", self.load_error)
            return
        self.engines = engines
        wanted = self.settings.default_model
        if wanted and wanted not in engines:
            self.load_error = f"default model {wanted!r} is not in {self.settings.model_repository}"
            log.error(self.load_error)
            return
        self.default_model = wanted or (DEFAULT_MODEL if DEFAULT_MODEL in engines else sorted(engines)[0])
        for name, engine in engines.items():
            batcher = DynamicBatcher(
                engine, max_batch_size=self.settings.max_batch_size,
                max_queue_delay_ms=self.settings.max_queue_delay_ms,
                max_queue_images=self.settings.max_queue_images, on_batch=self._on_batch,
            )
            batcher.start()
            self.batchers[name] = batcher
            self.metrics.budget.labels(name).set(engine.default_budget)
            self.metrics.effective_budget.labels(name).set(engine.default_budget)
        self.ready = True

    async def stop(self) -> None:
        self.draining = True
        deadline = time.monotonic() + 30  # in-flight work gets 30 s to finish
        for batcher in self.batchers.values():
            while batcher.pending_images > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await batcher.stop()

    def _on_batch(self, engine: ModelEngine, size: int, stage_ms: dict[int, float]) -> None:
        self.metrics.observe_batch(engine.name, size, stage_ms)

    # ------------------------------------------------------------------ lookups
    def engine(self, name: str | None) -> ModelEngine:
        if not self.ready:
            raise APIError(503, "not_ready", self.load_error or "models are still loading",
                           {"Retry-After": str(self.settings.retry_after_s)})
        key = name or self.default_model
        if key not in self.engines:
            raise APIError(404, "unknown_model", f"no model {key!r}; serving: {', '.join(sorted(self.engines))}")
        return self.engines[key]

    def thresholds(self, engine: ModelEngine, options: RequestOptions) -> tuple[np.ndarray, float | None]:
        if options.thresholds is not None:
            if options.budget is not None:
                raise APIError(422, "conflicting_options", "give either budget or thresholds, not both")
            values = list(options.thresholds)
            if len(values) == engine.num_exits - 1:
                values.append(-1e9)
            if len(values) != engine.num_exits:
                raise APIError(422, "invalid_thresholds",
                               f"{engine.name} has {engine.num_exits} exits: give {engine.num_exits - 1} thresholds")
            values[-1] = -1e9
            return np.asarray(values, dtype=np.float64), None
        budget = options.budget
        return engine.thresholds_for(budget), budget if budget is not None else engine.default_budget

    # ------------------------------------------------------------------ work
    async def decode(self, data: bytes, engine: ModelEngine) -> tuple[np.ndarray, float]:
        """Small uploads decode inline (cheaper than a thread hop); larger ones off the loop."""
        started = time.perf_counter()
        args = (data, engine.manifest.input, self.settings.max_pixels)
        pixels = decode_image(*args) if len(data) <= INLINE_DECODE_BYTES else await asyncio.to_thread(decode_image, *args)
        image = normalize(pixels[None], engine.manifest.input)[0]
        return image, (time.perf_counter() - started) * 1000

    async def classify(self, engine: ModelEngine, image: np.ndarray, thresholds: np.ndarray,
                       options: RequestOptions, arrived: float) -> BatchOutcome:
        deadline = arrived + options.deadline_ms / 1000 if options.deadline_ms else float("inf")
        batcher = self.batchers[engine.name]
        try:
            outcome = await batcher.submit(image, thresholds, deadline)
        except QueueFull as exc:
            self.metrics.rejected.labels(engine.name).inc()
            raise APIError(503, "overloaded", str(exc), {"Retry-After": str(self.settings.retry_after_s)}) from None
        finally:
            self.metrics.queue_depth.labels(engine.name).set(batcher.pending_images)
        self._account(engine, [outcome.result], default_budget=options.budget is None and options.thresholds is None)
        return outcome

    async def classify_budgeted(self, engine: ModelEngine, images: np.ndarray, budget: float) -> list[ExitResult]:
        if budget < engine.min_budget - 1e-12:
            raise APIError(422, "invalid_budget",
                           f"budget {budget} is below the cost of {engine.name}'s first exit ({engine.min_budget:.4f})")
        batcher = self.batchers[engine.name]
        try:
            results = await batcher.run_job(len(images), lambda: self._budgeted(engine, images, budget))
        except QueueFull as exc:
            self.metrics.rejected.labels(engine.name).inc()
            raise APIError(503, "overloaded", str(exc), {"Retry-After": str(self.settings.retry_after_s)}) from None
        self._account(engine, results, default_budget=False)
        return results

    def _budgeted(self, engine: ModelEngine, images: np.ndarray, budget: float) -> list[ExitResult]:
        results = engine.run_budgeted(images, budget)
        self._on_batch(engine, len(images), dict(engine.last_stage_ms))
        return results

    def _account(self, engine: ModelEngine, results: list[ExitResult], default_budget: bool) -> None:
        costs = [r.cost_fraction for r in results]
        self.metrics.observe_results(engine.name, [r.exit_index for r in results], costs,
                                     sum(r.deadline_hit for r in results))
        if default_budget and engine.controller is not None:
            engine.controller.observe(costs)
            self.metrics.effective_budget.labels(engine.name).set(engine.controller.effective)
