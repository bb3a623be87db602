"""Serving a user's own model, as the user does it: a project folder with its own ``models``
package and a plain CNN trained by an ordinary loop; ``exitserve retrofit``, ``export``,
``calibrate`` and ``serve`` run there. The served answers are the PyTorch model's, exit by
exit. Also: an ``EarlyExitModel`` of the user's exports without being registered, a
``MultiExit`` factory with its metadata and weights, and the messages for what cannot work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from exitserve.cli import main as cli
from exitserve.exporter.calibrate import calibrate_repository
from exitserve.exporter.export import FP32_TOLERANCE, ExportError, export_factory
from exitserve.models.checkpoint import load_checkpoint, model_from_checkpoint
from exitserve.models.data import DatasetError, load_splits
from exitserve.models.registry import list_models
from exitserve.repository.format import load_manifest
from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server
from tests.support.user_package import exitserve_cli, train_backbone, user_imports, write_user_package

pytestmark = pytest.mark.slow

FMNIST = ["--mean", "0.286", "--std", "0.353"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_user_package(tmp_path_factory.mktemp("project"))
    train_backbone(root)
    return root


@pytest.fixture(scope="module")
def retrofitted(project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The user's commands: retrofit two exits, export the checkpoint. (checkpoint, model folder)"""
    done = exitserve_cli(project, "retrofit", "--backbone", "models.net:small_net", "--weights", "small.pt",
                         "--exits", "layer1,layer2", "--out", "runs/retrofit.pt", *FMNIST, "--epochs", "1",
                         "--steps-per-epoch", "100", "--batch-size", "64", "--threads", "1")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "layer1" in done.stdout and "fc" in done.stdout  # the exit table
    folder = tmp_path_factory.mktemp("repository") / "mine"
    done = exitserve_cli(project, "export", "--checkpoint", "runs/retrofit.pt", "--out", str(folder),
                         "--parity-images", "64")
    assert done.returncode == 0, done.stderr[-4000:]
    return project / "runs/retrofit.pt", folder


def test_served_answers_are_the_pytorch_models_exit_by_exit(retrofitted: tuple[Path, Path], project: Path) -> None:
    checkpoint_path, folder = retrofitted
    manifest = load_manifest(folder)
    assert [s.exit_name for s in manifest.stages] == ["layer1", "layer2", "fc"]
    assert manifest.source.kind == "checkpoint" and manifest.source.model == "retrofit"
    assert manifest.source.config["backbone"] == "models.net:small_net" and manifest.parity["passed"]
    assert manifest.input.mean == [0.286] and manifest.labels[0] == "T-shirt/top"
    calibration, _ = calibrate_repository(folder, report=False, progress=False)
    assert calibration.heldout == {"dataset": "fashion-mnist", "split": "holdout", "images": 5000, "seed": 0}

    pixels, _ = fashion_images(5)
    with user_imports(project):  # the checkpoint rebuilds the user's backbone through its factory
        model = model_from_checkpoint(load_checkpoint(checkpoint_path))
    with torch.no_grad():
        probs = [torch.softmax(z, 1).numpy() for z in model(torch.from_numpy(manifest.input.normalize(pixels)))]
    # one threshold per exit but the last; an image leaves at the first exit whose confidence reaches it
    forced = {0: "0,0", 1: "2,0", 2: "2,2"}
    with live_server(Settings(model_repository=folder.parent)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for i, image in enumerate(pixels):
            for k, thresholds in forced.items():
                answer = client.post("/classify", files={"file": ("image.png", encode(image), "image/png")},
                                     params={"thresholds": thresholds, "top_k": 10})
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["model"] == "mine" and body["exit"]["index"] == k and body["exit"]["name"] == \
                    manifest.stages[k].exit_name
                assert body["class_index"] == int(probs[k][i].argmax())
                assert abs(body["confidence"] - float(probs[k][i].max())) <= FP32_TOLERANCE
                served = np.zeros(10)
                for entry in body["top_k"]:
                    served[entry["class_index"]] = entry["probability"]
                np.testing.assert_allclose(served, probs[k][i], rtol=0, atol=FP32_TOLERANCE)
        budgeted = client.post("/classify", files={"file": ("image.png", encode(pixels[0]), "image/png")})
        assert budgeted.status_code == 200 and budgeted.json()["policy"] == "budget"


def test_calibrate_on_an_image_folder_of_the_users(retrofitted: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, exported = retrofitted
    folder = tmp_path / "mine"
    shutil.copytree(exported, folder)
    data = tmp_path / "photos"
    splits = load_splits("fashion-mnist")
    for split, images, labels in (("train", splits.train.images[:200], splits.train.labels[:200]),
                                  ("test", splits.test.images[:100], splits.test.labels[:100])):
        for i, (image, label) in enumerate(zip(images, labels)):
            path = data / split / f"{label}_{splits.train.classes[label].replace('/', '-')}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0]).save(path)
    assert cli(["calibrate", "--repository", str(folder), "--data", f"image-folder:{data}"]) == 0
    out = capsys.readouterr().out
    # 10% of the folder's 200 training images, seeded: stated, and the same on a rerun
    assert f"on 20 held-out images of image-folder:{data} (seeded split, seed 0)" in out
    first = json.loads((folder / "calibration.json").read_text())
    assert first["heldout"] == {"dataset": f"image-folder:{data}", "split": "holdout", "images": 20, "seed": 0}
    report = json.loads((folder / "calibration_report.json").read_text())
    assert report["heldout"] == first["heldout"] and report["images"] == 100
    calibrate_repository(folder, data=f"image-folder:{data}", report=False, progress=False)
    assert json.loads((folder / "calibration.json").read_text()) == first


def test_an_early_exit_model_of_the_users_exports_without_being_registered(project: Path, tmp_path: Path) -> None:
    with user_imports(project):
        manifest, parity = export_factory("models.exits:two_exit", tmp_path / "two", parity_images=32, progress=False)
    assert parity.passed and [s.exit_name for s in manifest.stages] == ["early", "late"]
    assert (manifest.source.kind, manifest.source.model) == ("factory", "models.exits:two_exit")
    # the metadata it carries (exitserve_metadata) and the dataset's class names
    assert manifest.input.mean == [0.286] and manifest.input.size == 28 and manifest.labels[9] == "Ankle boot"
    assert manifest.input.fit == "crop"  # the default fit
    assert manifest.source.dataset == "fashion-mnist" and manifest.parity["data"] == "fashion-mnist test split"
    assert "two_exit" not in list_models() and "TwoExitNet" not in list_models()


def test_a_multi_exit_factory_exports_its_weights_and_metadata(project: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "multi"
    with user_imports(project):
        from models.exits import multi_exit

        model = multi_exit()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # weights the factory alone does not make
        torch.save(model.state_dict(), project / "multi.pt")
        # --mean agrees with the model's metadata: fine; --std does not: refused
        assert cli(["export", "--model", "models.exits:multi_exit", "--weights", "multi.pt", "--out", str(out),
                    "--parity-images", "32", "--mean", "0.286", "--fit", "pad"]) == 0
        assert cli(["export", "--model", "models.exits:multi_exit", "--out", str(tmp_path / "x"),
                    "--std", "0.5"]) == 2
        assert "conflicting metadata: std: the arguments say (0.5,), MultiExit.exitserve_metadata say (0.353,)" in \
            capsys.readouterr().err
        assert cli(["export", "--model", "models.net:not_multi_exit", "--out", str(tmp_path / "x")]) == 2
        assert "returns a SmallNet, not an exitserve.EarlyExitModel" in capsys.readouterr().err
    assert cli(["export", "--out", str(tmp_path / "x"), "--mean", "0.5"]) == 2
    assert "--mean: only with --model" in capsys.readouterr().err
    manifest = load_manifest(out)
    assert [s.exit_name for s in manifest.stages] == ["layer1", "layer2", "fc"]
    assert manifest.input.fit == "pad"  # how the server fits uploads for it
    assert manifest.source.checkpoint == "multi.pt" and manifest.source.sha256
    images = manifest.input.normalize(fashion_images(16)[0])
    session = ort.InferenceSession(str(out / manifest.full_model), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(images))[-1].numpy()
    np.testing.assert_allclose(session.run(["logits"], {"image": images})[0], want, rtol=0, atol=FP32_TOLERANCE)


def test_retrofit_says_what_cannot_be_cut(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--weights", "small.pt", "--out", "runs/never.pt", *FMNIST]
    with user_imports(project):
        assert cli(["retrofit", "--backbone", "models.net:untraceable", "--exits", "layer1", *common]) == 2
        err = capsys.readouterr().err
        assert "cannot cut GatedNet: torch.fx failed tracing submodule gate (DataGate)" in err
        assert "control flow that depends on a tensor's values" in err
        assert cli(["retrofit", "--backbone", "models.net:small_net", "--exits", "layer1,layer9", *common]) == 2
        err = capsys.readouterr().err
        assert "SmallNet has no submodule 'layer9'; its submodules: stem, stem.conv, stem.bn, stem.relu, layer1, " \
               "layer1.a, " in err
    assert not (project / "runs/never.pt").exists()


def test_export_model_from_python_without_a_dataset(tmp_path: Path) -> None:
    import exitserve

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model = exitserve.MultiExit(backbone, exits={"1": head})
    rgb = dict(input_size=16, channels=3, mean=[0.5] * 3, std=[0.25] * 3, progress=False)
    manifest, parity = exitserve.export_model(model, tmp_path / "rgb", labels=["a", "b", "c"], parity_images=16,
                                              **rgb)
    assert parity.passed and manifest.parity["data"] == "random pixels (seed 0): no dataset given"
    assert (manifest.source.kind, manifest.source.model, manifest.source.dataset) == (
        "object", "exitserve.models.multi_exit.MultiExit", None)
    assert [s.exit_name for s in manifest.stages] == ["1", "6"] and manifest.input.channels == 3
    with pytest.raises(DatasetError, match="exported without a dataset: name the images to calibrate on"):
        calibrate_repository(tmp_path / "rgb", report=False, progress=False)
    with pytest.raises(ExportError, match="the exits give 3 logits but there are 2 labels"):
        exitserve.export_model(model, tmp_path / "two", labels=["a", "b"], **rgb)
    assert not (tmp_path / "two").exists()
