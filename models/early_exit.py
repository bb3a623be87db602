"""The one early-exit interface every model family implements.

A model with exits is a chain of *stages*. Stage ``k`` takes the tensors that stage
``k-1`` carried forward (stage 0 takes the image) and returns the next carried tensors
plus the logits of exit ``k``. The exporter and the server only ever see this interface,
so they never need a branch per model family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from exitserve.errors import ExitserveError


@dataclass(frozen=True)
class ExitSpec:
    """Static description of one exit (costs are filled in by ``models.cost``)."""

    index: int
    name: str


class Stage(nn.Module):
    """One stage: ``forward(*carried) -> (next_carried, logits)``.

    ``body`` maps the carried tensors to the next ones, ``head`` maps those to logits.
    The last stage carries nothing forward.
    """

    def __init__(self, body: nn.Module, head: nn.Module, *, carries_list: bool, is_last: bool) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.carries_list = carries_list
        self.is_last = is_last

    def forward(self, *carried: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        inputs = list(carried) if self.carries_list else carried[0]
        features = self.body(inputs)
        logits = self.head(features)
        if self.is_last:
            return (), logits
        if isinstance(features, torch.Tensor):
            return (features,), logits
        return tuple(features), logits


class EarlyExitModel(nn.Module, ABC):
    """Base class of every multi-exit classifier.

    ``forward`` returns the list of every exit's logits, earliest first.
    """

    @abstractmethod
    def exit_specs(self) -> list[ExitSpec]:
        """The exits, earliest first."""

    @abstractmethod
    def stages(self) -> list[nn.Module]:
        """Split into stages sharing this model's parameters (no copies)."""

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """Builder arguments that rebuild this exact architecture via ``create_model``."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_stages(self.stages(), x)


def run_stages(stages: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Run the stages in sequence and collect every exit's logits."""
    carried: tuple[torch.Tensor, ...] = (x,)
    logits_per_exit = []
    for stage in stages:
        carried, logits = stage(*carried)
        logits_per_exit.append(logits)
    return logits_per_exit


class StageContractError(ExitserveError, ValueError):
    """A model whose stages break the contract the exporter relies on."""


@torch.no_grad()
def check_stages(model: EarlyExitModel, input_shape: tuple[int, int, int], batch: int = 3) -> list[torch.Tensor]:
    """Run ``batch`` random images through the stages and check what the exporter relies
    on: one stage per exit, stages carry batch-first tensors only (the ONNX stages gather
    them on dim 0), the last carries nothing, every exit's logits are N x classes. Returns
    every exit's logits. An odd batch size keeps a carried 1 x ... tensor from passing
    as batch-first by chance."""
    owner = type(model).__name__
    stages, specs = model.stages(), model.exit_specs()
    if len(stages) != len(specs):
        raise StageContractError(f"{owner} has {len(specs)} exits but {len(stages)} stages")
    was_training = model.training
    model.eval()
    carried: tuple = (torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)),)
    logits_per_exit = []
    try:
        for k, (stage, spec) in enumerate(zip(stages, specs)):
            carried, logits = stage(*carried)
            names = getattr(stage, "carried_names", None) or [f"value {i}" for i in range(len(carried))]
            for name, value in zip(names, carried):
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
                    what = f"a {type(value).__name__}" if not isinstance(value, torch.Tensor) else \
                        f"a tensor of shape {list(value.shape)}"
                    raise StageContractError(
                        f"{owner}: stage {k} (exit {spec.name}) hands {name} on as {what}; stages may only hand on "
                        f"tensors whose first dimension is the batch ({batch} here): compute it where it is used")
            if k == len(stages) - 1 and len(carried):
                raise StageContractError(f"{owner}: the last stage hands on {len(carried)} tensors; "
                                         "it must hand on none")
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
                shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise StageContractError(f"{owner}: exit {spec.name} gives {shape}, not N x classes logits")
            logits_per_exit.append(logits)
    finally:
        model.train(was_training)
    return logits_per_exit
