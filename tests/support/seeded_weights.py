"""Deterministic stand-in weights for reference-parity fixtures.

A fixture stores only a model's key -> shape list, a seed and the reference's outputs;
the test regenerates the very same tensors from the seed with :func:`seeded_state_dict`
and loads them into our implementation. Values are drawn in sorted key order from one
seeded ``torch.Generator``, so they depend on nothing but the keys, the shapes and the seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def seeded_state_dict(keys_and_shapes: Iterable[tuple[str, Sequence[int]]], seed: int) -> dict[str, torch.Tensor]:
    """Tensors that keep activations in a sane range through a deep network:

    * ``num_batches_tracked``: 0 (int64 scalar);
    * ``running_mean``: N(0, 0.1^2); ``running_var``: 1 + U(0, 0.5);
    * weights of rank >= 2 (convolutions, linear layers): N(0, 2 / fan_in) (He);
    * other rank-1 ``weight`` (BN scale, PReLU slope): U(0.5, 1);
    * rank-1 ``bias``: N(0, 0.05^2).
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in sorted((k, tuple(int(d) for d in s)) for k, s in keys_and_shapes):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            value = torch.zeros(shape, dtype=torch.long)
        elif leaf == "running_mean":
            value = torch.randn(shape, generator=gen) * 0.1
        elif leaf == "running_var":
            value = 1.0 + 0.5 * torch.rand(shape, generator=gen)
        elif len(shape) >= 2:
            value = torch.randn(shape, generator=gen) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif leaf == "weight":
            value = 0.5 + 0.5 * torch.rand(shape, generator=gen)
        elif leaf == "bias":
            value = torch.randn(shape, generator=gen) * 0.05
        else:
            raise ValueError(f"no rule for {key} of shape {list(shape)}")
        state[key] = value
    return state
