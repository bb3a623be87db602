"""All server configuration, from ``EXITSERVE_*`` environment variables or the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from exitserve.repository.format import DEFAULT_BUDGET

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_MODEL = "msdnet_fmnist"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXITSERVE_", protected_namespaces=())

    model_repository: Path = Field(DEFAULT_REPOSITORY, description="folder of model folders to serve; without "
                                   "--model-repository, `exitserve serve` first exports and calibrates the default "
                                   "model into it if missing")
    default_model: str | None = Field(None, description="model for requests that name none; unset: msdnet_fmnist "
                                      "if present, else the first model")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on (HTTP)")
    grpc_port: int | None = Field(None, ge=1, le=65535, description="also serve the Open Inference Protocol over "
                                  "gRPC on this port (same host; needs the 'grpc' extra); unset: no gRPC")

    default_budget: float = Field(DEFAULT_BUDGET, gt=0, le=1, description="budget for requests that name none: "
                                  "the mean cost per image, as a fraction of full depth")
    provider: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto or cuda: CUDA when it really "
                                                     "loads, else the CPU; cpu: the CPU only")
    io_binding: Literal["auto", "on", "off"] = Field("auto", description="keep the tensors carried between "
                                                     "stages on the device; auto: on when running on CUDA")
    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads per session; "
                                         "unset: each worker's share of the cores minus one for its event loop, "
                                         "at least 1 (default_intra_op_threads: 1 on 2 cores with one worker)")

    workers: int = Field(1, ge=1, description="processes serving one port, each with its own sessions; ONNX "
                         "Runtime's threads are split among them")

    max_batch_size: int = Field(32, ge=1, description="most images per engine call (dynamic batching)")
    max_queue_delay_ms: float = Field(0.0, ge=0, description="extra wait for a batch to fill; 0: batches form from what queued during the previous run")
    max_queue_images: int = Field(512, ge=1, description="images that may wait per model (running ones do not "
                                  "count); beyond it requests get 503 before their body is read")
    retry_after_s: int = Field(1, description="Retry-After seconds on 503")

    max_body_bytes: int = Field(10 * 1024 * 1024, description="largest request body in bytes (413 above)")
    max_pixels: int = Field(40_000_000, ge=1, description="ceiling on decoded width x height, checked before "
                            "decoding (413 above); each model's own limit is derived from its input size, "
                            "max(2048, 64 x input side) squared, up to this")
    max_large_decodes: int = Field(2, ge=1, description="images over 1 megapixel decoded at once, at most (the "
                                   "rest wait their turn)")
    inline_decode_bytes: int = Field(32 * 1024, ge=0, description="uploads up to this size are decoded on the "
                                     "event loop (a thread hop costs more than decoding them); larger ones in a "
                                     "thread, which Pillow lets run beside the loop")
    max_files: int = Field(256, ge=1, description="most files per /classify/batch request (and images per "
                           "Open Inference Protocol request)")
    max_top_k: int = Field(10, description="largest top_k (and never more than the model's classes)")

    latency_slo_ms: float | None = Field(None, gt=0, le=600_000, description="the p99 latency objective for "
                                         "/classify: under pressure the default budget steps down the calibrated "
                                         "curve to hold it; at the floor an admission line limits what is let "
                                         "in, and only there are requests refused (server.slo, server.admission); "
                                         "per model: latency_slo_ms in serving.json")
    slo_floor_budget: float | None = Field(None, gt=0, le=1, description="the lowest budget the objective may "
                                           "step down to; default: the cheapest calibrated point")
    slo_max_wait_ms: float | None = Field(None, gt=0, le=600_000, description="at the floor budget, a request "
                                          "waits in the admission line at most this long before it is refused with "
                                          "503 (server.admission); default: 8 x the objective, at least 200 ms")
    slo_max_waiting: int = Field(4096, ge=1, description="requests that may wait in the admission line at once "
                                 "(a memory bound); a newcomer over it is refused at once")
    slo_lowers_request_budgets: bool = Field(False, description="let the objective lower budgets that requests "
                                             "name themselves too (by default they keep theirs)")
    online_budget: bool = Field(True, description="nudge thresholds so the measured mean cost of default-budget "
                                "traffic holds the budget")
    warmup_batches: int = Field(2, description="warm-up runs of every stage before a model counts as ready")

    monitor_window: int = Field(1000, ge=10, description="recent images the label-free accuracy estimate and the "
                                "exit drift are computed over (server.monitoring)")
    monitor_min_images: int = Field(100, ge=1, description="images the window needs before the estimate and the "
                                    "drift are published")
    shadow_share: float = Field(0.01, ge=0, le=1, description="share of answered images run again to the last "
                                "exit, off the request path and only while the model is idle, to measure how often "
                                "early answers agree with full depth (server.shadow); 0: off")
    shadow_max_cost_share: float = Field(0.02, ge=0, le=1, description="shadow runs may cost at most this share "
                                         "of the compute spent on answers; sampled images over it are skipped")
    shadow_window: int = Field(100, ge=10, description="recent shadowed images the agreement is computed over")
    label_memory: int = Field(10_000, ge=0, description="recent requests whose answers are kept for delayed "
                              "labels (POST /v1/models/{name}/labels); 0: off")
    alert_accuracy_drop: float = Field(0.05, gt=0, le=1, description="an estimated accuracy this far below what "
                                       "calibration expects counts as a drop (exitserve_alert_threshold, the alert)")
    alert_exit_drift: float = Field(0.05, gt=0, le=1, description="exit drift (Jensen-Shannon, base 2) above this "
                                    "counts as drift")
    alert_shadow_agreement: float = Field(0.95, gt=0, le=1, description="shadow agreement below this counts as "
                                          "disagreement")
    switch_interval_us: float = Field(1.0, gt=0, le=100_000, description="Python's thread switch interval "
                                      "(sys.setswitchinterval), in microseconds: how long the event loop may keep "
                                      "the GIL once the inference thread, back from a stage, asks for it. Python's "
                                      "default, 5000, stalls every stage under load (measured in docs/design.md, "
                                      "\"Performance decisions\")")
    phase_metrics: bool = Field(False, description="time each phase of every classify request into "
                                "exitserve_request_phase_seconds (server.http.phases; the loadtest breakdown "
                                "reads it)")

    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a request's headers within "
                                    "this (408, and the connection is closed)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request must send its whole body within this (408)")
    drain_grace_s: float = Field(5.0, ge=0, description="after SIGTERM, /readyz answers 503 this long before "
                                 "the listener closes (load balancers see it)")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="after the grace period, in-flight work gets this "
                                      "long; then it is abandoned and the process exits")
    watchdog_s: float = Field(30.0, gt=0, description="a model with work but no finished batch for this long "
                              "makes /readyz answer 503")

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated; "
                                                     "when set, requests need Authorization: Bearer KEY or "
                                                     "X-API-Key: KEY (401 otherwise)")
    protect_health: bool = Field(False, description="with api_keys: /healthz and /readyz need a key too")
    protect_metrics: bool = Field(False, description="with api_keys: /metrics needs a key too")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated "
                                                         "origins allowed by CORS; empty: CORS off")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line (with "
                                                "request_id); text: plain lines")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


def default_intra_op_threads(workers: int, cores: int | None = None) -> int:
    """ONNX Runtime threads per worker when not set: the cores each worker gets, minus one
    for its event loop (HTTP parsing, decoding, the batcher), at least one. On 2 cores with
    one worker that is 1 thread: measured with wrk, it serves 2.6x the requests at
    concurrency 1 and 2.2x at 32 of a pool spanning both cores, whose threads fight the
    event loop for them (BENCHMARKS.md, "ONNX Runtime threads")."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // workers - 1)
