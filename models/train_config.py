"""``TrainConfig``: the training run's settings, in a module without PyTorch so the
``exitserve`` command can build its ``train`` options (and ``serve --help``) without
importing it. ``models.train`` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exitserve.errors import ExitserveError


class TrainConfigError(ExitserveError, ValueError):
    """Training settings that cannot be used (with this model)."""


@dataclass
class TrainConfig:
    model: str = "msdnet"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    out: str = "runs/msdnet_fmnist.pt"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    exit_weights: list[float] | None = None  # default: 1 for every exit
    distill: float = 0.5  # share of the early exits' loss taken from the last exit's soft labels
    temperature: float = 3.0
    crop_padding: int | None = None  # default: size // 8
    hflip: bool = True
    erasing: float = 0.0
    ema_decay: float = 0.999  # 0 disables the weight average
    ema_warmup: bool = False  # decay min(ema_decay, (1+t)/(10+t)) at update t (see ema_average_fn)
    seed: int = 0
    steps_per_epoch: int | None = None  # cap (for smoke tests); default: a full pass
    model_config: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    init_from: str | None = None  # start from this checkpoint's weights (fine-tuning, warm restarts)
