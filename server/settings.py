"""All server configuration, from ``EXITSERVE_*`` environment variables or the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_MODEL = "msdnet_fmnist"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXITSERVE_", protected_namespaces=())

    model_repository: Path = DEFAULT_REPOSITORY
    default_model: str | None = None  # default: msdnet_fmnist if present, else the first model
    host: str = "127.0.0.1"
    port: int = 8000

    default_budget: float = Field(0.25, gt=0, le=1, description="mean cost per image, fraction of full depth")
    provider: Literal["auto", "cuda", "cpu"] = "auto"
    io_binding: Literal["auto", "on", "off"] = "auto"
    intra_op_threads: int | None = None

    max_batch_size: int = Field(32, ge=1)
    max_queue_delay_ms: float = Field(0.0, ge=0, description="extra wait for a batch to fill; 0: batches form from what queued during the previous run")
    max_queue_images: int = Field(512, ge=1)
    retry_after_s: int = 1

    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = Field(40_000_000, ge=1, description="decoded width x height, checked before decoding")
    max_files: int = Field(256, ge=1)
    max_top_k: int = 10

    online_budget: bool = Field(True, description="nudge thresholds so the measured mean cost holds the budget")
    warmup_batches: int = 2
