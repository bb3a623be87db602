from pathlib import Path

import pytest
import torch

from exitserve.models.checkpoint import strip_module_prefix
from exitserve.models.msdnet import MSDNetConfig
from exitserve.models.registry import create_model, list_models, register_model

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "msdnet_cifar100_budget.pt"

# Keys and parameters of the reference implementation (MSDNet-PyTorch f654595), built
# with its own code for each configuration.
REFERENCE_SIZES = {
    "msdnet_cifar100_budget": (670, 2_078_924),
    "msdnet_cifar100_anytime": (782, 3_067_960),
    "msdnet_imagenet": (1127, 23_958_440),
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=False)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_reference_state_dict_loads_strictly_and_reproduces_logits(reference: dict, prefix: str) -> None:
    model = create_model("msdnet_cifar100_budget").eval()
    state = {prefix + k: v for k, v in reference["state_dict"].items()}
    model.load_state_dict(strip_module_prefix(state), strict=True)
    with torch.no_grad():
        outputs = model(reference["input"])
    assert len(outputs) == len(reference["exit_logits"]) == 5
    for ours, theirs in zip(outputs, reference["exit_logits"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_reference_key_names_and_shapes(reference: dict) -> None:
    model = create_model("msdnet_cifar100_budget")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: list(v) for k, v in reference["key_shapes"].items()}


@pytest.mark.parametrize("name", sorted(REFERENCE_SIZES))
def test_reference_configurations_build(name: str) -> None:
    model = create_model(name)
    keys, params = REFERENCE_SIZES[name]
    assert len(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == params


def test_imagenet_variant_runs_at_224() -> None:
    model = create_model("msdnet_imagenet", nBlocks=2).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in outputs] == [(1, 1000), (1, 1000)]


def test_reference_string_factors_and_conflicts() -> None:
    assert MSDNetConfig(grFactor="1-2-4", bnFactor="1-2-4").grFactor == [1, 2, 4]
    with pytest.raises(ValueError, match="nScales"):
        MSDNetConfig(nScales=4)
    with pytest.raises(ValueError, match="100 classes"):
        create_model("msdnet_cifar100_budget", num_classes=10)
    with pytest.raises(ValueError, match="stepmode"):
        MSDNetConfig(stepmode="fast")


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    assert {"msdnet", "msdnet_fmnist", "msdnet_imagenet"} <= set(list_models())
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        def msdnet() -> None:  # noqa: F811
            ...

    with pytest.raises(KeyError, match="unknown model"):
        create_model("resnet_imaginary")


def test_fmnist_variant_is_native_28x28_single_channel() -> None:
    model = create_model("msdnet_fmnist")
    assert model.cfg.in_channels == 1 and model.cfg.image_size == 28
    assert model.blocks[0][0].layers[0].net[0].weight.shape[1] == 1
