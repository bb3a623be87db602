"""MSDNet: Multi-Scale Dense Networks (Huang et al., ICLR 2018).

Module names follow the reference PyTorch implementation (MSDNet-PyTorch) so that its
checkpoints load with ``strict=True``: ``blocks.{i}`` hold the multi-scale dense layers,
``classifier.{i}`` the exit after block ``i`` on the coarsest scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from exitserve.models.early_exit import EarlyExitModel, ExitSpec, Stage
from exitserve.models.registry import build_config, register_model


# ----------------------------------------------------------------------------- blocks


class ConvBasic(nn.Module):
    """conv -> BN -> ReLU."""

    def __init__(self, nIn: int, nOut: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(nIn, nOut, kernel_size=kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(nOut),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    """Optional 1x1 bottleneck, then a 3x3 conv ('normal': stride 1, 'down': stride 2)."""

    def __init__(self, nIn: int, nOut: int, type: str, bottleneck: bool, bnWidth: int) -> None:
        super().__init__()
        if type not in ("normal", "down"):
            raise ValueError(f"ConvBN type must be 'normal' or 'down', got {type!r}")
        layers: list[nn.Module] = []
        inner = nIn
        if bottleneck:
            inner = min(nIn, bnWidth * nOut)
            layers += [nn.Conv2d(nIn, inner, 1, 1, 0, bias=False), nn.BatchNorm2d(inner), nn.ReLU(True)]
        stride = 1 if type == "normal" else 2
        layers += [nn.Conv2d(inner, nOut, 3, stride, 1, bias=False), nn.BatchNorm2d(nOut), nn.ReLU(True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDownNormal(nn.Module):
    """Output at scale s from the finer scale s-1 (strided) and scale s itself."""

    def __init__(self, nIn1: int, nIn2: int, nOut: int, bottleneck: bool, bnWidth1: int, bnWidth2: int) -> None:
        super().__init__()
        self.conv_down = ConvBN(nIn1, nOut // 2, "down", bottleneck, bnWidth1)
        self.conv_normal = ConvBN(nIn2, nOut // 2, "normal", bottleneck, bnWidth2)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        # dense connectivity: keep the input, append the new features
        return torch.cat([x[1], self.conv_down(x[0]), self.conv_normal(x[1])], dim=1)


class ConvNormal(nn.Module):
    """Output at the finest kept scale from that scale alone."""

    def __init__(self, nIn: int, nOut: int, bottleneck: bool, bnWidth: int) -> None:
        super().__init__()
        self.conv_normal = ConvBN(nIn, nOut, "normal", bottleneck, bnWidth)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        first = x if isinstance(x, torch.Tensor) else x[0]
        return torch.cat([first, self.conv_normal(first)], dim=1)


class MSDNFirstLayer(nn.Module):
    """The stem: one feature map per scale, each half the resolution of the previous."""

    def __init__(self, nIn: int, nOut: int, cfg: "MSDNetConfig") -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        width = nOut * cfg.grFactor[0]
        if cfg.stem == "imagenet":
            self.layers.append(
                nn.Sequential(
                    nn.Conv2d(nIn, width, 7, 2, 3),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1),
                )
            )
        else:
            self.layers.append(ConvBasic(nIn, width, kernel=3, stride=1, padding=1))
        for s in range(1, cfg.nScales):
            next_width = nOut * cfg.grFactor[s]
            self.layers.append(ConvBasic(width, next_width, kernel=3, stride=2, padding=1))
            width = next_width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        scales = []
        for layer in self.layers:
            x = layer(x)
            scales.append(x)
        return scales  # finest first: N x C_s x H/2^s x W/2^s


class MSDNLayer(nn.Module):
    """One multi-scale dense layer; may discard the finest input scale."""

    def __init__(self, nIn: int, nOut: int, cfg: "MSDNetConfig", inScales: int, outScales: int) -> None:
        super().__init__()
        self.nIn = nIn
        self.nOut = nOut
        self.inScales = inScales
        self.outScales = outScales
        self.nScales = cfg.nScales
        self.discard = inScales - outScales
        self.offset = cfg.nScales - outScales
        gr, bn = cfg.grFactor, cfg.bnFactor
        self.layers = nn.ModuleList()
        off = self.offset
        if self.discard > 0:
            self.layers.append(
                ConvDownNormal(nIn * gr[off - 1], nIn * gr[off], nOut * gr[off], cfg.bottleneck, bn[off - 1], bn[off])
            )
        else:
            self.layers.append(ConvNormal(nIn * gr[off], nOut * gr[off], cfg.bottleneck, bn[off]))
        for s in range(off + 1, cfg.nScales):
            self.layers.append(
                ConvDownNormal(nIn * gr[s - 1], nIn * gr[s], nOut * gr[s], cfg.bottleneck, bn[s - 1], bn[s])
            )

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.discard > 0:
            inputs = [[x[s - 1], x[s]] for s in range(1, self.outScales + 1)]
        else:
            inputs = [[x[0]]] + [[x[s - 1], x[s]] for s in range(1, self.outScales)]
        return [layer(inp) for layer, inp in zip(self.layers, inputs)]


class ParallelModule(nn.Module):
    """Applies the i-th module to the i-th tensor."""

    def __init__(self, parallel_modules: list[nn.Module]) -> None:
        super().__init__()
        self.m = nn.ModuleList(parallel_modules)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [module(t) for module, t in zip(self.m, x)]


class ClassifierModule(nn.Module):
    """An exit: convolutions on the coarsest scale, pooling, a linear layer."""

    def __init__(self, m: nn.Module, channel: int, num_classes: int) -> None:
        super().__init__()
        self.m = m
        self.linear = nn.Linear(channel, num_classes)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        pooled = self.m(x[-1])  # N x C x 1 x 1
        return self.linear(pooled.flatten(1))


# ----------------------------------------------------------------------------- config

Stem = Literal["cifar", "imagenet"]


@dataclass
class MSDNetConfig:
    """The reference implementation's hyperparameters, under its names."""

    nBlocks: int = 5
    stepmode: Literal["even", "lin_grow"] = "lin_grow"
    step: int = 1
    base: int = 1
    nChannels: int = 16
    growthRate: int = 6
    grFactor: list[int] = field(default_factory=lambda: [1, 2, 4])
    bnFactor: list[int] = field(default_factory=lambda: [1, 2, 4])
    nScales: int = 3
    prune: Literal["min", "max"] = "max"
    reduction: float = 0.5
    bottleneck: bool = True
    data: str = "cifar10"
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32

    def __post_init__(self) -> None:
        self.grFactor = _factor_list(self.grFactor)
        self.bnFactor = _factor_list(self.bnFactor)
        if self.nScales != len(self.grFactor) or self.nScales != len(self.bnFactor):
            raise ValueError(
                f"nScales={self.nScales} conflicts with grFactor={self.grFactor} / bnFactor={self.bnFactor}"
            )
        if self.stepmode not in ("even", "lin_grow"):
            raise ValueError(f"stepmode must be 'even' or 'lin_grow', got {self.stepmode!r}")
        if self.prune not in ("min", "max"):
            raise ValueError(f"prune must be 'min' or 'max', got {self.prune!r}")
        if self.nBlocks < 1 or self.base < 1 or self.step < 1:
            raise ValueError("nBlocks, base and step must be positive")
        expected_classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}.get(self.data.lower())
        if expected_classes is not None and self.num_classes != expected_classes:
            raise ValueError(f"data={self.data!r} has {expected_classes} classes, not num_classes={self.num_classes}")

    @property
    def stem(self) -> Stem:
        return "imagenet" if self.data.lower() == "imagenet" else "cifar"

    @property
    def steps(self) -> list[int]:
        growth = [self.step if self.stepmode == "even" else self.step * i + 1 for i in range(1, self.nBlocks)]
        return [self.base, *growth]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _factor_list(value: list[int] | str) -> list[int]:
    """Accepts the reference's '1-2-4' strings as well as lists."""
    if isinstance(value, str):
        return [int(v) for v in value.split("-")]
    return [int(v) for v in value]


# ----------------------------------------------------------------------------- model


class MSDNet(EarlyExitModel):
    """A classifier after each of ``nBlocks`` blocks; all exits read the coarsest scale."""

    def __init__(self, cfg: MSDNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.nBlocks = cfg.nBlocks
        self.steps = cfg.steps
        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        n_layers_all = sum(self.steps)
        n_layer_curr = 0
        nIn = cfg.nChannels
        for i in range(cfg.nBlocks):
            block, nIn = self._build_block(nIn, self.steps[i], n_layers_all, n_layer_curr)
            self.blocks.append(block)
            n_layer_curr += self.steps[i]
            self.classifier.append(self._build_classifier(nIn * cfg.grFactor[-1]))
        self.apply(_init_weights)

    def _build_block(self, nIn: int, step: int, n_layers_all: int, n_layer_curr: int) -> tuple[nn.Sequential, int]:
        cfg = self.cfg
        layers: list[nn.Module] = [MSDNFirstLayer(cfg.in_channels, nIn, cfg)] if n_layer_curr == 0 else []
        for _ in range(step):
            n_layer_curr += 1
            inScales, outScales = _scales_of_layer(cfg, n_layer_curr, n_layers_all)
            layers.append(MSDNLayer(nIn, cfg.growthRate, cfg, inScales, outScales))
            nIn += cfg.growthRate
            if cfg.reduction > 0 and _has_transition(cfg, inScales, outScales, n_layer_curr, n_layers_all):
                nOut = math.floor(cfg.reduction * nIn)
                offset = cfg.nScales - outScales
                layers.append(
                    ParallelModule(
                        [
                            ConvBasic(nIn * cfg.grFactor[offset + s], nOut * cfg.grFactor[offset + s], 1, 1, 0)
                            for s in range(outScales)
                        ]
                    )
                )
                nIn = nOut
        return nn.Sequential(*layers), nIn

    def _build_classifier(self, nIn: int) -> ClassifierModule:
        if self.cfg.stem == "imagenet":
            convs = nn.Sequential(ConvBasic(nIn, nIn, 3, 2, 1), ConvBasic(nIn, nIn, 3, 2, 1), nn.AvgPool2d(2))
            return ClassifierModule(convs, nIn, self.cfg.num_classes)
        inter = 128
        convs = nn.Sequential(ConvBasic(nIn, inter, 3, 2, 1), ConvBasic(inter, inter, 3, 2, 1), nn.AvgPool2d(2))
        return ClassifierModule(convs, inter, self.cfg.num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        features: Any = x  # N x C x H x W, then one tensor per scale
        for block, head in zip(self.blocks, self.classifier):
            features = block(features)
            outputs.append(head(features))
        return outputs

    def exit_specs(self) -> list[ExitSpec]:
        return [ExitSpec(index=i, name=f"classifier.{i}") for i in range(self.nBlocks)]

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def stages(self) -> list[nn.Module]:
        last = self.nBlocks - 1
        return [
            Stage(block, head, carries_list=i > 0, is_last=i == last)
            for i, (block, head) in enumerate(zip(self.blocks, self.classifier))
        ]


def _scales_of_layer(cfg: MSDNetConfig, n_layer_curr: int, n_layers_all: int) -> tuple[int, int]:
    """How many scales layer ``n_layer_curr`` (1-based) reads and writes."""
    if cfg.prune == "min":
        return min(cfg.nScales, n_layers_all - n_layer_curr + 2), min(cfg.nScales, n_layers_all - n_layer_curr + 1)
    interval = math.ceil(n_layers_all / cfg.nScales)
    in_scales = cfg.nScales - math.floor(max(0, n_layer_curr - 2) / interval)
    out_scales = cfg.nScales - math.floor((n_layer_curr - 1) / interval)
    return in_scales, out_scales


def _has_transition(cfg: MSDNetConfig, in_scales: int, out_scales: int, n_layer_curr: int, n_layers_all: int) -> bool:
    if cfg.prune == "max":
        return in_scales > out_scales
    return n_layer_curr in (math.floor(n_layers_all / 3), math.floor(2 * n_layers_all / 3))


def _init_weights(m: nn.Module) -> None:
    """The reference's initialisation: He-normal convs, unit BN, zero linear bias."""
    if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


def _create_msdnet(builder: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> MSDNet:
    return MSDNet(build_config(builder, MSDNetConfig, defaults, overrides))


# ----------------------------------------------------------------------------- builders

_BUDGETED = dict(nBlocks=5, stepmode="lin_grow", step=1, base=1, nChannels=16, growthRate=6,
                 grFactor=[1, 2, 4], bnFactor=[1, 2, 4], nScales=3, prune="max", reduction=0.5, bottleneck=True)
_ANYTIME = dict(_BUDGETED, nBlocks=7, stepmode="even", step=2, base=4)


@register_model
def msdnet(**overrides: Any) -> MSDNet:
    """Family default: the CIFAR budgeted-batch configuration, any input size and class count."""
    return _create_msdnet("msdnet", _BUDGETED, overrides)


@register_model
def msdnet_cifar100_budget(**overrides: Any) -> MSDNet:
    return _create_msdnet("msdnet_cifar100_budget", dict(_BUDGETED, data="cifar100", num_classes=100), overrides)


@register_model
def msdnet_cifar100_anytime(**overrides: Any) -> MSDNet:
    return _create_msdnet("msdnet_cifar100_anytime", dict(_ANYTIME, data="cifar100", num_classes=100), overrides)


@register_model
def msdnet_imagenet(**overrides: Any) -> MSDNet:
    return _create_msdnet(
        "msdnet_imagenet",
        dict(nBlocks=5, stepmode="even", step=4, base=4, nChannels=32, growthRate=16, grFactor=[1, 2, 4, 4],
             bnFactor=[1, 2, 4, 4], nScales=4, prune="max", reduction=0.5, bottleneck=True, data="imagenet",
             num_classes=1000, in_channels=3, image_size=224),
        overrides,
    )


@register_model
def msdnet_fmnist(**overrides: Any) -> MSDNet:
    """The budgeted configuration on native 28x28 single-channel Fashion-MNIST input."""
    defaults = dict(_BUDGETED, data="fashion-mnist", num_classes=10, in_channels=1, image_size=28)
    return _create_msdnet("msdnet_fmnist", defaults, overrides)
