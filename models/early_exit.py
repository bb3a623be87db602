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
