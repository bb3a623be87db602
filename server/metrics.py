"""Prometheus metrics, on a registry of the app's own (tests run several apps).

With several workers (``multiprocess_dir``), prometheus-client's multiprocess mode keeps
each worker's values in files there; ``exposition`` then aggregates every worker, live
and exited: counters and histograms add up, the queue gauge sums the live workers.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

PHASE_BUCKETS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "exitserve_request_latency_seconds", "Wall time of a request, from arrival to response (routes "
            "/classify, /classify/batch, /v2/models/{name}/infer, grpc:ModelInfer).",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.refusal_latency = Histogram(
            "exitserve_refusal_latency_seconds", "Wall time of a request refused with 503 (overload or shedding): "
            "how fast a refusal is.", ["route"], buckets=PHASE_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "exitserve_requests_total", "Requests answered, by route and HTTP status.", ["route", "status"], registry=r
        )
        self.images = Counter("exitserve_images_total", "Images classified.", ["model"], registry=r)
        self.exits = Counter("exitserve_exits_total", "Images per exit taken.", ["model", "exit"], registry=r)
        self.deadline_hits = Counter(
            "exitserve_deadline_exits_total", "Images answered early because of their deadline.", ["model"], registry=r
        )
        self.cost = Counter(
            "exitserve_cost_fraction_total",
            "Sum of per-image cost (fraction of the full network); divide by images for the mean.", ["model"],
            registry=r,
        )
        self.stage_latency = Histogram(
            "exitserve_stage_latency_seconds", "Wall time of one stage call (a whole batch).", ["model", "stage"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "exitserve_batch_size", "Images per engine call.", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )
        self.queue_depth = Gauge("exitserve_queue_images", "Images waiting or running.", ["model"], registry=r,
                                 multiprocess_mode="livesum")
        self.budget = Gauge("exitserve_budget", "Configured default budget (fraction of full cost).", ["model"],
                            registry=r, multiprocess_mode="livemax")
        self.effective_budget = Gauge(
            "exitserve_effective_budget", "Budget the thresholds are looked up with after online correction.",
            ["model"], registry=r, multiprocess_mode="liveall",  # each worker has its own controller: a pid label
        )
        self.inference_failures = Counter(
            "exitserve_inference_failures_total", "Engine runs that failed (their requests got 500 "
            "inference_failed).", ["model"], registry=r,
        )
        self.request_phase = Histogram(
            "exitserve_request_phase_seconds", "Time of one phase of a request (EXITSERVE_PHASE_METRICS; "
            "server.http.phases lists them).",
            ["route", "phase"], buckets=PHASE_BUCKETS, registry=r,
        )
        self.latency_objective = Gauge(
            "exitserve_latency_objective_seconds", "The p99 latency objective /classify holds (EXITSERVE_LATENCY_SLO_MS).",
            ["model"], registry=r, multiprocess_mode="livemax",
        )
        self.slo_requests = Counter(
            "exitserve_slo_requests_total", "/classify answers within the latency objective (outcome within) or not "
            "(missed), by server-side latency.", ["model", "outcome"], registry=r,
        )
        self.slo_shed = Counter(
            "exitserve_slo_shed_total", "Requests refused by the admission line at the floor budget: waited "
            "EXITSERVE_SLO_MAX_WAIT_MS, or the line was full (also in exitserve_rejected_total).", ["model"],
            registry=r,
        )
        self.admission_limit = Gauge(
            "exitserve_admission_limit", "Requests the admission line lets inside at once (server.admission; -1: not "
            "limiting, the budget is above its floor).", ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.admission_waiting = Gauge(
            "exitserve_admission_waiting", "Requests waiting in the admission line, their bodies not yet read.",
            ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.expected_accuracy = Gauge(
            "exitserve_expected_accuracy", "Held-out accuracy the calibration expects at the effective budget.",
            ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.estimated_accuracy = Gauge(
            "exitserve_estimated_accuracy", "Accuracy estimated without labels (ATC) over the last "
            "EXITSERVE_MONITOR_WINDOW images.", ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.calibrated_accuracy = Gauge(
            "exitserve_calibrated_accuracy", "What calibration expects for the same window's images (the budgets "
            "they were answered at): the estimate's baseline.", ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.exit_drift = Gauge(
            "exitserve_exit_drift", "Jensen-Shannon divergence (base 2) of the window's exit shares from those "
            "calibration predicts at the thresholds in force.", ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.shadow_agreement = Gauge(
            "exitserve_shadow_agreement", "Share of shadowed images whose served class equals full depth's.",
            ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.labelled_accuracy = Gauge(
            "exitserve_labelled_accuracy", "Accuracy over the last EXITSERVE_MONITOR_WINDOW images labelled "
            "through POST /v1/models/{name}/labels.", ["model"], registry=r, multiprocess_mode="liveall",
        )
        self.shadow_images = Counter("exitserve_shadow_images_total", "Sampled answers compared with full depth (run again, "
                                     "or free when answered at the last exit).",
                                     ["model"], registry=r)
        self.shadow_cost = Counter(
            "exitserve_shadow_cost_fraction_total", "Cost of the shadow runs in full-network units; divide by "
            "exitserve_cost_fraction_total for their share of the compute.", ["model"], registry=r,
        )
        self.shadow_skipped = Counter(
            "exitserve_shadow_skipped_total", "Sampled images not shadowed: cost_cap (over "
            "EXITSERVE_SHADOW_MAX_COST_SHARE) or queue_full (the model was busy too long).", ["model", "reason"],
            registry=r,
        )
        self.labels = Counter(
            "exitserve_labels_total", "Delayed labels received, by outcome: correct, wrong, unknown (request id "
            "never seen), expired (forgotten), invalid.", ["model", "outcome"], registry=r,
        )
        self.alert_threshold = Gauge(
            "exitserve_alert_threshold", "The configured thresholds the model-health alert rules compare with "
            "(EXITSERVE_ALERT_*).", ["model", "alert"], registry=r, multiprocess_mode="livemax",
        )
        self.rejected = Counter("exitserve_rejected_total", "Requests refused with 503 (queue full).", ["model"],
                                registry=r)

    def observe_phases(self, route: str, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.request_phase.labels(route, phase).observe(seconds)

    def observe_results(self, model: str, exits: list[int], costs: list[float], deadline_hits: int) -> None:
        self.images.labels(model).inc(len(exits))
        for e in exits:
            self.exits.labels(model, str(e)).inc()
        self.cost.labels(model).inc(sum(costs))
        if deadline_hits:
            self.deadline_hits.labels(model).inc(deadline_hits)

    def observe_batch(self, model: str, size: int, stage_ms: dict[int, float]) -> None:
        self.batch_size.labels(model).observe(size)
        for stage, ms in stage_ms.items():
            self.stage_latency.labels(model, str(stage)).observe(ms / 1000)

    def exposition(self) -> bytes:
        """The text format of every metric, aggregated over the workers when there are several."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        aggregated = CollectorRegistry()
        MultiProcessCollector(aggregated, path=str(self.multiprocess_dir))
        return generate_latest(aggregated)
