"""The inference service the routes depend on: models, batchers, request options.

Routes validate and await; everything about running models lives behind this class. It
speaks in domain errors (``server.errors``): the HTTP layer turns them into responses.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from exitserve.repository.format import SERVING_FILE, RepositoryError, ServingConfig, load_serving_config
from server.batcher import BatchOutcome, DynamicBatcher
from server.engine import ModelEngine
from server.errors import ImageTooLarge, InvalidInput, InvalidOptions, NotReady, Overloaded, ServingError, UnknownModel
from server.metrics import Metrics
from server.policy import ExitResult
from server.preprocess import LARGE_IMAGE_PIXELS, array_to_pixels, model_max_pixels, open_image, to_pixels
from server.settings import DEFAULT_MODEL, Settings, default_intra_op_threads
from server.workers import WorkerGroup

log = logging.getLogger(__name__)

INLINE_DECODE_BYTES = 32 * 1024
T = TypeVar("T")


class StartupError(ServingError):
    """The model repository cannot be served (the message names the file and the problem)."""

    code = "startup_failed"


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
    def __init__(self, settings: Settings, metrics: Metrics, workers: WorkerGroup | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.workers = workers  # the other processes on this port, when there are several
        self.engines: dict[str, ModelEngine] = {}
        self.serving: dict[str, ServingConfig] = {}  # each model's serving.json
        self.batchers: dict[str, DynamicBatcher] = {}
        self.default_model: str | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self._large_decodes = asyncio.Semaphore(settings.max_large_decodes)
        self._objective_ticker: asyncio.Task | None = None
        self.requests_in_flight = 0  # classify and v2 inference requests inside the app (RequestMetrics counts)
        self.large_decodes_running = 0
        self.large_decodes_peak = 0

    # ------------------------------------------------------------------ lifecycle
    def _relative(self, message: str) -> str:
        """Messages name files relative to the model repository: responses carry no
        absolute paths."""
        root = str(self.settings.model_repository.resolve())
        return message.replace(root + "/", "").replace(str(self.settings.model_repository) + "/", "")

    def _load_engines(self) -> dict[str, ModelEngine]:
        engines = {}
        for folder in find_models(self.settings.model_repository):
            serving = load_serving_config(folder)
            default_budget = serving.default_budget or self.settings.default_budget
            engine = ModelEngine.load(
                folder, default_budget=default_budget, provider=self.settings.provider,
                io_binding=self.settings.io_binding,
                intra_op_threads=self.settings.intra_op_threads or default_intra_op_threads(self.settings.workers),
                online_budget=self.settings.online_budget,
            )
            if default_budget < engine.policy.min_budget - 1e-9:
                source = f"{folder.name}/{SERVING_FILE}" if serving.default_budget else "EXITSERVE_DEFAULT_BUDGET"
                raise RepositoryError(
                    f"{folder.name}: the default budget {default_budget:g} (from {source}) is below the cost of its "
                    f"first exit ({engine.policy.min_budget:.4f}): set default_budget in {folder.name}/{SERVING_FILE} "
                    f"to at least that")
            objective_ms = serving.latency_slo_ms or self.settings.latency_slo_ms
            if objective_ms is not None:
                try:
                    engine.policy.attach_objective(objective_ms, serving.slo_floor_budget or self.settings.slo_floor_budget)
                except InvalidOptions as exc:
                    raise RepositoryError(f"{folder.name}: {exc.detail}") from None
            self.serving[engine.name] = serving
            log.info("loaded %s: %d stages on %s (IO binding %s)", engine.name, engine.num_exits,
                     engine.runtime.provider, "on" if engine.runtime.use_binding else "off")
            engines[engine.name] = engine
        wanted = self.settings.default_model
        if wanted and wanted not in engines:
            raise RepositoryError(f"default model {wanted!r} is not in the repository")
        return engines

    async def load(self) -> dict[str, ModelEngine]:
        """Validate and load the whole repository (manifests, every stage session, the
        calibrations against their manifests), off the event loop. Any fault raises
        ``StartupError``: a repository that cannot be served must stop the start, not
        leave a process that answers 503 forever."""
        try:
            return await asyncio.to_thread(self._load_engines)
        except Exception as exc:
            self.load_error = self._relative(f"{type(exc).__name__}: {exc}")
            raise StartupError(f"cannot serve {self.settings.model_repository}: {exc}") from None

    async def warm_up_and_serve(self, engines: dict[str, ModelEngine]) -> None:
        """Warm every model up, then serve them (ready)."""
        try:
            for engine in engines.values():
                await asyncio.to_thread(engine.warm_up, self.settings.warmup_batches)
        except Exception as exc:
            self.load_error = self._relative(f"warm-up failed: {type(exc).__name__}: {exc}")
            log.error("%s", self.load_error, exc_info=exc)
            return
        # what is alive now (sessions, manifests, modules) lives as long as the process: keep it
        # out of the collector's full scans, which otherwise pause a request now and then
        gc.collect()
        gc.freeze()
        self.attach(engines)

    async def start(self) -> None:
        """Load, warm up and serve (tests and embedders; the app's lifespan does the two
        steps apart so that /healthz answers during warm-up)."""
        await self.warm_up_and_serve(await self.load())

    def attach(self, engines: dict[str, ModelEngine]) -> None:
        """Serve these loaded engines: a batcher each, then ready (on the running loop)."""
        self.engines = engines
        wanted = self.settings.default_model
        self.default_model = wanted or (DEFAULT_MODEL if DEFAULT_MODEL in engines else sorted(engines)[0])
        for name, engine in engines.items():
            serving = self.serving.get(name) or ServingConfig()
            batcher = DynamicBatcher(
                engine, max_batch_size=serving.max_batch_size or self.settings.max_batch_size,
                max_queue_delay_ms=self.settings.max_queue_delay_ms,
                max_queue_images=serving.max_queue_images or self.settings.max_queue_images,
                on_batch=self._on_batch,
                on_failure=lambda model: self.metrics.inference_failures.labels(model).inc(),
                on_reject=lambda model: self.metrics.rejected.labels(model).inc(),
            )
            batcher.start()
            self.batchers[name] = batcher
            self.metrics.budget.labels(name).set(engine.policy.default_budget)
            self._publish_budget(engine)
            if (objective := engine.policy.objective) is not None:
                self.metrics.latency_objective.labels(name).set(objective.objective_ms / 1000)
        objectives = {name: e for name, e in engines.items() if e.policy.objective is not None}
        if objectives:
            self._objective_ticker = asyncio.get_running_loop().create_task(self._tick_objectives(objectives))
        self.ready = True
        if self.workers:
            self.workers.mark_ready(True)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Let queued work finish for up to ``timeout_s`` (the shutdown timeout), then stop
        the batchers, abandoning a stage still running."""
        self.draining = True
        if self._objective_ticker is not None:
            self._objective_ticker.cancel()
        if self.workers:
            self.workers.mark_ready(False)
        deadline = time.monotonic() + (self.settings.shutdown_timeout_s if timeout_s is None else timeout_s)
        for batcher in self.batchers.values():
            while batcher.pending_images > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            abandoned = batcher.pending_images
            if abandoned:
                log.warning("shutdown timeout: abandoning %d images of %s", abandoned, batcher.engine.name)
            await batcher.stop(wait=abandoned == 0)

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, body) for /readyz: draining, loading, a failed load, a stalled model."""
        if self.draining:
            return False, {"status": "draining"}
        if not self.ready:
            return False, {"status": "error" if self.load_error else "loading", "detail": self.load_error}
        stalled = [name for name, b in self.batchers.items() if b.stalled_for() > self.settings.watchdog_s]
        if stalled:
            return False, {"status": "stalled", "detail": "models with work and no finished batch for over "
                           f"{self.settings.watchdog_s:g} s", "models": sorted(stalled)}
        if self.workers and (count := self.workers.ready_count()) < self.workers.size:
            return False, {"status": "loading", "detail": f"{count} of {self.workers.size} workers are ready"}
        body: dict[str, object] = {"status": "ready", "models": sorted(self.engines)}
        if self.workers:
            body |= {"workers": self.workers.size, "worker": self.workers.index}
        return True, body

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
        if budget is None:
            return engine.policy.thresholds_for(None), engine.policy.default_budget
        applied = engine.policy.request_budget(budget, self.settings.slo_lowers_request_budgets)
        return engine.policy.thresholds_for(applied), budget

    # ------------------------------------------------------------------ work
    def check_admission(self, engine: ModelEngine, images: int, arrived: float | None = None) -> None:
        """``Overloaded`` now, before the request's body is read, when its model's queue
        cannot take ``images`` more (the batcher counts the refusal), or when the latency
        objective is at its floor budget and the request (``arrived``: perf_counter when
        it reached the app) would still miss it."""
        self.batchers[engine.name].check_admission(images)
        self._check_objective(engine, images, arrived)

    def _check_objective(self, engine: ModelEngine, images: int, arrived: float | None) -> None:
        objective = engine.policy.objective
        if objective is None:
            return
        waited_ms = (time.perf_counter() - arrived) * 1000 if arrived is not None else 0.0
        if not objective.admits(self.batchers[engine.name].waiting_images + images - 1, waited_ms,
                                self.requests_in_flight):
            self.metrics.rejected.labels(engine.name).inc()
            self.metrics.slo_shed.labels(engine.name).inc()
            raise Overloaded(f"{engine.name} is at its floor budget ({objective.floor_budget:g}) and its queue "
                             f"would still miss the {objective.objective_ms:g} ms latency objective")

    async def _tick_objectives(self, engines: dict[str, ModelEngine]) -> None:
        """Latency objectives act on answers; this lets them act when answers stop coming
        too (load gone: step back up; everything stuck: the prediction still sees the
        queue), and measures the event loop's lag for them: how late this timer fires is
        how long a request that just arrived waits before the app sees it."""
        loop = asyncio.get_running_loop()
        interval = min(e.policy.objective.interval_s for e in engines.values())
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            lag_ms = (loop.time() - due) * 1000
            for name, engine in engines.items():
                objective = engine.policy.objective
                cap = objective.budget_cap
                objective.observe_loop_lag(lag_ms)
                objective.tick(self.batchers[name].waiting_images)
                if objective.budget_cap != cap:
                    self._publish_budget(engine)

    def _on_batch(self, model: str, images: int, stage_ms: dict[int, float]) -> None:
        self.metrics.observe_batch(model, images, stage_ms)
        objective = self.engines[model].policy.objective if model in self.engines else None
        if objective is not None:
            objective.observe_batch(images, sum(stage_ms.values()))

    def _publish_budget(self, engine: ModelEngine) -> None:
        budget = engine.policy.effective_budget
        self.metrics.effective_budget.labels(engine.name).set(budget)
        accuracy = engine.policy.expected_accuracy(budget)
        if accuracy is not None:
            self.metrics.expected_accuracy.labels(engine.name).set(accuracy)

    def max_pixels(self, engine: ModelEngine) -> int:
        """The model's own pixel limit (its serving.json, else derived from its input size),
        never over the server-wide ceiling."""
        own = (self.serving.get(engine.name) or ServingConfig()).max_pixels
        return min(own or model_max_pixels(engine.manifest.input.size, self.settings.max_pixels),
                   self.settings.max_pixels)

    async def decode(self, data: bytes, engine: ModelEngine) -> tuple[np.ndarray, float]:
        """Header first (refuses bombs and images over the model's pixel limit), then the
        pixels: small images inline (cheaper than a thread hop), larger uploads off the
        loop, and images over a megapixel a bounded number at a time, so a burst of large
        uploads cannot multiply memory or starve the loop. Raises ``BadImage`` (one of
        its kinds) for anything that is not a usable image."""
        started = time.perf_counter()
        spec = engine.manifest.input
        img = open_image(data, self.max_pixels(engine))
        if img.width * img.height > LARGE_IMAGE_PIXELS:
            async with self._large_decodes:
                self.large_decodes_running += 1
                self.large_decodes_peak = max(self.large_decodes_peak, self.large_decodes_running)
                try:
                    pixels = await asyncio.to_thread(to_pixels, img, spec)
                finally:
                    self.large_decodes_running -= 1
        elif len(data) > INLINE_DECODE_BYTES:
            pixels = await asyncio.to_thread(to_pixels, img, spec)
        else:
            pixels = to_pixels(img, spec)
        image = spec.normalize(pixels[None])[0]
        return image, (time.perf_counter() - started) * 1000

    async def from_pixels(self, pixels: np.ndarray, engine: ModelEngine) -> tuple[np.ndarray, float]:
        """Raw uint8 pixels N x H x W x C -> the normalized N x C x H x W batch, under the
        same pixel limit, conversion and normalization as decoded images (``decode``)."""
        started = time.perf_counter()
        spec = engine.manifest.input
        _, height, width, _ = pixels.shape
        limit = self.max_pixels(engine)
        if height * width > limit:
            raise ImageTooLarge(f"{width}x{height} is over the limit of {limit} pixels")

        def convert() -> np.ndarray:
            return np.stack([array_to_pixels(p, spec) for p in pixels])

        if height * width > LARGE_IMAGE_PIXELS:
            async with self._large_decodes:
                converted = await asyncio.to_thread(convert)
        elif pixels.nbytes > INLINE_DECODE_BYTES:
            converted = await asyncio.to_thread(convert)
        else:
            converted = convert()
        return spec.normalize(converted), (time.perf_counter() - started) * 1000

    @staticmethod
    def check_normalized(tensor: np.ndarray, engine: ModelEngine) -> np.ndarray:
        """An already normalized N x C x H x W batch, checked against the model's input
        (shape, finite values) and cast to the dtype stage 0 takes."""
        spec = engine.manifest.input
        expected = (spec.channels, spec.size, spec.size)
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected:
            raise InvalidInput(f"{engine.name} takes normalized images of shape [N, {', '.join(map(str, expected))}] "
                               f"(N x C x H x W), got {list(tensor.shape)}")
        if not np.isfinite(tensor).all():
            raise InvalidInput("normalized images must be finite (no NaN or infinity)")
        return np.ascontiguousarray(tensor, dtype=spec.dtype)

    async def classify(self, engine: ModelEngine, image: np.ndarray, thresholds: np.ndarray,
                       options: RequestOptions, arrived: float) -> BatchOutcome:
        deadline = arrived + options.deadline_ms / 1000 if options.deadline_ms else float("inf")
        batcher = self.batchers[engine.name]
        self._check_objective(engine, 1, arrived)  # again: decoding took time, and a form may have named the model
        outcome = await self._queued(engine, batcher.submit(image, thresholds, deadline))
        self._account(engine, [outcome.result], options.default_budget)
        if (objective := engine.policy.objective) is not None:
            latency_ms = (time.perf_counter() - arrived) * 1000
            cap = objective.budget_cap
            objective.observe_request(latency_ms, batcher.waiting_images)
            within = "within" if latency_ms <= objective.objective_ms else "missed"
            self.metrics.slo_requests.labels(engine.name, within).inc()
            if objective.budget_cap != cap:
                self._publish_budget(engine)
        return outcome

    async def classify_each(self, engine: ModelEngine, images: np.ndarray, thresholds: np.ndarray,
                            options: RequestOptions, arrived: float) -> list[BatchOutcome]:
        """Every image through the batcher on its own, as that many ``classify`` calls: the
        same thresholds and deadline for each. Admitted together or refused together; when
        one fails, the others are cancelled."""
        self.check_admission(engine, len(images))
        tasks = [asyncio.ensure_future(self.classify(engine, image, thresholds, options, arrived)) for image in images]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def classify_budgeted(self, engine: ModelEngine, images: np.ndarray, budget: float) -> list[ExitResult]:
        schedule = engine.policy.budgeted_schedule(len(images), budget)  # refuses a budget below the first exit
        batcher = self.batchers[engine.name]
        results = await self._queued(engine, batcher.run_job(len(images), lambda: engine.run(images, schedule)))
        self._account(engine, results, default_budget=False)
        return results

    async def _queued(self, engine: ModelEngine, work: Awaitable[T]) -> T:
        """Await work on the model's queue, keeping the depth gauge."""
        try:
            return await work
        finally:
            self.metrics.queue_depth.labels(engine.name).set(self.batchers[engine.name].pending_images)

    def _account(self, engine: ModelEngine, results: list[ExitResult], default_budget: bool) -> None:
        costs = [r.cost_fraction for r in results]
        self.metrics.observe_results(engine.name, [r.exit_index for r in results], costs,
                                     sum(r.deadline_hit for r in results))
        if default_budget and engine.policy.controller is not None:
            engine.policy.observe_default_budget_costs(costs)
            self._publish_budget(engine)
