"""Cost of every stage and exit: multiply-adds and parameters.

Multiply-adds are counted by ``torch.utils.flop_counter`` (convolutions and matrix
products; it reports 2 FLOPs per multiply-add, we store multiply-adds as the MSDNet paper
does). Cumulative cost of exit k counts everything the server runs to reach it: stages
0..k, the heads of earlier exits included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from exitserve.models.early_exit import EarlyExitModel


@dataclass(frozen=True)
class ExitCost:
    index: int
    name: str
    stage_flops: int  # multiply-adds of this stage (body + its exit head)
    stage_params: int
    flops: int  # cumulative multiply-adds to reach this exit, earlier heads included
    params: int  # cumulative parameters
    carried_shapes: list[list[int]]  # shapes (batch 1) this stage hands to the next

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def exit_costs(model: EarlyExitModel, input_shape: tuple[int, int, int]) -> list[ExitCost]:
    """Run one image (C x H x W) through the stages and measure each one."""
    was_training = model.training
    model.eval()
    carried: tuple[torch.Tensor, ...] = (torch.zeros(1, *input_shape),)
    costs: list[ExitCost] = []
    total_flops = total_params = 0
    try:
        for spec, stage in zip(model.exit_specs(), model.stages()):
            counter = FlopCounterMode(display=False)
            with counter:
                carried, _ = stage(*carried)
            stage_flops = counter.get_total_flops() // 2
            stage_params = count_params(stage)
            total_flops += stage_flops
            total_params += stage_params
            costs.append(
                ExitCost(
                    index=spec.index,
                    name=spec.name,
                    stage_flops=stage_flops,
                    stage_params=stage_params,
                    flops=total_flops,
                    params=total_params,
                    carried_shapes=[list(t.shape) for t in carried],
                )
            )
    finally:
        model.train(was_training)
    return costs
