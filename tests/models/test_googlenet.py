import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.cost import count_params, exit_costs
from exitserve.models.googlenet import AdaptiveAvgPoolMatrix, GoogLeNet, GoogLeNetConfig
from exitserve.models.registry import create_model, list_models
from tests.support.seeded_weights import seeded_state_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = REPO_ROOT / "tests" / "data" / "googlenet_reference.pt"
FIXTURE_SCRIPT = REPO_ROOT / "scripts" / "make_googlenet_fixture.py"

# torchvision's GoogLeNet (torchvision/models/googlenet.py, counted with its own code by
# scripts/make_googlenet_fixture.py): aux_logits=False and aux_logits=True.
TORCHVISION_PARAMS = 6_624_904
TORCHVISION_PARAMS_WITH_AUX = 13_004_888
TORCHVISION_KEYS = 364


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_googlenet_fixture", FIXTURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def reference_model(reference: dict) -> GoogLeNet:
    """googlenet_imagenet() holding the fixture's seeded weights, strictly loaded."""
    state = seeded_state_dict(reference["key_shapes"], reference["weight_seed"])
    model = create_model("googlenet_imagenet")
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_registry_names() -> None:
    assert {"googlenet", "googlenet_fmnist", "googlenet_cifar", "googlenet_imagenet"} <= set(list_models())
    assert isinstance(create_model("googlenet"), GoogLeNet)
    assert [e.name for e in create_model("googlenet").exit_specs()] == ["aux1", "aux2", "fc"]


def test_torchvision_key_names_and_shapes(reference: dict) -> None:
    ours = [(k, list(v.shape)) for k, v in create_model("googlenet_imagenet").state_dict().items()]
    assert ours == [(k, list(s)) for k, s in reference["key_shapes"]]
    assert len(ours) == TORCHVISION_KEYS


def test_imagenet_parameter_counts_match_torchvision(reference: dict) -> None:
    model = create_model("googlenet_imagenet")
    without_aux = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("aux"))
    assert without_aux == TORCHVISION_PARAMS == reference["params_without_aux"]
    assert count_params(model) == TORCHVISION_PARAMS_WITH_AUX == reference["params_with_aux"]
    # the paper's 5x5 branch3 is the only difference of branch3_kernel=5
    assert count_params(create_model("googlenet", stem="imagenet", width=1.0, num_classes=1000, in_channels=3,
                                     image_size=224)) > TORCHVISION_PARAMS_WITH_AUX


def test_reference_logits_every_exit(reference: dict, reference_model: GoogLeNet) -> None:
    x = _fixture_module().seeded_input(reference["input_seed"], tuple(reference["input_shape"]))
    # seeded BN scales in [0.5, 1] shrink activations over 22 layers; 1e-4 is still < 0.1% of their spread
    assert reference["logits"]["fc"].std() > 0.05  # logits that depend on every layer, not ~0
    with torch.no_grad():
        outputs = reference_model(x)
    for name, ours in zip(("aux1", "aux2", "fc"), outputs):
        torch.testing.assert_close(ours, reference["logits"][name], rtol=0, atol=1e-4, msg=name)


def test_reference_logits_with_transform_input(reference: dict, reference_model: GoogLeNet) -> None:
    model = create_model("googlenet_imagenet", transform_input=True)
    model.load_state_dict(reference_model.state_dict(), strict=True)
    x = _fixture_module().seeded_input(reference["input_seed"], tuple(reference["input_shape"]))
    with torch.no_grad():
        fc = model.eval()(x)[-1]
    torch.testing.assert_close(fc, reference["fc_transform_input"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("in_size", [14, 7, 8, 13])
def test_aux_pooling_equals_adaptive_average_pooling(in_size: int) -> None:
    x = torch.randn(2, 3, in_size, in_size)
    torch.testing.assert_close(AdaptiveAvgPoolMatrix(4)(x), F.adaptive_avg_pool2d(x, 4), rtol=0, atol=1e-6)


def test_paper_pooling_is_not_torchvision_pooling() -> None:
    # why the aux heads do not use AvgPool2d(5, stride=3): different windows on 14x14
    x = torch.randn(1, 3, 14, 14)
    assert (F.avg_pool2d(x, 5, stride=3) - F.adaptive_avg_pool2d(x, 4)).abs().max() > 1e-2


def test_aux_exits_are_deterministic_in_eval_mode() -> None:
    model = create_model("googlenet").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        first, second = model(x), model(x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fmnist_first_exit_costs_at_most_a_third() -> None:
    costs = exit_costs(create_model("googlenet"), (1, 28, 28))
    assert [c.name for c in costs] == ["aux1", "aux2", "fc"]
    assert costs[0].flops * 3 <= costs[-1].flops
    assert costs[0].flops < costs[1].flops < costs[2].flops
    assert costs[0].carried_shapes == [[1, 128, 7, 7]] and costs[1].carried_shapes == [[1, 132, 7, 7]]
    assert count_params(create_model("googlenet")) * 4 < 15e6  # fp32 weights under 15 MB


@pytest.mark.parametrize("name", ["googlenet", "googlenet_fmnist", "googlenet_cifar", "googlenet_imagenet"])
def test_config_dict_round_trip(name: str) -> None:
    model = create_model(name)
    config = model.config_dict()
    assert set(config) == {"num_classes", "in_channels", "image_size", "stem", "width", "branch3_kernel",
                           "aux_pool", "dropout", "dropout_aux", "transform_input"}
    for builder in ("googlenet", name):
        rebuilt = create_model(builder, **config)
        assert rebuilt.config_dict() == config
        assert str(rebuilt) == str(model)
        rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_family_default_takes_the_training_data_fields() -> None:
    model = create_model("googlenet", num_classes=100, in_channels=3, image_size=32, width=0.125)
    assert model.cfg.num_classes == 100 and model.conv1.conv.in_channels == 3
    assert model(torch.randn(2, 3, 32, 32))[-1].shape == (2, 100)


def test_unknown_and_conflicting_arguments_raise() -> None:
    with pytest.raises(TypeError, match="unknown config keys"):
        create_model("googlenet", widht=0.5)
    with pytest.raises(TypeError, match="unknown config keys"):
        create_model("googlenet_imagenet", aux_logits=False)
    with pytest.raises(ValueError, match="conflicting arguments.*branch3_kernel=5"):
        create_model("googlenet_imagenet", branch3_kernel=5)
    with pytest.raises(ValueError, match="conflicting arguments.*num_classes=10"):
        create_model("googlenet_imagenet", num_classes=10)
    with pytest.raises(ValueError, match="conflicting arguments.*in_channels=3"):
        create_model("googlenet_fmnist", in_channels=3)
    with pytest.raises(ValueError, match="transform_input=True needs 3 input channels"):
        create_model("googlenet", transform_input=True)
    with pytest.raises(ValueError, match="smaller than"):
        create_model("googlenet", image_size=4)
    with pytest.raises(ValueError, match="branch3_kernel"):
        GoogLeNetConfig(branch3_kernel=4)
    # repeating a fixed value is not a conflict (checkpoints rebuild through their own builder)
    assert create_model("googlenet_fmnist", in_channels=1, num_classes=10).cfg.in_channels == 1


# ----------------------------------------------------------------------------- training and export


@pytest.fixture
def tiny_checkpoint(tiny_googlenet_checkpoint: Path) -> Path:
    return tiny_googlenet_checkpoint


def test_training_smoke_writes_a_rebuildable_checkpoint(tiny_checkpoint: Path) -> None:
    checkpoint = load_checkpoint(tiny_checkpoint)
    assert checkpoint.model == "googlenet"
    assert checkpoint.config == {**GoogLeNetConfig().to_dict(), "width": 0.125}
    assert [e.name for e in checkpoint.exits] == ["aux1", "aux2", "fc"]
    assert all(0 <= e.test_accuracy <= 1 for e in checkpoint.exits)
    assert checkpoint.exits[0].flops * 3 <= checkpoint.exits[-1].flops


def test_export_with_parity(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from exitserve.exporter.export import FP32_TOLERANCE, export_repository

    manifest, report = export_repository(tiny_checkpoint, tmp_path / "googlenet", parity_images=64, progress=False)
    assert report.passed
    assert [s.exit_name for s in manifest.stages] == ["aux1", "aux2", "fc"]
    assert manifest.stages[-1].cost_fraction == 1.0 and manifest.stages[0].cost_fraction <= 1 / 3
    assert manifest.parity["full_model_max_abs_diff"] <= FP32_TOLERANCE
    assert manifest.source.model == "googlenet"
