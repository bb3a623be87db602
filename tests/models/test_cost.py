import torch
from torch import nn

from exitserve.models.cost import count_params, exit_costs
from exitserve.models.registry import create_model


def manual_macs(module: nn.Module, run) -> int:
    """Independent count with forward hooks: conv and linear multiply-adds."""
    total = 0

    def hook(m: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            total += output.numel() * k
        elif isinstance(m, nn.Linear):
            total += output.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


def test_exit_costs_match_an_independent_count() -> None:
    model = create_model("msdnet_fmnist").eval()
    costs = exit_costs(model, (1, 28, 28))
    carried = (torch.zeros(1, 1, 28, 28),)
    cumulative = 0
    for cost, stage in zip(costs, model.stages()):
        box = {}

        def run() -> None:
            with torch.no_grad():
                box["out"] = stage(*carried)

        macs = manual_macs(stage, run)
        carried = box["out"][0]
        cumulative += macs
        assert cost.stage_flops == macs
        assert cost.flops == cumulative
    assert costs[-1].params == count_params(model)
    assert [c.carried_shapes for c in costs][0] == [[1, 22, 28, 28], [1, 44, 14, 14], [1, 88, 7, 7]]
    assert costs[-1].carried_shapes == []


def test_costs_grow_and_first_exit_is_cheap() -> None:
    costs = exit_costs(create_model("msdnet_fmnist"), (1, 28, 28))
    flops = [c.flops for c in costs]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert flops[0] < 0.15 * flops[-1]
