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


@dataclass
class RetrofitTrainConfig:
    """``exitserve retrofit``'s settings (``models.retrofit_train``)."""

    backbone: str = ""  # package.module:function returning the trained classifier (an nn.Module)
    weights: str = ""  # its state dict, as torch.save(model.state_dict(), path) wrote it
    exits: str = "auto:3"  # NAME,NAME,... (submodules, in forward's order) or auto:K (even shares of the FLOPs)
    out: str = "runs/retrofit.pt"
    backbone_config: dict[str, Any] = field(default_factory=dict)  # the factory's keyword arguments
    data: str | None = None  # fashion-mnist[:PATH], cifar10:PATH, cifar100:PATH, image-folder:PATH; default:
    # the dataset of the backbone's exitserve_metadata, else fashion-mnist
    head: str = "conv"  # conv | pool | mlp (models.retrofit)
    head_width: float = 1.0
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.2  # heads from scratch on fixed features: 0.05 reached 64% / 73% where 0.2 reached 70% / 75%
    momentum: float = 0.9
    weight_decay: float = 5e-4
    distill: float = 0.5  # share of each head's loss from the backbone's own soft labels
    temperature: float = 3.0
    crop_padding: int | None = None  # default: size // 8
    hflip: bool = True
    seed: int = 0
    steps_per_epoch: int | None = None
    threads: int | None = None
    # the backbone's input, when its factory's exitserve_metadata and the dataset do not say
    input_size: int | None = None
    channels: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    labels: list[str] | None = None

    def exit_request(self) -> tuple[list[str], int | None]:
        """(names, None) for NAME,NAME,...; ([], K) for auto:K."""
        text = self.exits.strip()
        if text.startswith("auto:"):
            try:
                count = int(text.removeprefix("auto:"))
            except ValueError:
                count = 0
            if count < 1:
                raise TrainConfigError(f"--exits {self.exits!r}: auto:K needs a number of exits K >= 1")
            return [], count
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise TrainConfigError("--exits: name the submodules to put exits after (NAME,NAME,...) or auto:K")
        return names, None
