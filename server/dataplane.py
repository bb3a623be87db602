"""The data plane: one inference path under every protocol.

A protocol layer (``/classify``, ``/classify/batch``, the Open Inference Protocol, and
any later one such as gRPC) translates its request into an ``InferenceRequest``, awaits
``DataPlane.infer`` once, and translates the ``InferenceResult`` back. Everything between
is here, in one order: the model, the options' budget decision, admission, decoding,
batching and the engine, the accounting. So every protocol reports the same numbers for
the same request, computed once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from exitserve.server.admission import AdmissionLine
from exitserve.server.batcher import BatchOutcome
from exitserve.server.budget import BudgetDecision, decide_budget
from exitserve.server.catalog import ModelCatalog, ServedModel
from exitserve.server.decoder import ImageDecoder
from exitserve.server.errors import BadImage, InvalidOptions
from exitserve.server.feedback import BudgetFeedback
from exitserve.server.metrics import Metrics
from exitserve.server.options import InferenceOptions
from exitserve.server.policy import ExitResult
from exitserve.server.quality import QualityWatch
from exitserve.server.request_context import RequestContext
from exitserve.server.settings import Settings
from exitserve.server.state import ServerState


# what ``expected_accuracy`` is: held-out accuracy measured at calibration, not a live figure
# (that is ``estimated_accuracy``, server.monitoring)
EXPECTED_ACCURACY_BASIS = "calibration"


@dataclass(frozen=True)
class EncodedImages:
    blobs: Sequence[bytes]  # PNG, JPEG, ... one per image


@dataclass(frozen=True)
class PixelImages:
    pixels: np.ndarray  # uint8 N x H x W x C (C: 1, 3 or 4)


@dataclass(frozen=True)
class NormalizedImages:
    tensor: np.ndarray  # N x C x H x W, already normalized for the model


Inputs = EncodedImages | PixelImages | NormalizedImages


@dataclass
class InferenceRequest:
    inputs: Inputs
    options: InferenceOptions = field(default_factory=InferenceOptions)
    model: str | None = None  # None: the server's default model
    context: RequestContext = field(default_factory=RequestContext)
    # a bad image fails the whole request, or only itself (the batch endpoint answers the rest)
    bad_images: Literal["fail_request", "per_image"] = "fail_request"


@dataclass(frozen=True)
class ImageAnswer:
    result: ExitResult | None = None
    error: BadImage | None = None


@dataclass(frozen=True)
class InferenceResult:
    model: ServedModel
    images: list[ImageAnswer]
    budget: BudgetDecision
    top_k: int
    decode_ms: float
    queue_ms: float  # the longest an image of this request waited in the queue (0 for a whole-batch run)
    inference_ms: float  # the run that carried it, from the loop's side (a whole-batch run: its wall time)
    estimated_accuracy: float | None = None  # the label-free estimate over recent images (server.monitoring)

    @cached_property
    def results(self) -> list[ExitResult]:
        return [a.result for a in self.images if a.result is not None]

    @property
    def failed(self) -> int:
        return sum(a.error is not None for a in self.images)

    @cached_property
    def mean_cost_fraction(self) -> float:
        results = self.results
        return float(np.mean([r.cost_fraction for r in results])) if results else 0.0

    @property
    def spent_fraction(self) -> float | None:
        """Of a whole-batch budget's allowance (budget x images); None for other policies."""
        if self.budget.policy != "batch_budget" or self.budget.applied is None:
            return None
        return self.mean_cost_fraction / self.budget.applied if self.results else 0.0

    @property
    def exit_histogram(self) -> list[int]:
        histogram = [0] * self.model.engine.num_exits
        for result in self.results:
            histogram[result.exit_index] += 1
        return histogram

    @property
    def deadline_hits(self) -> int:
        return sum(r.deadline_hit for r in self.results)

    @property
    def expected_accuracy(self) -> float | None:
        """What the calibration expects at the applied budget (None with thresholds)."""
        if self.budget.applied is None:
            return None
        return self.model.engine.policy.expected_accuracy(self.budget.applied)


class DataPlane:
    def __init__(self, settings: Settings, state: ServerState, catalog: ModelCatalog, decoder: ImageDecoder,
                 feedback: BudgetFeedback, metrics: Metrics, quality: QualityWatch) -> None:
        self.settings = settings
        self.state = state
        self.catalog = catalog
        self.decoder = decoder
        self.feedback = feedback
        self.metrics = metrics
        self.quality = quality

    # ------------------------------------------------------------------ admission
    def admit_early(self, model: str | None, images: int) -> AdmissionLine | None:
        """Refuse now, before the request's body is read, when the model it names cannot take
        ``images`` more: refusing is then cheap. Returns the model's admission line, which
        the request must then pass (None: no latency objective, no line). A name the
        repository does not hold passes: the request is refused with its own error once it
        is read."""
        if model is not None and model not in self.catalog:
            return None
        served = self.catalog.get(model)
        served.queue.check_admission(images)  # the batcher counts the refusal
        return served.line

    # ------------------------------------------------------------------ inference
    async def infer(self, request: InferenceRequest) -> InferenceResult:
        context = request.context
        model = self.catalog.get(request.model)
        context.model = model.name
        options = request.options
        self._check_top_k(model, options.top_k)
        deciding = time.perf_counter()
        decision, thresholds = decide_budget(model.name, model.engine.policy, options,
                                             self.settings.slo_lowers_request_budgets)
        context.add_phase("options", time.perf_counter() - deciding)

        decoding = time.perf_counter()
        prepared = await self._prepare(model, request)
        decode_ms = (time.perf_counter() - decoding) * 1000
        context.add_phase("decode", decode_ms / 1000)
        good = [i for i, p in enumerate(prepared) if not isinstance(p, BadImage)]
        answers: list[ImageAnswer] = [ImageAnswer(error=p) if isinstance(p, BadImage) else ImageAnswer()
                                      for p in prepared]
        queue_ms = inference_ms = 0.0
        if good:
            images = np.stack([prepared[i] for i in good])
            if thresholds is None:
                assert decision.applied is not None
                running = time.perf_counter()
                results = await self._run_budgeted(model, images, decision.applied)
                inference_ms = (time.perf_counter() - running) * 1000
            else:
                outcomes = await self._run_each(model, images, thresholds, options.deadline_ms, context)
                results = [o.result for o in outcomes]
                queue_ms = max(o.queue_ms for o in outcomes)
                inference_ms = max(o.inference_ms for o in outcomes)
            self.feedback.on_answers(model, results, options.default_budget)
            self.quality.on_answers(model, decision, results, images, context.request_id, good, len(prepared))
            for i, result in zip(good, results, strict=True):
                answers[i] = ImageAnswer(result=result)
        return InferenceResult(model, answers, decision, options.top_k, decode_ms, queue_ms, inference_ms,
                               self.quality.estimated_accuracy(model.name))

    def _check_top_k(self, model: ServedModel, top_k: int) -> None:
        most = min(self.settings.max_top_k, len(model.engine.manifest.labels))
        if not 1 <= top_k <= most:
            raise InvalidOptions(f"top_k must be between 1 and {most}", code="invalid_top_k")

    async def _prepare(self, model: ServedModel, request: InferenceRequest) -> list[np.ndarray | BadImage]:
        """Each image normalized for stage 0, or (per-image errors only) why it is not."""
        spec = model.engine.manifest.input
        inputs = request.inputs
        if isinstance(inputs, PixelImages):
            return list(await self.decoder.from_pixels(inputs.pixels, spec, model.max_pixels))
        if isinstance(inputs, NormalizedImages):
            return list(self.decoder.check_normalized(inputs.tensor, spec, model.name))
        decoded = await self.decoder.decode_all(inputs.blobs, spec, model.max_pixels)
        if request.bad_images == "fail_request":
            for index, outcome in enumerate(decoded):
                if isinstance(outcome, BadImage):
                    outcome.index = index
                    raise outcome
        return decoded

    async def _run_budgeted(self, model: ServedModel, images: np.ndarray, budget: float) -> list[ExitResult]:
        """The whole batch as one job within ``budget`` x images (``BudgetedSchedule``)."""
        engine = model.engine
        schedule = engine.policy.budgeted_schedule(len(images), budget)
        try:
            return await model.queue.run_job(len(images), lambda: engine.run(images, schedule))
        finally:
            self._publish_depth(model)

    async def _run_each(self, model: ServedModel, images: np.ndarray, thresholds: np.ndarray,
                        deadline_ms: float | None, context: RequestContext) -> list[BatchOutcome]:
        """Every image through the batcher on its own, with the same thresholds and deadline.
        Admitted together or refused together; when one fails, the others are cancelled."""
        model.queue.check_admission(len(images))  # again: reading and decoding took time
        deadline = context.arrived + deadline_ms / 1000 if deadline_ms else float("inf")
        tasks = [asyncio.ensure_future(self._run_one(model, image, thresholds, deadline, context))
                 for image in images]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _run_one(self, model: ServedModel, image: np.ndarray, thresholds: np.ndarray, deadline: float,
                       context: RequestContext) -> BatchOutcome:
        try:
            outcome = await model.queue.submit(image, thresholds, deadline)
        finally:
            self._publish_depth(model)
        resumed = time.perf_counter()
        self.feedback.on_latency(model, (resumed - context.arrived) * 1000)
        if context.phases is not None:
            context.add_phase("queue", outcome.queue_ms / 1000)
            context.add_phase("inference", outcome.inference_ms / 1000)
            context.add_phase("resume", resumed - outcome.finished)
            for stage, ms in outcome.stage_ms.items():
                context.add_phase(f"stage_{stage}", ms / 1000)
        return outcome

    def _publish_depth(self, model: ServedModel) -> None:
        self.metrics.queue_depth.labels(model.name).set(model.queue.pending_images)
