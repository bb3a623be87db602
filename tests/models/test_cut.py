"""Cutting a plain module into stages with torch.fx (models/cut.py, models/multi_exit.py):
the stages compose to exactly the backbone's output, carry exactly what crosses each cut,
share the backbone's parameters, and what cannot be cut says which module and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitserve import MultiExit
from exitserve.models.cut import CutError, cut_points, even_exits
from exitserve.models.early_exit import StageContractError, check_stages, run_stages


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x  # residual: inside the block two tensors are live
        return self.relu(out)


class Net(nn.Module):
    def __init__(self, scale_output: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer2 = nn.Sequential(Block(16), Block(16))
        self.fc = nn.Linear(16, 10)
        self.scale_output = scale_output

    def forward(self, x: torch.Tensor, twice: bool = False) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        logits = self.fc(x.mean((2, 3)))
        return 2 * logits if twice or self.scale_output else logits


def head(channels: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def trained_like(net: nn.Module) -> nn.Module:
    """Batch-norm statistics away from their defaults, so eval mode matters."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_stages_compose_to_the_backbone_and_carry_what_crosses_each_cut() -> None:
    backbone = trained_like(Net())
    model = MultiExit(backbone, exits={"layer1.0.conv": head(8), "layer1": head(8), "layer2.0": head(16)}).eval()
    assert [s.name for s in model.exit_specs()] == ["layer1.0.conv", "layer1", "layer2.0", "fc"]
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits[-1], backbone(x))  # the last exit is the backbone's own output, bit for bit
        stages = model.stages()
        carried, _ = stages[0](x)
        assert len(carried) == 2  # after layer1.0.conv: its output and the block's input (the residual)
        features, output = model.exit_features(x)
        assert torch.equal(output, logits[-1])
        for k, (feature, h) in enumerate(zip(features, model.heads)):
            assert torch.equal(h(feature), logits[k])
    assert [len(c) for c in model._cut.carried] == [2, 1, 1, 0]
    assert torch.equal(torch.stack(run_stages(stages, x)), torch.stack(logits))
    check_stages(model, (1, 12, 12))
    # the stages share the backbone's parameters: no copies, and only backbone and heads in the state dict
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "heads"}
    stage_params = {id(p) for stage in model.stages() for p in stage.parameters()}
    assert stage_params == {id(p) for p in model.parameters()}


def test_other_forward_arguments_are_fixed_to_their_defaults() -> None:
    backbone = trained_like(Net())
    model = MultiExit(backbone, exits={"layer1": head(8)}).eval()
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], backbone(x))  # twice=False, as forward's default


def test_a_module_that_cannot_be_traced_is_named() -> None:
    class DataGate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    backbone = Net()
    backbone.layer2[1] = nn.Sequential(DataGate())
    with pytest.raises(CutError, match=r"cannot cut Net: torch\.fx failed tracing submodule layer2\.1\.0 "
                                       r"\(DataGate\).*control flow"):
        MultiExit(backbone, exits={"layer1": head(8)})


def test_a_wrong_exit_name_lists_the_submodules_that_exist() -> None:
    with pytest.raises(CutError, match=r"Net has no submodule 'layer3'; its submodules: stem, stem\.0, stem\.1, "
                                       r"layer1, layer1\.0, layer1\.0\.conv, .*layer2\.1\.relu, fc$"):
        MultiExit(Net(), exits={"layer1": head(8), "layer3": head(16)})


@pytest.mark.parametrize("exits, message", [
    (["layer2", "layer1"], "list the exits in the order Net.forward computes them: layer1,layer2"),
    (["layer1.1", "layer1"], "layer1.1 and layer1 end at the same point"),
    (["fc"], "fc computes Net's output, which is the last exit already"),
    (["layer1.0.relu", "layer2"], None),  # a leaf module inside a block is fine
])
def test_exits_must_be_distinct_points_in_forward_order(exits: list[str], message: str | None) -> None:
    heads = {name: head(16 if name.startswith("layer2") else 8) for name in exits}
    if message is None:
        MultiExit(Net(), exits=heads)
        return
    with pytest.raises(CutError, match=message):
        MultiExit(Net(), exits=heads)


def test_a_number_crossing_a_cut_is_refused_naming_it() -> None:
    class Reshaping(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]  # taken early, used after the cut: a Python int, not a tensor
            x = self.layer2(self.down(self.layer1(self.stem(x))))
            return self.fc(x.mean((2, 3)).reshape(n, -1))

    model = MultiExit(Reshaping(), exits={"layer1": head(8)})
    with pytest.raises(StageContractError, match=r"stage 0 \(exit layer1\) hands getitem on as a int"):
        check_stages(model, (1, 12, 12))


def test_auto_exits_sit_at_even_shares_of_the_flops() -> None:
    points = cut_points(Net(), (1, 16, 16))
    names = [p.name for p in points]
    # blocks, activations and pooling only, one feature map crossing: never inside a residual block,
    # never between a convolution and its normalisation
    assert names == ["stem", "layer1.0", "layer1", "layer2.0", "layer2"]
    fractions = [p.flops_fraction for p in points]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] <= 1
    assert all(p.shape[:2] == (1, 8 if p.name.startswith(("stem", "layer1")) else 16) for p in points)
    chosen = even_exits(points, 2)
    for target, point in zip((1 / 3, 2 / 3), chosen):
        assert abs(point.flops_fraction - target) == min(abs(p.flops_fraction - target) for p in points)
    with pytest.raises(CutError, match="only 5 clean cut points"):
        even_exits(points, 6)


def test_weights_loaded_after_the_cut_are_the_ones_the_stages_use() -> None:
    """The cut is made when the model is built, before a factory's caller loads its weights:
    parameters and buffers that forward reads directly must be read at run time, not frozen
    into the graph at trace time."""

    class Scaled(Net):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1, 16, 1, 1))
            self.register_buffer("shift", torch.zeros(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layer2(self.down(self.layer1(self.stem(x)))) * self.gain + self.shift[None, :, None, None]
            return self.fc(x.mean((2, 3)))

    backbone = Scaled().eval()
    model = MultiExit(backbone, exits={"layer1": head(8)}).eval()
    state = {k: v + 0.5 if k in ("gain", "shift") else v for k, v in backbone.state_dict().items()}
    model.backbone.load_state_dict(state)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], backbone(x))
    assert not [name for name in vars(backbone) if name.startswith("_tensor_constant")]  # nothing added to it
