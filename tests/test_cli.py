"""The ``exitserve`` command: its options without PyTorch, what it says without an extra,
a user's mistake as one line and exit status 2, and a bug as a traceback."""

import argparse
import subprocess
import sys

import pytest

from exitserve import cli
from exitserve.repository.confidence import DEFAULT_RULE, RULES
from exitserve.repository.format import DEFAULT_OPSET


def test_serve_help_does_not_import_torch() -> None:
    """Building the options must not import PyTorch: the serving image has none."""
    code = ("import sys; from exitserve.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'exitserve.models.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "exitserve.cli", "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--model-repository" in help_text


def test_defaults_come_from_the_repository_contract() -> None:
    from exitserve.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export", "--out", "x"]).opset == DEFAULT_OPSET
    assert parser.parse_args(["calibrate", "--repository", "x"]).rule == DEFAULT_RULE
    sub = next(a for a in parser._actions if a.dest == "command")
    rule = next(a for a in sub.choices["calibrate"]._actions if a.dest == "rule")
    assert tuple(rule.choices) == RULES


# The first 20 Fashion-MNIST test images: the default model at full depth gets all 20 right;
# a random answer gets about 2 of them, the commonest label alone 4.
IMAGES, MOST_RIGHT = 20, 18

WITHOUT_TRAIN_EXTRA = ("import sys\n"
                       "for name in ('torch', 'onnx', 'matplotlib'):\n"
                       "    sys.modules[name] = None  # as on a serving-only install: importing them fails\n"
                       "from exitserve.cli import main\n"
                       "sys.exit(main(sys.argv[1:]))\n")


def cli_without_torch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_without_the_train_extra_the_cli_says_what_to_install(tmp_path) -> None:
    """(``calibrate`` needs no PyTorch: ONNX Runtime runs the stages; only its report's plot
    needs matplotlib, and ``--no-report`` skips it. ``models`` asks the registry, which
    imports the families, so it needs PyTorch too.)"""
    assert "serve" in cli_without_torch("--help").stdout
    for command in (["train", "--epochs", "1", "--out", str(tmp_path / "x.pt")],
                    ["export", "--out", str(tmp_path / "x")], ["evaluate"], ["models"]):
        done = cli_without_torch(*command)
        assert done.returncode == 2, done.stderr
        assert "needs the 'train' extra" in done.stderr and "pip install 'exitserve[train]'" in done.stderr


def test_models_lists_what_the_registry_holds(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="the 'train' extra is not installed")
    from exitserve.models.registry import list_models

    assert cli.main(["models"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    listed = [row[0] for row in rows]
    assert listed == list_models() and {"msdnet_fmnist", "espnetv2_fmnist", "googlenet_fmnist"} <= set(listed)
    assert all(len(row) == 2 and row[1] == "built-in" for row in rows), rows  # where each comes from


MISTAKES = {  # what a user gets wrong -> what the one line must name
    "missing checkpoint": (["evaluate", "--checkpoint", "{tmp}/none.pt"], "{tmp}/none.pt does not exist"),
    "missing data folder": (["evaluate", "--data-dir", "{tmp}/no-data"], "{tmp}/no-data"),
    "export from a missing checkpoint": (["export", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/out"],
                                         "{tmp}/none.pt does not exist"),
    "missing repository": (["calibrate", "--repository", "{tmp}/model", "--no-report"],
                           "{tmp}/model/manifest.json is missing"),
    "unknown model": (["train", "--model", "resnet_imaginary", "--out", "{tmp}/x.pt"],
                      "unknown model 'resnet_imaginary'"),
    "bad model config": (["train", "--model-config", '{{"nBlocks": 0}}', "--out", "{tmp}/x.pt"],
                         "msdnet: nBlocks, base and step must be positive"),
    "unknown model config key": (["train", "--model-config", '{{"depth": 3}}', "--out", "{tmp}/x.pt"],
                                 "msdnet: unknown config keys ['depth']"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_users_mistake_is_one_line_and_exit_status_2(mistake: str, tmp_path, capsys) -> None:
    """No traceback: the message alone, naming what is wrong."""
    pytest.importorskip("torch", reason="the 'train' extra is not installed")
    command, expected = MISTAKES[mistake]
    assert cli.main([a.format(tmp=tmp_path) for a in command]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"exitserve {command[0]}: error: ") and len(err.strip().splitlines()) == 1, err
    assert expected.format(tmp=tmp_path) in err


def test_settings_out_of_range_exit_2_without_a_traceback(tmp_path, capsys) -> None:
    assert cli.main(["serve", "--model-repository", str(tmp_path), "--default-budget", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exitserve serve: error: ") and "default_budget" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    """A TypeError from our own code is not a user's mistake: ``main`` lets it through."""

    def buggy(args: argparse.Namespace) -> int:
        return len(None)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "_run_evaluate", buggy)
    with pytest.raises(TypeError, match="NoneType"):
        cli.main(["evaluate"])


def test_serving_without_torch_answers_a_real_request(served_repository) -> None:
    """Real test images, answered right: the served model is the trained one, whole."""
    import httpx

    from tests.support.images import encode, fashion_images
    from tests.support.live import free_port, wait_until_ready

    pixels, labels = fashion_images(IMAGES)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", WITHOUT_TRAIN_EXTRA, "serve", "--model-repository",
                               str(served_repository), "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", server)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            answers = [client.post("/classify", content=encode(p), params={"budget": 1.0},
                                   headers={"content-type": "image/png"}) for p in pixels]
        assert [a.status_code for a in answers] == [200] * IMAGES, answers[0].text
        correct = sum(a.json()["class_index"] == label for a, label in zip(answers, labels))
        assert correct >= MOST_RIGHT, f"{correct} of {IMAGES} right"
    finally:
        server.kill()
        server.communicate(timeout=30)


def test_serving_never_imports_ray_and_serve_ray_without_the_extra_says_what_to_install(tmp_path) -> None:
    code = ("import sys; from exitserve.cli import build_parser; build_parser()\n"
            "from exitserve.server.http.serving import serve; from exitserve.server.http.app import create_app; create_app()\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    without_ray = ("import sys\nsys.modules['ray'] = None  # as without the 'ray' extra\n"
                   "from exitserve.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", without_ray, "serve", "--ray", "127.0.0.1:6379",
                           "--model-repository", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs the 'ray' extra" in done.stderr and "pip install 'exitserve[ray]'" in done.stderr
