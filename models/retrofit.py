"""Retrofit: exit heads after named submodules of a user's trained single-exit classifier.

The family ``exitserve retrofit`` trains (``models.retrofit_train``): the user's backbone,
built by their own factory (``package.module:function``, imported with the working directory
on ``sys.path``: ``models.user_code``), cut by ``torch.fx`` after the named submodules
(``models.cut``), and one small head per cut. The config names the factory and its
arguments, not a weights file: a checkpoint holds backbone and heads together, so
``create_model("retrofit", **config)`` rebuilds the architecture and the checkpoint's state
dict fills every weight, as for the other families.

Heads (``head``; ``head_width`` scales the feature map's channel count for the hidden layer):

* ``conv`` (default): one strided 3x3 convolution + batch norm + ReLU, global average
  pooling, a linear classifier. The strided convolution lets a head see a neighbourhood of
  the feature map before pooling throws the layout away, at a quarter of the cost of an
  unstrided one.
* ``pool``: global average pooling and a linear classifier, the cheapest.
* ``mlp``: global average pooling, then two linear layers with a ReLU between.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from exitserve.models.cut import CutError, cut_at
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.multi_exit import MultiExit
from exitserve.models.registry import ModelConfigError, build_config, register_model
from exitserve.models.user_code import import_object

# ----------------------------------------------------------------------------- heads


class ConvHead(nn.Sequential):
    def __init__(self, channels: int, num_classes: int, width: int) -> None:
        super().__init__(
            nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),  # N x W x H/2 x W/2
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),  # N x W x 1 x 1
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )


class PoolHead(nn.Sequential):
    def __init__(self, channels: int, num_classes: int, width: int) -> None:
        del width  # no hidden layer
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class MlpHead(nn.Sequential):
    def __init__(self, channels: int, num_classes: int, width: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # N x C
            nn.Linear(channels, width), nn.ReLU(inplace=True), nn.Linear(width, num_classes),
        )


HEADS: dict[str, type[nn.Module]] = {"conv": ConvHead, "pool": PoolHead, "mlp": MlpHead}


# ----------------------------------------------------------------------------- the model


@dataclass
class RetrofitConfig:
    backbone: str = ""  # package.module:function building the backbone (an nn.Module returning logits)
    backbone_config: dict[str, Any] = field(default_factory=dict)  # its keyword arguments
    exits: list[str] = field(default_factory=list)  # submodule names, in the order forward computes them
    head: str = "conv"
    head_width: float = 1.0  # hidden width of a conv or mlp head, times the feature map's channels
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28

    def __post_init__(self) -> None:
        if ":" not in self.backbone:
            raise ValueError(f"backbone must be PACKAGE.MODULE:FUNCTION, got {self.backbone!r}")
        if not self.exits:
            raise ValueError("at least one exit")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {self.head!r}")
        if self.head_width <= 0:
            raise ValueError(f"head_width must be positive, got {self.head_width}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_backbone(spec: str, config: dict[str, Any]) -> nn.Module:
    """The user's backbone from its factory; a model that has exits already is refused."""
    module = import_object(spec, "--backbone")(**config)
    if isinstance(module, EarlyExitModel):
        raise ModelConfigError(f"{spec} returns an EarlyExitModel, which has exits already: export it with "
                               "`exitserve export --model` instead")
    if not isinstance(module, nn.Module):
        raise ModelConfigError(f"{spec} returns a {type(module).__name__}, not a torch.nn.Module")
    return module


@torch.no_grad()
def exit_shapes(backbone: nn.Module, exits: list[str], input_shape: tuple[int, int, int]) -> list[tuple[int, ...]]:
    """The shape (batch 2) of the backbone's output at every exit, then of its logits."""
    cut = cut_at(backbone, exits)
    was_training = backbone.training
    backbone.eval()
    try:
        carried: tuple = (torch.zeros(2, *input_shape),)
        shapes = []
        for segment in cut.segments:
            carried, feature = segment(*carried)
            shapes.append(tuple(feature.shape))
    finally:
        backbone.train(was_training)
    return shapes


class Retrofit(MultiExit):
    """The backbone, frozen by its trainer, with one head per exit."""

    def __init__(self, cfg: RetrofitConfig) -> None:
        backbone = build_backbone(cfg.backbone, cfg.backbone_config)
        *features, logits = exit_shapes(backbone, cfg.exits, (cfg.in_channels, cfg.image_size, cfg.image_size))
        if len(logits) != 2 or logits[1] != cfg.num_classes:
            raise ModelConfigError(f"{cfg.backbone} outputs {list(logits)} for 2 images, not 2 x {cfg.num_classes} "
                                   "logits (one per class of the data)")
        heads = {}
        for name, shape in zip(cfg.exits, features):
            if len(shape) != 4:
                raise CutError(f"exit {name}: its output is {list(shape)}; heads take N x C x H x W feature maps")
            width = max(1, round(cfg.head_width * shape[1]))
            heads[name] = HEADS[cfg.head](shape[1], cfg.num_classes, width)
        super().__init__(backbone, heads)
        self.cfg = cfg

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()


def _create_retrofit(**overrides: Any) -> Retrofit:
    # no preset: the config's own defaults, and a backbone and exits that must be given
    return Retrofit(build_config("retrofit", RetrofitConfig, {}, overrides))


# ----------------------------------------------------------------------------- builders


@register_model
def retrofit(**overrides: Any) -> Retrofit:
    """A user's backbone with retrofitted exit heads (``exitserve retrofit`` writes its checkpoints)."""
    return _create_retrofit(**overrides)
