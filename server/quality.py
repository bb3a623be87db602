"""Model quality while serving: the label-free estimate and exit drift
(``server.monitoring``), shadow full depth (``server.shadow``) and delayed labels
(``server.labels``), per model, fed by the data plane's answers and published as gauges.

The data plane calls ``on_answers`` once per request, after it was answered; everything
here is bookkeeping on the event loop except the shadow runs, which have their own thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exitserve.server.budget import BudgetDecision
from exitserve.server.catalog import ServedModel
from exitserve.server.errors import InvalidOptions
from exitserve.server.labels import Answered, AnswerMemory
from exitserve.server.metrics import Metrics
from exitserve.server.monitoring import QualityMonitor, QualityReading
from exitserve.server.policy import ExitResult
from exitserve.server.settings import Settings
from exitserve.server.shadow import ShadowRunner

PUBLISH_INTERVAL_S = 0.25  # gauges follow the windows at most this often (a request's own bookkeeping stays cheap)
MAX_LABELS = 10_000  # per POST
NOT_CLASSIFIED = -1  # an image of the request that failed to decode: nothing to score


@dataclass(frozen=True)
class Label:
    request_id: str
    label: int | str  # class index or class name
    image: int = 0  # which image of the request (the batch endpoint answers several)


@dataclass
class LabelReport:
    model: str
    matched: int = 0
    correct: int = 0
    unknown: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    invalid: list[dict[str, str]] = field(default_factory=list)
    labelled_accuracy: float | None = None
    labelled_images: int = 0


class ModelQuality:
    """One model's signals."""

    def __init__(self, model: ServedModel, settings: Settings, metrics: Metrics) -> None:
        engine = model.engine
        self.name = model.name
        self.labels = engine.manifest.labels
        self.monitor = QualityMonitor(engine.calibration, engine.num_exits, settings.monitor_window,
                                      settings.monitor_min_images)
        self.shadow = ShadowRunner(
            model.name, engine.runtime, engine.num_exits, share=settings.shadow_share,
            max_cost_share=settings.shadow_max_cost_share, window=settings.shadow_window,
            is_idle=lambda: model.queue.pending_images == 0, on_shadowed=self._shadowed,
            on_skipped=lambda reason: metrics.shadow_skipped.labels(self.name, reason).inc(),
        )
        self.labelled: deque[bool] = deque(maxlen=settings.monitor_window)
        self.metrics = metrics
        self.estimated_accuracy: float | None = None  # as last published (what answers quote)
        self.served_cost = 0.0  # of every answer, in full-network units: what the shadow's cost is a share of
        self.published = 0.0
        self.thresholds = {"accuracy_drop": settings.alert_accuracy_drop, "exit_drift": settings.alert_exit_drift,
                           "shadow_agreement": settings.alert_shadow_agreement}

    def _shadowed(self, agreed: bool, cost: float) -> None:  # on the shadow thread (or the loop)
        self.metrics.shadow_images.labels(self.name).inc()
        if cost:
            self.metrics.shadow_cost.labels(self.name).inc(cost)
        if (agreement := self.shadow.agreement) is not None:
            self.metrics.shadow_agreement.labels(self.name).set(agreement)

    def publish(self) -> QualityReading:
        reading = self.monitor.reading()
        self.estimated_accuracy = reading.estimated_accuracy
        if reading.estimated_accuracy is not None:
            self.metrics.estimated_accuracy.labels(self.name).set(reading.estimated_accuracy)
            self.metrics.calibrated_accuracy.labels(self.name).set(reading.calibrated_accuracy)
        if reading.exit_drift is not None:
            self.metrics.exit_drift.labels(self.name).set(reading.exit_drift)
        self.published = time.monotonic()
        return reading

    @property
    def labelled_accuracy(self) -> float | None:
        return sum(self.labelled) / len(self.labelled) if self.labelled else None

    def class_index(self, label: int | str) -> int:
        if isinstance(label, bool):
            raise InvalidOptions("a label is a class index or a class name, not true or false")
        if isinstance(label, int):
            if not 0 <= label < len(self.labels):
                raise InvalidOptions(f"class index {label} is outside 0..{len(self.labels) - 1}")
            return label
        try:
            return self.labels.index(label)
        except ValueError:
            raise InvalidOptions(f"{self.name} has no class {label!r}") from None

    def report(self) -> dict[str, Any]:
        reading = self.publish()
        cost = self.shadow.cost
        alerts = {
            "accuracy_drop": (reading.estimated_accuracy is not None
                              and reading.calibrated_accuracy - reading.estimated_accuracy
                              > self.thresholds["accuracy_drop"]),
            "exit_drift": reading.exit_drift is not None and reading.exit_drift > self.thresholds["exit_drift"],
            "shadow_agreement": (agreement := self.shadow.agreement) is not None
            and agreement < self.thresholds["shadow_agreement"],
        }
        return {
            "window_images": reading.window_images,
            "estimated_accuracy": _round(reading.estimated_accuracy),
            "calibrated_accuracy": _round(reading.calibrated_accuracy),
            "exit_drift": _round(reading.exit_drift),
            "exit_shares": reading.exit_shares,
            "expected_exit_shares": reading.expected_exit_shares,
            "estimates": self.monitor.estimates,
            "shadow": {"share": self.shadow.share, "images": self.shadow.images,
                       "agreement": _round(self.shadow.agreement), "cost": round(cost, 6),
                       "cost_share": _round(cost / self.served_cost) if self.served_cost else None,
                       "pending": self.shadow.pending},
            "labelled": {"images": len(self.labelled), "accuracy": _round(self.labelled_accuracy)},
            "alerts": alerts,
            "thresholds": self.thresholds,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


class QualityWatch:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelQuality] = {}
        self.memory = AnswerMemory(settings.label_memory)

    def start(self, models: dict[str, ServedModel]) -> None:
        for name, model in models.items():
            quality = ModelQuality(model, self.settings, self.metrics)
            for alert, value in quality.thresholds.items():
                self.metrics.alert_threshold.labels(name, alert).set(value)
            quality.shadow.start()
            self.models[name] = quality

    def stop(self) -> None:
        for quality in self.models.values():
            quality.shadow.stop()

    # ------------------------------------------------------------------ answers
    def on_answers(self, model: ServedModel, decision: BudgetDecision, results: Sequence[ExitResult],
                   images: np.ndarray, request_id: str | None, positions: Sequence[int] | None = None,
                   request_images: int | None = None) -> None:
        """A request's answers: ``results`` for ``images``, which were the request's images at
        ``positions`` (of ``request_images``; the others failed to decode). Default: all."""
        quality = self.models.get(model.name)
        if quality is None:
            return
        monitor = quality.monitor
        if (budget := decision.lookup_budget) is not None and monitor.estimates:
            monitor.observe(monitor.point_index(budget), results, by_thresholds=decision.policy == "budget")
        quality.served_cost += sum(r.cost_fraction for r in results)
        quality.shadow.offer(images, results)
        if request_id is not None and self.memory.capacity > 0:
            classes = [NOT_CLASSIFIED] * (len(results) if request_images is None else request_images)
            for position, result in zip(positions or range(len(results)), results, strict=True):
                classes[position] = int(np.argmax(result.probs))
            self.memory.remember(request_id, model.name, tuple(classes))
        if time.monotonic() - quality.published >= PUBLISH_INTERVAL_S:
            quality.publish()

    def estimated_accuracy(self, model: str) -> float | None:
        quality = self.models.get(model)
        """As last published (at most ``PUBLISH_INTERVAL_S`` old): every answer quotes it."""
        return None if quality is None else quality.estimated_accuracy

    def report(self, model: str) -> dict[str, Any] | None:
        quality = self.models.get(model)
        return None if quality is None else quality.report()

    # ------------------------------------------------------------------ labels
    def label(self, model: str, labels: Sequence[Label]) -> LabelReport:
        """Score remembered answers of ``model`` against their true classes. Per item: an id
        never seen or already forgotten is reported, a bad label or image index is invalid;
        none of these fails the others."""
        quality = self.models[model]
        report = LabelReport(model)
        outcomes = self.metrics.labels
        for item in labels:
            found = self.memory.lookup(item.request_id)
            if found == "unknown" or found == "expired":
                (report.unknown if found == "unknown" else report.expired).append(item.request_id)
                outcomes.labels(model, found).inc()
                continue
            assert isinstance(found, Answered)
            try:
                self._check(found, model, item)
                true_class = quality.class_index(item.label)
            except InvalidOptions as exc:
                report.invalid.append({"request_id": item.request_id, "error": exc.detail})
                outcomes.labels(model, "invalid").inc()
                continue
            self.memory.mark_labelled(item.request_id, item.image)
            right = found.classes[item.image] == true_class
            quality.labelled.append(right)
            report.matched += 1
            report.correct += right
            outcomes.labels(model, "correct" if right else "wrong").inc()
        report.labelled_accuracy = quality.labelled_accuracy
        report.labelled_images = len(quality.labelled)
        if report.labelled_accuracy is not None:
            self.metrics.labelled_accuracy.labels(model).set(report.labelled_accuracy)
        return report

    @staticmethod
    def _check(found: Answered, model: str, item: Label) -> None:
        if found.model != model:
            raise InvalidOptions(f"request {item.request_id} was answered by {found.model}, not {model}")
        if not 0 <= item.image < len(found.classes):
            raise InvalidOptions(f"request {item.request_id} had {len(found.classes)} images; no image {item.image}")
        if found.classes[item.image] == NOT_CLASSIFIED:
            raise InvalidOptions(f"image {item.image} of request {item.request_id} was not classified")
        if item.image in found.labelled:
            raise InvalidOptions(f"image {item.image} of request {item.request_id} is already labelled")
