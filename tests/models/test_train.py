import json
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from exitserve.cli import main as cli
from exitserve.models.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from exitserve.models.preprocess import Preprocessing
from exitserve.models.train import JointExitLoss, Trainer, TrainConfig, ema_average_fn

SMALL = {"nBlocks": 2, "nChannels": 8, "growthRate": 4}
WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"


def small_config(out: Path, **overrides) -> TrainConfig:
    values = dict(out=str(out), epochs=2, steps_per_epoch=25, batch_size=32, model_config=SMALL, threads=1)
    return TrainConfig(**{**values, **overrides})


def fixed_batch_loss(trainer: Trainer) -> float:
    x = trainer.prep.normalize(trainer.splits.train.images[:256])
    y = torch.from_numpy(trainer.splits.train.labels[:256])
    trainer.model.eval()
    with torch.no_grad():
        return JointExitLoss([1.0, 1.0], 0.0, 1.0)(trainer.model(x), y).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, float]:
    out = tmp_path_factory.mktemp("train") / "small.pt"
    trainer = Trainer(small_config(out))
    before = fixed_batch_loss(trainer)
    trainer.run()
    after = fixed_batch_loss(trainer)
    return out, before, after


def test_short_training_lowers_the_loss(trained: tuple[Path, float, float]) -> None:
    _, before, after = trained
    assert after < 0.8 * before


def test_checkpoint_carries_everything_and_round_trips(trained: tuple[Path, float, float]) -> None:
    path, _, _ = trained
    checkpoint = load_checkpoint(path)
    assert checkpoint.labels[0] == "T-shirt/top"
    prep = checkpoint.preprocessing
    assert (prep.channels, prep.size) == (1, 28) and len(prep.mean) == 1
    assert [e.index for e in checkpoint.exits] == [0, 1]
    assert all(0 <= e.test_accuracy <= 1 and e.flops > 0 for e in checkpoint.exits)
    assert checkpoint.training["epochs_done"] == 2 and checkpoint.dataset_name == "fashion-mnist"
    assert not path.with_name(path.name + ".resume").exists()
    model = model_from_checkpoint(checkpoint)
    x = torch.randn(4, 1, 28, 28)
    reloaded = model_from_checkpoint(load_checkpoint(path))
    with torch.no_grad():
        for a, b in zip(model(x), reloaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_evaluate_json(trained: tuple[Path, float, float], capsys: pytest.CaptureFixture) -> None:
    path, _, _ = trained
    assert cli(["evaluate", "--checkpoint", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [set(e) >= {"index", "accuracy", "flops"} for e in report["exits"]] == [True, True]
    stored = load_checkpoint(path).exits
    assert [e["accuracy"] for e in report["exits"]] == pytest.approx([e.test_accuracy for e in stored])


@pytest.mark.slow
def test_resume_continues_from_the_last_epoch(tmp_path: Path) -> None:
    out = tmp_path / "resume.pt"
    first = Trainer(small_config(out, epochs=2, steps_per_epoch=5))
    first.train_epoch(0)
    first.history.append({"epoch": 1, "holdout": {"raw": [0.1, 0.1]}})
    first._save(0)
    second = Trainer(small_config(out, epochs=2, steps_per_epoch=5))
    assert second.try_resume() and second.start_epoch == 1
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert second.scheduler.last_epoch == first.scheduler.last_epoch == 5
    other = Trainer(small_config(out, epochs=2, steps_per_epoch=5, lr=0.05))
    with pytest.raises(ValueError, match="another configuration"):
        other.try_resume()


@pytest.mark.parametrize("name", ["msdnet_fmnist.pt", "googlenet_fmnist.pt", "espnetv2_fmnist.pt"])
def test_committed_checkpoints_load_and_save_in_the_same_format(name: str, tmp_path: Path) -> None:
    """The typed record reads the released files and writes the same dict back, less the
    two preprocessing keys nothing reads (``layout``, ``resize``)."""
    raw = torch.load(WEIGHTS / name, map_location="cpu", weights_only=False)
    checkpoint = load_checkpoint(WEIGHTS / name)
    assert checkpoint.preprocessing == Preprocessing(1, 28, [0.2862], [0.3531])
    assert checkpoint.dataset_name == "fashion-mnist" and len(checkpoint.labels) == 10
    assert all(e.test_accuracy is not None and e.flops > 0 for e in checkpoint.exits)
    expected = {**raw, "preprocessing": {k: v for k, v in raw["preprocessing"].items()
                                         if k not in ("layout", "resize")}}
    written = checkpoint.to_dict()
    assert list(written) == list(raw) and written["format"] == CHECKPOINT_FORMAT
    assert {k: v for k, v in written.items() if k != "state_dict"} == {
        k: v for k, v in expected.items() if k != "state_dict"}
    save_checkpoint(tmp_path / name, checkpoint)
    again = torch.load(tmp_path / name, map_location="cpu", weights_only=False)
    assert again.keys() == raw.keys() and again["exits"] == raw["exits"]
    assert all(torch.equal(again["state_dict"][k], v) for k, v in raw["state_dict"].items())
    reread = Checkpoint.from_dict(again)
    assert (reread.exits, reread.preprocessing) == (checkpoint.exits, checkpoint.preprocessing)


def test_bad_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    assert cli(["evaluate", "--checkpoint", str(bad)]) == 2
    assert "not an exitserve checkpoint" in capsys.readouterr().err
    raw = Checkpoint(model="msdnet", config={}, state_dict={}, labels=["a"],
                     preprocessing=Preprocessing(1, 28, [0.5], [0.5]), exits=[]).to_dict()
    torch.save({k: v for k, v in raw.items() if k != "exits"}, bad)
    with pytest.raises(CheckpointError, match=rf"{bad.name}: checkpoint lacks 'exits'"):
        load_checkpoint(bad)
    torch.save({**raw, "exits": [{"index": 0, "name": "x"}]}, bad)
    with pytest.raises(CheckpointError, match="malformed 'exits'"):
        load_checkpoint(bad)


def test_conflicting_model_config_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="conflicts with dataset"):
        Trainer(small_config(tmp_path / "x.pt", model_config={**SMALL, "in_channels": 3}))


def test_ema_warmup_follows_the_model_at_first() -> None:
    """After the copy of the first update, plain EMA moves 0.1% of the way to the model;
    with the warm-up, update t moves 1 - (1+t)/(10+t) of the way, until decay caps it."""
    model = torch.nn.Linear(2, 2)
    plain = AveragedModel(model, multi_avg_fn=ema_average_fn(0.999, warmup=False), use_buffers=True)
    warm = AveragedModel(model, multi_avg_fn=ema_average_fn(0.999, warmup=True), use_buffers=True)
    start = model.weight.detach().clone()
    for averaged in (plain, warm):
        averaged.update_parameters(model)  # the first update copies the model
    with torch.no_grad():
        model.weight.zero_()
    for averaged in (plain, warm):
        averaged.update_parameters(model)  # t = 1
    torch.testing.assert_close(plain.module.weight, start * 0.999)
    torch.testing.assert_close(warm.module.weight, start * (2 / 11))
    warm.n_averaged += 20_000  # capped at the decay once (1+t)/(10+t) passes it
    with torch.no_grad():
        before = warm.module.weight.clone()
        model.weight.fill_(1.0)
    warm.update_parameters(model)
    torch.testing.assert_close(warm.module.weight, before * 0.999 + 0.001)


@pytest.mark.slow
def test_ema_warmup_is_recorded_and_trains(tmp_path: Path) -> None:
    out = tmp_path / "warm.pt"
    assert cli(["train", "--model", "msdnet", "--epochs", "1", "--steps-per-epoch", "5", "--batch-size", "16",
                "--model-config", json.dumps(SMALL), "--threads", "1", "--ema-warmup", "--out", str(out)]) == 0
    training = load_checkpoint(out).training
    assert training["config"]["ema_warmup"] is True
    assert set(training["history"][-1]["holdout"]) == {"raw", "ema"}
