"""GoogLeNet / Inception v1 (Szegedy et al., "Going Deeper with Convolutions", 2014).

The two auxiliary classifiers of the paper (after inception4a and inception4d) are exits 0
and 1, the main classifier is exit 2. Unlike torchvision, the auxiliary heads are exits in
eval mode too: ``forward`` always returns ``[aux1, aux2, fc]`` logits.

Module names follow torchvision's ``models/googlenet.py`` (``conv1`` .. ``inception5b``,
``aux1``/``aux2`` with ``conv``/``fc1``/``fc2``, ``avgpool``, ``dropout``, ``fc``, inner
``branch1`` .. ``branch4``, ``conv``/``bn``), so a torchvision GoogLeNet state dict with its
auxiliary weights loads into ``googlenet_imagenet()`` with ``strict=True``. Decisions:

- **branch3 kernel.** torchvision's "5x5" branch uses a 3x3 kernel (a known bug kept for
  weight compatibility, pytorch/vision#906); its parameter count (6,624,904 without the
  auxiliary heads) depends on it. The kernel is ``branch3_kernel`` in the config:
  3 in ``googlenet_imagenet`` so torchvision weights load, 5 (the paper) in the family
  default and the small-input builders, which are trained from scratch.
- **Auxiliary pooling.** torchvision pools the auxiliary input with
  ``adaptive_avg_pool2d(x, 4)``; 14 -> 4 is not a divisible pooling and does not export
  to ONNX. ``AdaptiveAvgPoolMatrix`` computes exactly the same windows as two constant
  averaging matrices (``P @ x @ P^T``, two MatMuls in ONNX). ``AvgPool2d(5, stride=3)``
  (the paper's pooling) is *not* equivalent: adaptive 14 -> 4 averages the 4-wide windows
  starting at 0, 3, 7, 10, not 5-wide windows at 0, 3, 6, 9.
- **Auxiliary heads in eval mode** compute what torchvision's heads compute in training
  mode without dropout (pool, 1x1 conv, fc1 + ReLU, dropout, fc2).
- **transform_input** (default False) is torchvision's re-standardisation of
  ImageNet-normalised input to the (x - 0.5) / 0.5 scaling its ported weights expect; it
  runs at the start of stage 0 and needs three input channels.
- **Small inputs** (``stem="small"``: 28x28 Fashion-MNIST, 32x32 CIFAR): a 3x3 stride-1
  ``conv1`` replaces the 7x7 stride-2 one, the stem keeps its two 3x3 stride-2 max pools
  (input / 4), ``maxpool3`` is an identity so inception 3 and 4 share one resolution
  (7x7 at 28x28), ``maxpool4`` halves it for inception 5 (4x4). With inception 3 at 14x14
  and 4 at 7x7 the first exit would cost ~45% of the network (inception3b is the most
  expensive block per pixel); sharing the resolution brings it under a third. A width
  multiplier ``width`` scales every channel count (aux heads included) so the network
  trains on a 2-core CPU; the Fashion-MNIST default is ``width=0.25``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from exitserve.models.early_exit import EarlyExitModel, ExitSpec, Stage
from exitserve.models.registry import build_config, register_model

# ----------------------------------------------------------------------------- blocks


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN (eps 0.001) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four parallel branches, concatenated along channels.

    branch1: 1x1; branch2: 1x1 reduction -> 3x3; branch3: 1x1 reduction -> k x k (5 in the
    paper, 3 in torchvision); branch4: 3x3 max pool -> 1x1 projection.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        branch3_kernel: int = 5,
    ) -> None:
        super().__init__()
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=branch3_kernel, padding=branch3_kernel // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)  # N x out_channels x H x W


@lru_cache(maxsize=64)
def _pool_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """out_size x in_size matrix whose row i averages adaptive pooling's window i."""
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.float()


class AdaptiveAvgPoolMatrix(nn.Module):
    """``F.adaptive_avg_pool2d(x, output_size)`` as ``P_h @ x @ P_w^T`` with constant matrices.

    The same windows as adaptive pooling for every input size (equal up to float rounding),
    and it exports to ONNX as two MatMuls where a non-divisible adaptive pooling does not.
    """

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])  # constants in a traced graph
        rows = _pool_matrix(height, self.output_size).to(device=x.device, dtype=x.dtype)
        cols = _pool_matrix(width, self.output_size).to(device=x.device, dtype=x.dtype)
        return torch.matmul(torch.matmul(rows, x), cols.t())  # N x C x out x out

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class InceptionAux(nn.Module):
    """Auxiliary classifier: pool to 4x4 -> 1x1 conv -> fc1 + ReLU -> dropout -> fc2."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        conv_channels: int = 128,
        hidden: int = 1024,
        pool_size: int = 4,
        dropout: float = 0.7,
    ) -> None:
        super().__init__()
        self.pool = AdaptiveAvgPoolMatrix(pool_size)
        self.conv = BasicConv2d(in_channels, conv_channels, kernel_size=1)
        self.fc1 = nn.Linear(conv_channels * pool_size * pool_size, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # aux1: N x 512 x 14 x 14, aux2: N x 528 x 14 x 14 (ImageNet)
        x = self.pool(x)
        # N x 512 x 4 x 4
        x = self.conv(x)
        # N x 128 x 4 x 4
        x = torch.flatten(x, 1)
        # N x 2048
        x = F.relu(self.fc1(x), inplace=True)
        # N x 1024
        x = self.dropout(x)
        return self.fc2(x)  # N x num_classes


class MainHead(nn.Module):
    """The main classifier: global average pool -> dropout -> fc (shares the model's modules)."""

    def __init__(self, avgpool: nn.Module, dropout: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.avgpool = avgpool
        self.dropout = dropout
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)  # N x 1024
        return self.fc(self.dropout(x))  # N x num_classes


class TransformInput(nn.Module):
    """torchvision's ``transform_input``: ImageNet mean/std normalisation -> (x - 0.5) / 0.5."""

    def __init__(self) -> None:
        super().__init__()
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
        self.register_buffer("scale", (std / 0.5).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - 0.5) / 0.5).float().view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


# ----------------------------------------------------------------------------- config

StemKind = Literal["imagenet", "small"]


@dataclass
class GoogLeNetConfig:
    """Builder arguments; ``config_dict()`` returns them and they rebuild the model."""

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    stem: StemKind = "small"
    width: float = 0.25  # multiplies every channel count, auxiliary heads included
    branch3_kernel: int = 5  # 5 in the paper, 3 in torchvision (its weights need it)
    aux_pool: int = 4  # auxiliary heads pool their input to aux_pool x aux_pool
    dropout: float = 0.2  # before the main fc
    dropout_aux: float = 0.5  # before each auxiliary fc2 (0.7 in the paper and torchvision)
    transform_input: bool = False

    def __post_init__(self) -> None:
        if self.stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.branch3_kernel < 1 or self.branch3_kernel % 2 == 0:
            raise ValueError(f"branch3_kernel must be a positive odd number, got {self.branch3_kernel}")
        if self.num_classes < 1 or self.in_channels < 1 or self.aux_pool < 1:
            raise ValueError("num_classes, in_channels and aux_pool must be positive")
        for name in ("dropout", "dropout_aux"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.transform_input and self.in_channels != 3:
            raise ValueError(
                f"transform_input=True needs 3 input channels, conflicts with in_channels={self.in_channels}"
            )
        feature_sizes(self)  # raises when image_size is too small for the stem and pools

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pooled(size: int, kernel: int, stride: int) -> int:
    """Output size of a ceil-mode max pool without padding (PyTorch's rule)."""
    if size < kernel:
        raise ValueError(f"a {size}x{size} feature map is smaller than a {kernel}x{kernel} pool")
    out = math.ceil((size - kernel) / stride) + 1
    return out - 1 if (out - 1) * stride >= size else out


def feature_sizes(cfg: GoogLeNetConfig) -> dict[str, int]:
    """Spatial size of the feature maps reaching inception 3, 4 and 5 (image_size in)."""
    size = cfg.image_size
    if cfg.stem == "imagenet":
        size = (size + 2 * 3 - 7) // 2 + 1  # conv1, 7x7 stride 2
    stem_out = _pooled(_pooled(size, 3, 2), 3, 2)  # maxpool1, maxpool2
    inception4 = _pooled(stem_out, 3, 2) if cfg.stem == "imagenet" else stem_out  # maxpool3
    inception5 = _pooled(inception4, 2, 2)  # maxpool4
    return {"inception3": stem_out, "inception4": inception4, "inception5": inception5}


def _scaled(channels: int, width: float) -> int:
    return max(1, int(channels * width + 0.5))


# ----------------------------------------------------------------------------- model


class GoogLeNet(EarlyExitModel):
    """The 22-layer network; exits: ``aux1`` (after 4a), ``aux2`` (after 4d), ``fc``."""

    def __init__(self, cfg: GoogLeNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.branch3_kernel

        def c(channels: int) -> int:
            return _scaled(channels, cfg.width)

        self.input_transform: nn.Module = TransformInput() if cfg.transform_input else nn.Identity()
        if cfg.stem == "imagenet":
            self.conv1 = BasicConv2d(cfg.in_channels, c(64), kernel_size=7, stride=2, padding=3)
        else:
            self.conv1 = BasicConv2d(cfg.in_channels, c(64), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(c(64), c(64), kernel_size=1)
        self.conv3 = BasicConv2d(c(64), c(192), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        # the paper's Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj
        self.inception3a = Inception(c(192), c(64), c(96), c(128), c(16), c(32), c(32), k)
        self.inception3b = Inception(self.inception3a.out_channels, c(128), c(128), c(192), c(32), c(96), c(64), k)
        self.maxpool3: nn.Module = (
            nn.MaxPool2d(3, stride=2, ceil_mode=True) if cfg.stem == "imagenet" else nn.Identity()
        )

        self.inception4a = Inception(self.inception3b.out_channels, c(192), c(96), c(208), c(16), c(48), c(64), k)
        self.inception4b = Inception(self.inception4a.out_channels, c(160), c(112), c(224), c(24), c(64), c(64), k)
        self.inception4c = Inception(self.inception4b.out_channels, c(128), c(128), c(256), c(24), c(64), c(64), k)
        self.inception4d = Inception(self.inception4c.out_channels, c(112), c(144), c(288), c(32), c(64), c(64), k)
        self.inception4e = Inception(self.inception4d.out_channels, c(256), c(160), c(320), c(32), c(128), c(128), k)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = Inception(self.inception4e.out_channels, c(256), c(160), c(320), c(32), c(128), c(128), k)
        self.inception5b = Inception(self.inception5a.out_channels, c(384), c(192), c(384), c(48), c(128), c(128), k)

        aux = dict(conv_channels=c(128), hidden=c(1024), pool_size=cfg.aux_pool, dropout=cfg.dropout_aux)
        self.aux1 = InceptionAux(self.inception4a.out_channels, cfg.num_classes, **aux)
        self.aux2 = InceptionAux(self.inception4d.out_channels, cfg.num_classes, **aux)

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(self.inception5b.out_channels, cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # shapes for googlenet_imagenet; the small stem gives 7x7 at inception 3 and 4, 4x4 at 5
        x = self.input_transform(x)
        # N x 3 x 224 x 224
        x = self.conv1(x)
        # N x 64 x 112 x 112
        x = self.maxpool1(x)
        # N x 64 x 56 x 56
        x = self.conv2(x)
        # N x 64 x 56 x 56
        x = self.conv3(x)
        # N x 192 x 56 x 56
        x = self.maxpool2(x)
        # N x 192 x 28 x 28
        x = self.inception3a(x)
        # N x 256 x 28 x 28
        x = self.inception3b(x)
        # N x 480 x 28 x 28
        x = self.maxpool3(x)
        # N x 480 x 14 x 14
        x = self.inception4a(x)
        # N x 512 x 14 x 14
        aux1 = self.aux1(x)
        x = self.inception4b(x)
        # N x 512 x 14 x 14
        x = self.inception4c(x)
        # N x 512 x 14 x 14
        x = self.inception4d(x)
        # N x 528 x 14 x 14
        aux2 = self.aux2(x)
        x = self.inception4e(x)
        # N x 832 x 14 x 14
        x = self.maxpool4(x)
        # N x 832 x 7 x 7
        x = self.inception5a(x)
        # N x 832 x 7 x 7
        x = self.inception5b(x)
        # N x 1024 x 7 x 7
        x = torch.flatten(self.avgpool(x), 1)
        # N x 1024
        logits = self.fc(self.dropout(x))
        return [aux1, aux2, logits]

    def exit_specs(self) -> list[ExitSpec]:
        return [ExitSpec(index=0, name="aux1"), ExitSpec(index=1, name="aux2"), ExitSpec(index=2, name="fc")]

    def stages(self) -> list[nn.Module]:
        stem_to_4a = nn.Sequential(
            self.input_transform, self.conv1, self.maxpool1, self.conv2, self.conv3, self.maxpool2,
            self.inception3a, self.inception3b, self.maxpool3, self.inception4a,
        )
        to_4d = nn.Sequential(self.inception4b, self.inception4c, self.inception4d)
        to_5b = nn.Sequential(self.inception4e, self.maxpool4, self.inception5a, self.inception5b)
        return [
            Stage(stem_to_4a, self.aux1, carries_list=False, is_last=False),  # carries N x 512 x 14 x 14
            Stage(to_4d, self.aux2, carries_list=False, is_last=False),  # carries N x 528 x 14 x 14
            Stage(to_5b, MainHead(self.avgpool, self.dropout, self.fc), carries_list=False, is_last=True),
        ]

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()


def _init_weights(m: nn.Module) -> None:
    """He-normal convs, unit BN, torchvision's truncated normal (std 0.01) for linears."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
        nn.init.zeros_(m.bias)


def _create_googlenet(
    builder: str, defaults: dict[str, Any], overrides: dict[str, Any], fixed: tuple[str, ...] = ()
) -> GoogLeNet:
    return GoogLeNet(build_config(builder, GoogLeNetConfig, defaults, overrides, fixed))


# ----------------------------------------------------------------------------- builders

_SMALL = dict(stem="small", width=0.25, branch3_kernel=5, aux_pool=4, dropout=0.2, dropout_aux=0.5,
              transform_input=False)
_FMNIST = dict(_SMALL, num_classes=10, in_channels=1, image_size=28)
_TORCHVISION = dict(stem="imagenet", width=1.0, branch3_kernel=3, aux_pool=4, dropout=0.2, dropout_aux=0.7,
                    transform_input=False, num_classes=1000, in_channels=3, image_size=224)


@register_model
def googlenet(**overrides: Any) -> GoogLeNet:
    """Family default: the small-input network (width 1/4) for 28x28 Fashion-MNIST; any
    ``num_classes``, ``in_channels``, ``image_size`` and config key may be overridden."""
    return _create_googlenet("googlenet", _FMNIST, overrides)


@register_model
def googlenet_fmnist(**overrides: Any) -> GoogLeNet:
    """Native 28x28 single-channel Fashion-MNIST (10 classes)."""
    return _create_googlenet("googlenet_fmnist", _FMNIST, overrides, fixed=("num_classes", "in_channels", "image_size"))


@register_model
def googlenet_cifar(**overrides: Any) -> GoogLeNet:
    """32x32 RGB (CIFAR-10 by default, ``num_classes=100`` for CIFAR-100), width 1/2."""
    defaults = dict(_SMALL, width=0.5, num_classes=10, in_channels=3, image_size=32)
    return _create_googlenet("googlenet_cifar", defaults, overrides, fixed=("in_channels", "image_size"))


@register_model
def googlenet_imagenet(**overrides: Any) -> GoogLeNet:
    """torchvision's GoogLeNet (3x3 branch3, 1000 classes): its state dicts, aux heads
    included, load with ``strict=True``."""
    fixed = ("stem", "width", "branch3_kernel", "aux_pool", "num_classes", "in_channels")
    return _create_googlenet("googlenet_imagenet", _TORCHVISION, overrides, fixed=fixed)
