"""The served models' lifecycle: load the repository, warm up, serve, drain, and say which
of these the server is in (readiness). Inference itself is the data plane's
(``server.dataplane``); this class builds it and hands it the models once they are warm.
"""

from __future__ import annotations

import asyncio
import logging
import time

from exitserve.server.admission import AdmissionLine, default_max_wait_ms
from exitserve.server.batcher import DynamicBatcher
from exitserve.server.catalog import ModelCatalog, ServedModel
from exitserve.server.dataplane import DataPlane
from exitserve.server.decoder import ImageDecoder
from exitserve.server.errors import ServingError
from exitserve.server.feedback import BudgetFeedback
from exitserve.server.metrics import Metrics
from exitserve.server.quality import QualityWatch
from exitserve.server.repository import load_repository, relative_to_repository
from exitserve.server.settings import DEFAULT_MODEL, Settings
from exitserve.server.state import ServerState
from exitserve.server.workers import WorkerGroup

log = logging.getLogger(__name__)


class StartupError(ServingError):
    """The model repository cannot be served (the message names the file and the problem)."""

    code = "startup_failed"


class InferenceService:
    def __init__(self, settings: Settings, metrics: Metrics, workers: WorkerGroup | None = None,
                 state: ServerState | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.workers = workers  # the other processes on this port, when there are several
        self.state = state or ServerState()
        self.catalog = ModelCatalog(self.state)
        self.feedback = BudgetFeedback(metrics)
        self.quality = QualityWatch(settings, metrics)
        decoder = ImageDecoder(settings.max_large_decodes, settings.inline_decode_bytes)
        self.plane = DataPlane(settings, self.state, self.catalog, decoder, self.feedback, metrics, self.quality)

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.catalog.models

    # ------------------------------------------------------------------ lifecycle
    def _failed(self, message: str) -> str:
        self.state.load_error = relative_to_repository(message, self.settings.model_repository)
        return self.state.load_error

    async def load(self) -> dict[str, ServedModel]:
        """Validate and load the whole repository (manifests, every stage session, the
        calibrations against their manifests), off the event loop. Any fault raises
        ``StartupError``: a repository that cannot be served must stop the start, not
        leave a process that answers 503 forever."""
        try:
            return await asyncio.to_thread(load_repository, self.settings)
        except Exception as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            raise StartupError(f"cannot serve {self.settings.model_repository}: {exc}") from None

    async def warm_up_and_serve(self, models: dict[str, ServedModel]) -> None:
        """Warm every model up, then serve them (ready)."""
        try:
            for model in models.values():
                await asyncio.to_thread(model.engine.warm_up, self.settings.warmup_batches)
        except Exception as exc:
            log.error("%s", self._failed(f"warm-up failed: {type(exc).__name__}: {exc}"), exc_info=exc)
            return
        self.attach(models)

    async def start(self) -> None:
        """Load, warm up and serve (tests and embedders; the app's lifespan does the two
        steps apart so that /healthz answers during warm-up)."""
        await self.warm_up_and_serve(await self.load())

    def attach(self, models: dict[str, ServedModel]) -> None:
        """Serve these loaded models: a batcher each, then ready (on the running loop)."""
        for model in models.values():
            serving = model.serving
            model.batcher = DynamicBatcher(
                model.engine, max_batch_size=serving.max_batch_size or self.settings.max_batch_size,
                max_queue_delay_ms=self.settings.max_queue_delay_ms,
                max_queue_images=serving.max_queue_images or self.settings.max_queue_images,
                on_batch=self.feedback.on_batch,
                on_failure=lambda name: self.metrics.inference_failures.labels(name).inc(),
                on_reject=lambda name: self.metrics.rejected.labels(name).inc(),
            )
            model.batcher.start()
            objective = model.engine.policy.objective
            if objective is not None:
                model.line = AdmissionLine(
                    objective.objective_ms, model=model.name, max_waiting=self.settings.slo_max_waiting,
                    on_refuse=self._count_shed,
                    max_wait_ms=self.settings.slo_max_wait_ms or default_max_wait_ms(objective.objective_ms))
        wanted = self.settings.default_model
        self.catalog.serve(models, wanted or (DEFAULT_MODEL if DEFAULT_MODEL in models else sorted(models)[0]))
        self.feedback.start(models)
        self.quality.start(models)
        self.state.ready = True
        if self.workers:
            self.workers.mark_ready(True)

    def _count_shed(self, model: str) -> None:
        self.metrics.rejected.labels(model).inc()
        self.metrics.slo_shed.labels(model).inc()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Let queued work finish for up to ``timeout_s`` (the shutdown timeout; no later than
        the server's own shutdown deadline), then stop the batchers, abandoning a stage
        still running."""
        self.state.begin_draining()
        await self.feedback.stop()
        self.quality.stop()
        if self.workers:
            self.workers.mark_ready(False)
        deadline = time.monotonic() + (self.settings.shutdown_timeout_s if timeout_s is None else timeout_s)
        if self.state.shutdown_deadline is not None:  # the server's shutdown has already spent part of it
            deadline = min(deadline, self.state.shutdown_deadline)
        for model in self.models.values():
            batcher = model.batcher
            if batcher is None:
                continue
            while batcher.pending_images > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            abandoned = batcher.pending_images
            if abandoned:
                log.warning("shutdown timeout: abandoning %d images of %s", abandoned, model.name)
            await batcher.stop(wait=abandoned == 0)

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, body) for /readyz: draining, loading, a failed load, a stalled model."""
        state = self.state
        if state.draining:
            return False, {"status": "draining"}
        if not state.ready:
            return False, {"status": "error" if state.load_error else "loading", "detail": state.load_error}
        stalled = [name for name, m in self.models.items() if m.queue.stalled_for() > self.settings.watchdog_s]
        if stalled:
            return False, {"status": "stalled", "detail": "models with work and no finished batch for over "
                           f"{self.settings.watchdog_s:g} s", "models": sorted(stalled)}
        if self.workers and (count := self.workers.ready_count()) < self.workers.size:
            return False, {"status": "loading", "detail": f"{count} of {self.workers.size} workers are ready"}
        body: dict[str, object] = {"status": "ready", "models": sorted(self.models)}
        if self.workers:
            body |= {"workers": self.workers.size, "worker": self.workers.index}
        return True, body
