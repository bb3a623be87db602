"""ESPNetv2 (Mehta et al., CVPR 2019) with early exits.

The backbone and the final classifier follow the reference implementation (EdgeNets,
``model/classification/espnetv2.py`` and ``nn_layers/eesp.py``) module for module, under
its names (``level1``, ``level2_0``, ``level3_0``, ``level3``, ... ``level5``,
``classifier``; inside them ``conv``/``bn``/``act``, ``proj_1x1``, ``spp_dw``, ...), so an
EdgeNets ImageNet checkpoint loads with :func:`load_reference_state_dict`. The early-exit
heads live apart, under ``exit_heads.{i}``.

Exits: after levels 3 and 4 when ``level1`` has stride 1 (small inputs), after levels 2,
3 and 4 with the reference's stride-2 ``level1`` (224x224: levels 1-3 already cost 38% of
the network, so an exit after level 2 is needed to get one at most a third of the cost).
Each early exit is a small copy of the network's own tail (depth-wise 3x3 CBR, grouped
1x1 CBR to twice the level's width, global pool, dropout, linear); the last exit is the
reference's global pool, dropout and ``classifier``. Stage ``k`` runs the levels up to
exit ``k`` and that exit's head.

Departures from the reference, none of which changes the ImageNet network's outputs:

* Input reinforcement. The reference's ``DownSampler`` takes the full image and average-
  pools it in a ``while`` loop until it matches the feature map. Here the image is halved
  with the same pool once per level and handed on, already at the feature map's
  resolution; that is the same chain of pools, and its spatial sizes are static, so it
  traces to ONNX. The downsampled image travels between stages as a carried tensor.
* Small inputs. For ``image_size <= 64`` (Fashion-MNIST 28x28, CIFAR 32x32) ``level1`` has
  stride 1, so the five levels see 28, 14, 7, 4, 2 (or 32, 16, 8, 4, 2) pixels instead of
  collapsing to 1x1 by level 5. Reinforcement takes ``in_channels`` channels (the reference
  hard-codes 3).
* ``level5_0`` keeps the reference's input-reinforcement weights although neither network
  ever feeds it the image, so checkpoints load strictly and parameter counts agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exitserve.models.checkpoint import strip_module_prefix
from exitserve.models.early_exit import EarlyExitModel, ExitSpec, Stage
from exitserve.models.registry import build_config, register_model

# The reference configuration (EdgeNets ``espnetv2_config.py``): channels of level1..level5
# and of the final expansion, per width scale s.
SCALE_CHANNELS: dict[float, tuple[int, int, int, int, int, int]] = {
    0.5: (16, 32, 64, 128, 256, 1024),
    1.0: (32, 64, 128, 256, 512, 1024),
    1.25: (32, 80, 160, 320, 640, 1024),
    1.5: (32, 96, 192, 384, 768, 1024),
    2.0: (32, 128, 256, 512, 1024, 1280),
}
REPEATS = (0, 3, 7, 3)  # stride-1 EESP units after the DownSampler of level 2, 3, 4, 5
RECEPTIVE_LIMITS = (13, 11, 9, 7, 5)  # largest effective kernel of an EESP branch, per level
BRANCHES = 4  # K: parallel dilated branches of an EESP unit
SMALL_INPUT_MAX = 64  # up to this image size level1 has stride 1
EXIT_LEVELS = (2, 3, 4)  # levels an early exit may follow (level 5 ends in the final classifier)


# ----------------------------------------------------------------------------- blocks


class CBR(nn.Module):
    """conv -> BN -> PReLU."""

    def __init__(self, nIn: int, nOut: int, kSize: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(nIn, nOut, kSize, stride=stride, padding=(kSize - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(nOut)
        self.act = nn.PReLU(nOut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class CB(nn.Module):
    """conv -> BN."""

    def __init__(self, nIn: int, nOut: int, kSize: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(nIn, nOut, kSize, stride=stride, padding=(kSize - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(nOut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BR(nn.Module):
    """BN -> PReLU."""

    def __init__(self, nOut: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(nOut)
        self.act = nn.PReLU(nOut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class CDilated(nn.Module):
    """A dilated convolution, padded to keep (or halve, with stride 2) the spatial size."""

    def __init__(self, nIn: int, nOut: int, kSize: int, stride: int = 1, d: int = 1, groups: int = 1) -> None:
        super().__init__()
        padding = (kSize - 1) // 2 * d
        self.conv = nn.Conv2d(nIn, nOut, kSize, stride=stride, padding=padding, bias=False, dilation=d, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def branch_dilations(k: int, r_lim: int) -> list[int]:
    """Dilation of each of the ``k`` 3x3 branches: effective kernels 3, 5, 7, ... up to
    ``r_lim`` (beyond it a branch falls back to 3x3), smallest first."""
    sizes = sorted(3 + 2 * i if 3 + 2 * i <= r_lim else 3 for i in range(k))
    return [(size - 1) // 2 for size in sizes]


class EESP(nn.Module):
    """Extremely Efficient Spatial Pyramid unit: reduce -> split -> transform -> merge.

    A grouped 1x1 projection to ``nOut / k`` channels, ``k`` depth-wise dilated 3x3
    branches fused hierarchically (each branch adds the previous one's output), concat,
    BN + PReLU, a grouped 1x1 expansion, then the residual (when shapes match) and PReLU.
    With ``stride=2, down_method='avg'`` it is the strided half of a DownSampler and returns
    the expansion before the residual and activation.
    """

    def __init__(self, nIn: int, nOut: int, stride: int = 1, k: int = 4, r_lim: int = 7,
                 down_method: str = "esp") -> None:
        super().__init__()
        if down_method not in ("avg", "esp"):
            raise ValueError(f"down_method must be 'avg' or 'esp', got {down_method!r}")
        if nOut % k:
            raise ValueError(f"EESP output channels {nOut} must be divisible by the {k} branches")
        n = nOut // k
        self.stride = stride
        self.proj_1x1 = CBR(nIn, n, 1, stride=1, groups=k)
        self.spp_dw = nn.ModuleList(CDilated(n, n, 3, stride=stride, d=d, groups=n) for d in branch_dilations(k, r_lim))
        self.conv_1x1_exp = CB(nOut, nOut, 1, 1, groups=k)
        self.br_after_cat = BR(nOut)
        self.module_act = nn.PReLU(nOut)  # unused with down_method='avg'; kept for the reference's keys
        self.downAvg = down_method == "avg"
        self.residual = stride == 1 and nIn == nOut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.proj_1x1(x)  # N x nOut/k x H x W
        branches = [self.spp_dw[0](reduced)]
        for conv in self.spp_dw[1:]:
            branches.append(conv(reduced) + branches[-1])  # hierarchical feature fusion
        expanded = self.conv_1x1_exp(self.br_after_cat(torch.cat(branches, 1)))  # N x nOut x H/stride x W/stride
        if self.stride == 2 and self.downAvg:
            return expanded
        if self.residual:
            expanded = expanded + x
        return self.module_act(expanded)


def halve(image: torch.Tensor) -> torch.Tensor:
    """The reference's image pyramid step: 3x3 average pool, stride 2, zero padding 1."""
    return F.avg_pool2d(image, kernel_size=3, stride=2, padding=1)


class DownSampler(nn.Module):
    """Halves the resolution: [avg-pooled input, strided EESP] concatenated, plus the input
    image projected to ``nout`` channels (input reinforcement), then PReLU.

    Unlike the reference, ``image`` arrives already at the output resolution (see
    :func:`halve`). ``inp_reinf`` exists whenever ``reinf`` is set, as in the reference,
    even where the network never feeds an image (``level5_0``).
    """

    def __init__(self, nin: int, nout: int, k: int = 4, r_lim: int = 9, reinf: bool = True,
                 reinf_channels: int = 3) -> None:
        super().__init__()
        self.eesp = EESP(nin, nout - nin, stride=2, k=k, r_lim=r_lim, down_method="avg")
        self.avg = nn.AvgPool2d(kernel_size=3, padding=1, stride=2)
        if reinf:
            self.inp_reinf = nn.Sequential(CBR(reinf_channels, reinf_channels, 3, 1), CB(reinf_channels, nout, 1, 1))
        self.act = nn.PReLU(nout)

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.cat([self.avg(x), self.eesp(x)], 1)  # N x nout x H/2 x W/2
        if image is not None:
            out = out + self.inp_reinf(image)
        return self.act(out)


def _main_features(features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The feature map out of a stage body (which may also carry the downsampled image)."""
    return features if isinstance(features, torch.Tensor) else features[0]


class ExitHead(nn.Module):
    """An early exit, a small copy of the network's own tail: depth-wise 3x3 CBR, grouped
    1x1 CBR to ``width``, global average pool, dropout, linear."""

    def __init__(self, nIn: int, width: int, num_classes: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.conv_dw = CBR(nIn, nIn, 3, 1, groups=nIn)
        self.conv_1x1_exp = CBR(nIn, width, 1, 1, groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x = self.conv_1x1_exp(self.conv_dw(_main_features(features)))  # N x width x h x w
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)  # N x width
        return self.classifier(self.dropout(pooled))


class FinalHead(nn.Module):
    """The reference's head: global average pool, dropout, ``classifier`` (both the
    model's own modules, so they follow its train/eval mode)."""

    def __init__(self, dropout: nn.Dropout, classifier: nn.Linear) -> None:
        super().__init__()
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(_main_features(features), 1).flatten(1)  # N x C
        return self.classifier(self.dropout(pooled))


class LevelRange(nn.Module):
    """A stage body: levels ``first..last`` of the backbone (modules shared, not copied).

    Input: the image (``first == 1``), ``[features, image]`` while a later DownSampler
    still needs the image, else the features alone; the output follows the same rule.
    The image is always kept at the current feature map's resolution.
    """

    def __init__(self, model: "ESPNetv2", first: int, last: int) -> None:
        super().__init__()
        self.stem = model.level1 if first == 1 else None
        self.stem_stride = model.cfg.level1_stride
        levels = range(max(first, 2), last + 1)
        self.downs = nn.ModuleList(getattr(model, f"level{i}_0") for i in levels)
        self.blocks = nn.ModuleList(getattr(model, f"level{i}") if i > 2 else nn.ModuleList() for i in levels)
        self.reinforced = [i <= 4 for i in levels]  # the reference feeds the image to levels 2-4
        self.takes_image = 1 < first <= 4
        self.keeps_image = last < 4

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        image: torch.Tensor | None = None
        if self.stem is not None:
            x = self.stem(inputs)  # N x C1 x H/stride x W/stride
            image = inputs if self.stem_stride == 1 else halve(inputs)
        elif self.takes_image:
            x, image = inputs
        else:
            x = inputs
        for down, blocks, reinforced in zip(self.downs, self.blocks, self.reinforced):
            if reinforced:
                image = halve(image)
                x = down(x, image)  # N x C x h/2 x w/2
            else:
                x = down(x)
            for block in blocks:
                x = block(x)
        return [x, image] if self.keeps_image else x


# ----------------------------------------------------------------------------- config


@dataclass
class ESPNetv2Config:
    """Builder arguments; ``None`` fields are resolved on construction, so ``to_dict``
    always rebuilds the exact architecture."""

    s: float = 1.0  # width scale, a key of SCALE_CHANNELS
    num_classes: int = 1000
    in_channels: int = 3
    image_size: int = 224
    exit_levels: list[int] | None = None  # early exits after these levels; default: see below
    exit_channels: list[int] | None = None  # head width per early exit; default 2x the level's channels
    dropout: float = 0.2  # before every classifier (the reference's p)
    level1_stride: int | None = None  # default: 1 if image_size <= 64, else 2 (the reference)

    def __post_init__(self) -> None:
        if self.s not in SCALE_CHANNELS:
            raise ValueError(f"s={self.s} is not one of the reference scales {sorted(SCALE_CHANNELS)}")
        self.s = float(self.s)
        if self.num_classes < 1 or self.in_channels < 1 or self.image_size < 1:
            raise ValueError("num_classes, in_channels and image_size must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.level1_stride is None:
            self.level1_stride = 1 if self.image_size <= SMALL_INPUT_MAX else 2
        if self.level1_stride not in (1, 2):
            raise ValueError(f"level1_stride must be 1 or 2, got {self.level1_stride}")
        if self.exit_levels is None:
            # After the reference's stride-2 level1, levels 1-3 already cost over a third of
            # the network (38% at 224x224), so the first exit moves up to level 2.
            self.exit_levels = [3, 4] if self.level1_stride == 1 else [2, 3, 4]
        levels = self.exit_levels = [int(level) for level in self.exit_levels]
        if not levels or levels != sorted(set(levels)) or not set(levels) <= set(EXIT_LEVELS):
            raise ValueError(f"exit_levels must be increasing levels from {list(EXIT_LEVELS)}, got {levels}")
        if self.exit_channels is None:
            self.exit_channels = [2 * self.level_channels(level) for level in self.exit_levels]
        self.exit_channels = [int(width) for width in self.exit_channels]
        if len(self.exit_channels) != len(self.exit_levels):
            raise ValueError(f"exit_channels={self.exit_channels} conflicts with exit_levels={self.exit_levels}")
        if any(width < BRANCHES or width % BRANCHES for width in self.exit_channels):
            raise ValueError(f"exit_channels must be positive multiples of {BRANCHES}, got {self.exit_channels}")

    @property
    def channels(self) -> tuple[int, int, int, int, int, int]:
        return SCALE_CHANNELS[self.s]

    def level_channels(self, level: int) -> int:
        """Output channels of level 1..5."""
        return self.channels[level - 1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- model


class ESPNetv2(EarlyExitModel):
    """ESPNetv2 classification net; early exits after ``cfg.exit_levels``, the reference's
    classifier after level 5."""

    def __init__(self, cfg: ESPNetv2Config) -> None:
        super().__init__()
        self.cfg = cfg
        ch, r, k = cfg.channels, RECEPTIVE_LIMITS, BRANCHES
        reinf = dict(reinf=True, reinf_channels=cfg.in_channels)
        self.level1 = CBR(cfg.in_channels, ch[0], 3, cfg.level1_stride)
        self.level2_0 = DownSampler(ch[0], ch[1], k=k, r_lim=r[0], **reinf)
        self.level3_0 = DownSampler(ch[1], ch[2], k=k, r_lim=r[1], **reinf)
        self.level3 = nn.ModuleList(EESP(ch[2], ch[2], 1, k, r[2]) for _ in range(REPEATS[1]))
        self.level4_0 = DownSampler(ch[2], ch[3], k=k, r_lim=r[2], **reinf)
        self.level4 = nn.ModuleList(EESP(ch[3], ch[3], 1, k, r[3]) for _ in range(REPEATS[2]))
        self.level5_0 = DownSampler(ch[3], ch[4], k=k, r_lim=r[3], **reinf)  # never fed the image
        self.level5 = nn.ModuleList(EESP(ch[4], ch[4], 1, k, r[4]) for _ in range(REPEATS[3]))
        self.level5.append(CBR(ch[4], ch[4], 3, 1, groups=ch[4]))  # depth-wise, then grouped 1x1 expansion
        self.level5.append(CBR(ch[4], ch[5], 1, 1, groups=k))
        self.dropout = nn.Dropout(cfg.dropout)  # the reference's F.dropout(p=0.2) before the classifier
        self.classifier = nn.Linear(ch[5], cfg.num_classes)
        self.exit_heads = nn.ModuleList(
            ExitHead(cfg.level_channels(level), width, cfg.num_classes, k, cfg.dropout)
            for level, width in zip(cfg.exit_levels, cfg.exit_channels)
        )
        self.apply(_init_weights)

    def exit_specs(self) -> list[ExitSpec]:
        early = [ExitSpec(index=i, name=f"exit_heads.{i}") for i in range(len(self.exit_heads))]
        return [*early, ExitSpec(index=len(early), name="classifier")]

    def stages(self) -> list[nn.Module]:
        ends = [*self.cfg.exit_levels, 5]
        starts = [1, *(level + 1 for level in self.cfg.exit_levels)]
        heads = [*self.exit_heads, FinalHead(self.dropout, self.classifier)]
        return [
            Stage(LevelRange(self, first, last), head, carries_list=1 < first <= 4, is_last=last == 5)
            for first, last, head in zip(starts, ends, heads)
        ]

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()


def _init_weights(m: nn.Module) -> None:
    """The reference's initialisation: He-normal (fan out) convs, unit BN, small linear."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.001)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def load_reference_state_dict(model: ESPNetv2, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load an EdgeNets ESPNetv2 state dict (e.g. ``espnetv2_s_1.0_imagenet_224x224.pth``).

    A ``module.`` prefix (``nn.DataParallel``) is dropped. The backbone and the final
    classifier load strictly: every key of the reference must name a backbone tensor of
    the same shape and every backbone tensor must be given, else ``ValueError`` and
    nothing is loaded. The early-exit heads keep their current weights (the reference has
    none); their keys are returned, to be trained.
    """
    state = strip_module_prefix(state_dict)
    own = model.state_dict()
    heads = [key for key in own if key.startswith("exit_heads.")]
    backbone = {key: value for key, value in own.items() if not key.startswith("exit_heads.")}
    unexpected = sorted(set(state) - set(backbone))
    missing = sorted(set(backbone) - set(state))
    mismatched = sorted(k for k in set(state) & set(backbone) if state[k].shape != backbone[k].shape)
    if unexpected or missing or mismatched:
        details = [f"{len(unexpected)} unexpected key(s) {unexpected[:5]}", f"{len(missing)} missing {missing[:5]}",
                   f"{len(mismatched)} of another shape {mismatched[:5]}"]
        raise ValueError("not an ESPNetv2 state dict of this configuration: " + "; ".join(details))
    model.load_state_dict(state, strict=False)  # checked above: only the heads are left out
    return heads


# ----------------------------------------------------------------------------- builders

_FMNIST = dict(num_classes=10, in_channels=1, image_size=28)
_IMAGENET = dict(num_classes=1000, in_channels=3, image_size=224)
# s=0.5 keeps a Fashion-MNIST training step (batch 64) near 200 ms on two CPU cores; s=1.0
# takes twice as long, mostly in the backward pass of the dilated depth-wise convolutions.
_SMALL_DEFAULTS = dict(s=0.5, **_FMNIST)


@register_model
def espnetv2(**overrides: Any) -> ESPNetv2:
    """Family default (``exitserve train --model espnetv2``): s=0.5, sized for 28x28
    single-channel input with 10 classes unless told otherwise."""
    return ESPNetv2(build_config("espnetv2", ESPNetv2Config, _SMALL_DEFAULTS, overrides))


@register_model
def espnetv2_imagenet(**overrides: Any) -> ESPNetv2:
    """The reference ImageNet network (3x224x224, 1000 classes), s=1.0 unless given."""
    return ESPNetv2(build_config("espnetv2_imagenet", ESPNetv2Config, dict(s=1.0, **_IMAGENET), overrides, _IMAGENET))


@register_model
def espnetv2_fmnist(**overrides: Any) -> ESPNetv2:
    """The family default on native 28x28 single-channel Fashion-MNIST, 10 classes."""
    return ESPNetv2(build_config("espnetv2_fmnist", ESPNetv2Config, _SMALL_DEFAULTS, overrides, _FMNIST))
