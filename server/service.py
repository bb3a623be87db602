"""The inference service the routes depend on: models, batchers, request options.

Routes validate and await; everything about running models lives behind this class. It
speaks in domain errors (``server.errors``): the HTTP layer turns them into responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from exitserve.repository.format import RepositoryError
from server.batcher import BatchOutcome, DynamicBatcher
from server.engine import ModelEngine
from server.errors import InvalidOptions, NotReady, Overloaded, UnknownModel
from server.metrics import Metrics
from server.policy import ExitResult
from server.preprocess import decode_image
from server.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

INLINE_DECODE_BYTES = 32 * 1024
DRAIN_TIMEOUT_S = 30
T = TypeVar("T")


@dataclass
class RequestOptions:
    budget: float | None = None
    deadline_ms: float | None = None
    top_k: int = 1
    thresholds: list[float] | None = None

    @property
    def default_budget(self) -> bool:
        """The request leaves the budget to the server (and so may feed its controller)."""
        return self.budget is None and self.thresholds is None


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
            engine = ModelEngine.load(
                folder, default_budget=self.settings.default_budget, provider=self.settings.provider,
                io_binding=self.settings.io_binding, intra_op_threads=self.settings.intra_op_threads,
                online_budget=self.settings.online_budget,
            )
            engine.warm_up(self.settings.warmup_batches)
            log.info("loaded %s: %d stages on %s (IO binding %s)", engine.name, engine.num_exits,
                     engine.runtime.provider, "on" if engine.runtime.use_binding else "off")
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
        self.attach(engines)

    def attach(self, engines: dict[str, ModelEngine]) -> None:
        """Serve these loaded engines: a batcher each, then ready (on the running loop)."""
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
                max_queue_images=self.settings.max_queue_images, on_batch=self.metrics.observe_batch,
            )
            batcher.start()
            self.batchers[name] = batcher
            self.metrics.budget.labels(name).set(engine.policy.default_budget)
            self.metrics.effective_budget.labels(name).set(engine.policy.effective_budget)
        self.ready = True

    async def stop(self) -> None:
        self.draining = True
        deadline = time.monotonic() + DRAIN_TIMEOUT_S  # in-flight work gets this long to finish
        for batcher in self.batchers.values():
            while batcher.pending_images > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await batcher.stop()

    # ------------------------------------------------------------------ lookups
    def engine(self, name: str | None) -> ModelEngine:
        """The model ``name`` (the default when None); ``NotReady`` while loading or after a
        failed load, ``UnknownModel`` for a name the repository does not hold."""
        if not self.ready:
            raise NotReady(self.load_error or "models are still loading")
        key = name or self.default_model
        if key not in self.engines:
            raise UnknownModel(f"no model {key!r}; serving: {', '.join(sorted(self.engines))}")
        return self.engines[key]

    def thresholds(self, engine: ModelEngine, options: RequestOptions) -> tuple[np.ndarray, float | None]:
        """The request's thresholds, and the budget they come from (None for explicit ones)."""
        if options.thresholds is not None:
            if options.budget is not None:
                raise InvalidOptions("give either budget or thresholds, not both", code="conflicting_options")
            return engine.policy.explicit_thresholds(options.thresholds), None
        budget = options.budget
        return engine.policy.thresholds_for(budget), budget if budget is not None else engine.policy.default_budget

    # ------------------------------------------------------------------ work
    async def decode(self, data: bytes, engine: ModelEngine) -> tuple[np.ndarray, float]:
        """Small uploads decode inline (cheaper than a thread hop); larger ones off the loop.
        Raises ``BadImage`` (one of its kinds) for anything that is not a usable image."""
        started = time.perf_counter()
        args = (data, engine.manifest.input, self.settings.max_pixels)
        pixels = decode_image(*args) if len(data) <= INLINE_DECODE_BYTES else await asyncio.to_thread(decode_image, *args)
        image = engine.manifest.input.normalize(pixels[None])[0]
        return image, (time.perf_counter() - started) * 1000

    async def classify(self, engine: ModelEngine, image: np.ndarray, thresholds: np.ndarray,
                       options: RequestOptions, arrived: float) -> BatchOutcome:
        deadline = arrived + options.deadline_ms / 1000 if options.deadline_ms else float("inf")
        batcher = self.batchers[engine.name]
        outcome = await self._queued(engine, batcher.submit(image, thresholds, deadline))
        self._account(engine, [outcome.result], options.default_budget)
        return outcome

    async def classify_budgeted(self, engine: ModelEngine, images: np.ndarray, budget: float) -> list[ExitResult]:
        schedule = engine.policy.budgeted_schedule(len(images), budget)  # refuses a budget below the first exit
        batcher = self.batchers[engine.name]
        results = await self._queued(engine, batcher.run_job(len(images), lambda: engine.run(images, schedule)))
        self._account(engine, results, default_budget=False)
        return results

    async def _queued(self, engine: ModelEngine, work: Awaitable[T]) -> T:
        """Await work on the model's queue, counting refusals and keeping the depth gauge."""
        try:
            return await work
        except Overloaded:
            self.metrics.rejected.labels(engine.name).inc()
            raise
        finally:
            self.metrics.queue_depth.labels(engine.name).set(self.batchers[engine.name].pending_images)

    def _account(self, engine: ModelEngine, results: list[ExitResult], default_budget: bool) -> None:
        costs = [r.cost_fraction for r in results]
        self.metrics.observe_results(engine.name, [r.exit_index for r in results], costs,
                                     sum(r.deadline_hit for r in results))
        if default_budget and engine.policy.controller is not None:
            engine.policy.observe_default_budget_costs(costs)
            self.metrics.effective_budget.labels(engine.name).set(engine.policy.effective_budget)
