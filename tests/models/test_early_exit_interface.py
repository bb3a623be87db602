"""The one early-exit interface, checked the same way for every family: running the
stages in turn gives exactly the logits of ``forward`` at every exit, stages carry only
batch-first tensors (the exporter gathers them on dim 0), and the last carries nothing."""

from __future__ import annotations

import pytest
import torch

from exitserve.models.early_exit import run_stages
from exitserve.models.registry import create_model

CASES = [
    ("msdnet_fmnist", (1, 28, 28), {}, 3),
    ("msdnet_cifar100_budget", (3, 32, 32), {}, 3),
    ("msdnet_cifar100_anytime", (3, 32, 32), {"prune": "min"}, 3),
    ("espnetv2_fmnist", (1, 28, 28), {}, 3),
    ("espnetv2", (3, 32, 32), {"in_channels": 3, "image_size": 32, "num_classes": 100}, 3),
    ("espnetv2", (1, 28, 28), {"exit_levels": [2, 3, 4], "s": 1.0}, 3),
    ("googlenet", (1, 28, 28), {}, 3),
    ("googlenet_cifar", (3, 32, 32), {}, 3),
    ("googlenet_imagenet", (3, 224, 224), {}, 1),
]


@pytest.mark.parametrize("name, shape, overrides, batch", CASES, ids=[f"{c[0]}-{c[1][1]}" for c in CASES])
def test_stages_compose_to_forward(name: str, shape: tuple, overrides: dict, batch: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        full = model(x)
        staged = run_stages(model.stages(), x)
        carried: tuple = (x,)
        stages = model.stages()
        for i, stage in enumerate(stages):
            carried, logits = stage(*carried)
            assert all(isinstance(t, torch.Tensor) and t.shape[0] == batch for t in carried)
            assert (len(carried) == 0) == (i == len(stages) - 1)
            torch.testing.assert_close(logits, full[i], rtol=0, atol=0)
    assert len(full) == len(staged) == len(model.exit_specs())
    for a, b in zip(full, staged):
        assert a.shape == (batch, model.cfg.num_classes)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


FAMILIES = [("msdnet", "msdnet_imagenet"), ("espnetv2", "espnetv2_imagenet"), ("googlenet", "googlenet_imagenet")]


@pytest.mark.parametrize("family, imagenet", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_builders_share_one_argument_rule(family: str, imagenet: str) -> None:
    """Every builder rejects keys its config lacks, and a variant's fixed keys may be
    repeated (checkpoints rebuild through their own builder) but not changed."""
    with pytest.raises(TypeError, match=rf"{family}: unknown config keys \['no_such_key'\]"):
        create_model(family, no_such_key=1)
    config = create_model(imagenet).config_dict()
    create_model(imagenet, **config)  # the full config of the variant rebuilds it
    if family != "msdnet":  # msdnet_imagenet is a preset: every key may change
        with pytest.raises(ValueError, match=rf"{imagenet}: conflicting arguments num_classes=10 "
                                             rf".*num_classes=1000.*use '{family}'"):
            create_model(imagenet, num_classes=10)
