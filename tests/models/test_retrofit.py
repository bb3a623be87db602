"""``exitserve retrofit`` (models/retrofit_train.py) on a user's plain CNN: the backbone stays
exactly as trained, the heads learn, the last exit is the backbone itself, an interrupted
run resumes to the same weights, and ``auto:K`` records where it put the exits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exitserve.models.checkpoint import load_checkpoint, model_from_checkpoint
from exitserve.models.cut import cut_points, even_exits
from exitserve.models.data import load_splits
from exitserve.models.retrofit_train import Retrofitter, retrofit
from exitserve.models.train_config import RetrofitTrainConfig
from tests.support.user_package import train_backbone, user_imports, write_user_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_user_package(tmp_path_factory.mktemp("project"))
    train_backbone(root)
    return root


def config(project: Path, out: str, **overrides) -> RetrofitTrainConfig:
    return RetrofitTrainConfig(**{
        "backbone": "models.net:small_net", "weights": str(project / "small.pt"), "exits": "layer1,layer2",
        "out": str(project / out), "mean": [0.286], "std": [0.353], "epochs": 1, "steps_per_epoch": 60,
        "batch_size": 64, "threads": 1, **overrides})


def test_heads_learn_on_a_frozen_backbone(project: Path) -> None:
    with user_imports(project):
        checkpoint = retrofit(config(project, "runs/heads.pt"))
        model = model_from_checkpoint(load_checkpoint(project / "runs/heads.pt"))
        from models.net import small_net

        plain = small_net().eval()
    plain.load_state_dict(torch.load(project / "small.pt"))
    # frozen: every backbone tensor, batch-norm statistics included, is the user's
    for key, value in plain.state_dict().items():
        assert torch.equal(checkpoint.state_dict[f"backbone.{key}"], value), key
    assert checkpoint.model == "retrofit" and checkpoint.config["exits"] == ["layer1", "layer2"]
    assert [e.name for e in checkpoint.exits] == ["layer1", "layer2", "fc"]
    assert checkpoint.labels[9] == "Ankle boot" and checkpoint.preprocessing.mean == [0.286]
    # the last exit is the backbone: its test accuracy is the plain network's own
    test = load_splits("fashion-mnist").test
    with torch.no_grad():
        x = (torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 255 - 0.286) / 0.353
        plain_accuracy = float((plain(x).argmax(1).numpy() == test.labels).mean())
    assert checkpoint.exits[-1].test_accuracy == pytest.approx(plain_accuracy, abs=1e-9)
    # 60 steps from scratch: well above chance (10%), not yet the backbone
    for record in checkpoint.exits[:-1]:
        assert 0.2 < record.holdout_accuracy and 0.2 < record.test_accuracy
    assert checkpoint.exits[0].flops < checkpoint.exits[1].flops < checkpoint.exits[2].flops
    with torch.no_grad():
        rebuilt, own = model(x[:8]), plain(x[:8])
    np.testing.assert_allclose(rebuilt[-1].numpy(), own.numpy(), rtol=0, atol=1e-6)


def test_an_interrupted_run_resumes_to_the_same_heads(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(epochs=2, steps_per_epoch=15, exits="auto:2")
    with user_imports(project):
        straight = retrofit(config(project, "runs/straight.pt", **settings))

        original = Retrofitter.train_epoch

        def interrupted(self: Retrofitter, epoch: int) -> float:
            if epoch == 1:
                raise KeyboardInterrupt
            return original(self, epoch)

        monkeypatch.setattr(Retrofitter, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            retrofit(config(project, "runs/resumed.pt", **settings))
        assert (project / "runs/resumed.pt.resume").is_file()
        assert load_checkpoint(project / "runs/resumed.pt").training["epochs_done"] == 1
        monkeypatch.setattr(Retrofitter, "train_epoch", original)
        resumed = retrofit(config(project, "runs/resumed.pt", **settings))
        from models.net import small_net

        expected = even_exits(cut_points(small_net(), (1, 28, 28)), 2)
    assert not (project / "runs/resumed.pt.resume").exists()
    assert resumed.training["epochs_done"] == 2 and len(resumed.training["history"]) == 2
    for key, value in straight.state_dict.items():
        assert torch.equal(resumed.state_dict[key], value), key
    # auto:2 put the exits at even shares of the FLOPs and says where
    points = straight.training["exit_points"]
    assert [p["name"] for p in points] == straight.config["exits"] == [p.name for p in expected]
    assert [p["flops_fraction"] for p in points] == [round(p.flops_fraction, 4) for p in expected]
    assert 0 < points[0]["flops_fraction"] < points[1]["flops_fraction"] < 1
