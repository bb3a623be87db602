from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from exitserve.repository.format import load_manifest
from exitserve.exporter.export import export_repository
from exitserve.models.checkpoint import load_checkpoint, model_from_checkpoint
from exitserve.models.cost import exit_costs
from exitserve.models.espnetv2 import ESPNetv2Config, branch_dilations, load_reference_state_dict
from exitserve.models.registry import create_model, list_models
from tests.support.seeded_weights import seeded_state_dict

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "espnetv2_reference.pt"

# Parameters of the reference ImageNet classifier (EdgeNets 2b232d3, EESPNet(s), 1000
# classes), built with its own code: 487 state-dict tensors at every scale.
REFERENCE_PARAMS = {0.5: 1_241_332, 1.0: 1_670_072, 1.25: 1_965_440, 1.5: 2_314_856, 2.0: 3_498_136}
REFERENCE_TENSORS = 487


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("exit_heads.")}


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=True)


def reference_input(reference: dict) -> torch.Tensor:
    return torch.randn(*reference["input_shape"], generator=torch.Generator().manual_seed(reference["input_seed"]))


def test_registered_names() -> None:
    assert {"espnetv2", "espnetv2_imagenet", "espnetv2_fmnist"} <= set(list_models())


@pytest.mark.parametrize("s", sorted(REFERENCE_PARAMS))
def test_imagenet_parameter_counts_match_the_reference(s: float) -> None:
    model = create_model("espnetv2_imagenet", s=s)
    backbone = {k: p for k, p in model.named_parameters() if not k.startswith("exit_heads.")}
    assert sum(p.numel() for p in backbone.values()) == REFERENCE_PARAMS[s]
    assert len(backbone_state(model)) == REFERENCE_TENSORS


@pytest.mark.parametrize("s", ["0.5", "1.0"])
def test_reference_weights_reproduce_reference_logits(reference: dict, s: str) -> None:
    entry = reference["scales"][s]
    model = create_model("espnetv2_imagenet", s=float(s)).eval()
    assert {k: list(v.shape) for k, v in backbone_state(model).items()} == dict(entry["keys_and_shapes"])
    state = seeded_state_dict(entry["keys_and_shapes"], reference["seed"])
    heads = load_reference_state_dict(model, {f"module.{k}": v for k, v in state.items()})
    assert heads and all(k.startswith("exit_heads.") for k in heads)
    with torch.no_grad():
        outputs = model(reference_input(reference))
    assert len(outputs) == 4 and outputs[-1].shape == (2, 1000)
    assert entry["logits"].std() > 1.0  # the fixture's logits are far from trivially small
    torch.testing.assert_close(outputs[-1], entry["logits"], rtol=1e-4, atol=1e-4)


def test_reference_parity_catches_a_wrong_dilation(reference: dict) -> None:
    entry = reference["scales"]["0.5"]
    model = create_model("espnetv2_imagenet", s=0.5).eval()
    load_reference_state_dict(model, seeded_state_dict(entry["keys_and_shapes"], reference["seed"]))
    conv = model.level4[3].spp_dw[2].conv  # dilation 2 -> 1
    conv.dilation, conv.padding = (1, 1), (1, 1)
    with torch.no_grad():
        logits = model(reference_input(reference))[-1]
    assert (logits - entry["logits"]).abs().max() > 0.1


def test_load_reference_state_dict_is_strict_for_the_backbone(reference: dict) -> None:
    entry = reference["scales"]["0.5"]
    state = seeded_state_dict(entry["keys_and_shapes"], reference["seed"])
    model = create_model("espnetv2_imagenet", s=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    renamed = {k.replace("level4.3.proj_1x1", "level4.3.proj"): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"missing \['level4\.3\.proj_1x1"):
        load_reference_state_dict(model, renamed)
    with pytest.raises(ValueError, match="unexpected"):
        load_reference_state_dict(model, {**state, "exit_heads.0.classifier.bias": torch.zeros(1000)})
    with pytest.raises(ValueError, match="another shape"):
        load_reference_state_dict(create_model("espnetv2_imagenet", s=1.0), state)
    for k, v in model.state_dict().items():  # a refused state dict loads nothing
        assert torch.equal(v, before[k])


def test_dilations_follow_the_receptive_field_limits() -> None:
    assert branch_dilations(4, 13) == [1, 2, 3, 4]
    assert branch_dilations(4, 7) == [1, 1, 2, 3]
    assert branch_dilations(4, 5) == [1, 1, 1, 2]
    model = create_model("espnetv2_fmnist")
    assert [c.conv.dilation[0] for c in model.level5[0].spp_dw] == [1, 1, 1, 2]


def test_small_inputs_use_a_stride_1_level1_and_carry_the_image() -> None:
    model = create_model("espnetv2_fmnist")
    assert model.cfg.level1_stride == 1 and model.level1.conv.weight.shape[1] == 1
    costs = exit_costs(model, (1, 28, 28))
    assert [c.carried_shapes for c in costs] == [[[1, 64, 7, 7], [1, 1, 7, 7]], [[1, 128, 4, 4]], []]
    assert create_model("espnetv2_imagenet").cfg.level1_stride == 2


def test_first_exit_costs_at_most_a_third() -> None:
    for name, shape in (("espnetv2", (1, 28, 28)), ("espnetv2_imagenet", (3, 224, 224))):
        costs = exit_costs(create_model(name), shape)
        assert costs[0].flops * 3 <= costs[-1].flops, name


def backbone_macs(model, shape: tuple[int, int, int]) -> int:
    """Multiply-adds of the stage bodies alone: no exit head, no final linear layer."""
    carried: tuple = (torch.zeros(1, *shape),)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for stage in model.stages():
            features = stage.body(list(carried) if stage.carries_list else carried[0])
            carried = (features,) if isinstance(features, torch.Tensor) else tuple(features)
    return counter.get_total_flops() // 2


def test_imagenet_multiply_adds_match_the_reference_table() -> None:
    """EdgeNets reports 85.72 / 284.81 MFLOPs at s=1.0 / 2.0, its final linear layer not counted."""
    for s, mflops in ((1.0, 85.72), (2.0, 284.81)):
        model = create_model("espnetv2_imagenet", s=s)
        assert backbone_macs(model, (3, 224, 224)) / 1e6 == pytest.approx(mflops, abs=0.01)


def test_config_dict_round_trips() -> None:
    for name in ("espnetv2", "espnetv2_fmnist", "espnetv2_imagenet"):
        model = create_model(name)
        rebuilt = create_model("espnetv2", **model.config_dict())
        assert rebuilt.config_dict() == model.config_dict()
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    config = create_model("espnetv2").config_dict()
    assert config["exit_levels"] == [3, 4] and config["exit_channels"] == [128, 256] and config["level1_stride"] == 1


def test_conflicting_and_unknown_arguments_raise() -> None:
    with pytest.raises(TypeError, match=r"espnetv2: unknown config keys \['width'\]"):
        create_model("espnetv2", width=2)
    with pytest.raises(ValueError, match=r"espnetv2_imagenet: conflicting arguments num_classes=10 .*num_classes=1000"):
        create_model("espnetv2_imagenet", num_classes=10)
    with pytest.raises(ValueError, match=r"espnetv2_fmnist: conflicting arguments in_channels=3 .*in_channels=1"):
        create_model("espnetv2_fmnist", in_channels=3)
    create_model("espnetv2_fmnist", num_classes=10, image_size=28)  # repeating a fixed value is fine
    with pytest.raises(ValueError, match="reference scales"):
        create_model("espnetv2", s=0.75)
    with pytest.raises(ValueError, match="conflicts with exit_levels"):
        create_model("espnetv2", exit_levels=[3, 4], exit_channels=[64])
    with pytest.raises(ValueError, match="exit_levels"):
        ESPNetv2Config(exit_levels=[4, 3])
    with pytest.raises(ValueError, match="level1_stride"):
        ESPNetv2Config(level1_stride=4)


@pytest.fixture
def tiny_checkpoint(tiny_espnetv2_checkpoint: Path) -> Path:
    return tiny_espnetv2_checkpoint


@pytest.mark.slow
def test_training_smoke(tiny_checkpoint: Path) -> None:
    checkpoint = load_checkpoint(tiny_checkpoint)
    assert checkpoint.model == "espnetv2" and checkpoint.config["s"] == 0.5
    assert [e.name for e in checkpoint.exits] == ["exit_heads.0", "exit_heads.1", "classifier"]
    assert all(0 <= e.test_accuracy <= 1 for e in checkpoint.exits)
    assert tiny_checkpoint.stat().st_size < 15e6
    model = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        assert [tuple(o.shape) for o in model(torch.zeros(2, 1, 28, 28))] == [(2, 10)] * 3


@pytest.mark.slow
def test_export_through_the_generic_exporter(tiny_checkpoint: Path, tmp_path: Path) -> None:
    manifest, report = export_repository(tiny_checkpoint, tmp_path / "espnetv2", parity_images=64, progress=False)
    assert report.passed and len(report.exits) == 3
    assert max(e.max_abs_diff for e in report.exits) <= 1e-4
    assert load_manifest(tmp_path / "espnetv2").source.model == "espnetv2"
    carried = [s.carried_inputs for s in manifest.stages]
    assert carried == [["image"], ["carried_in_0", "carried_in_1"], ["carried_in_0"]]
    assert np.isclose(manifest.stages[-1].cost_fraction, 1.0)
