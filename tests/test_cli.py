import subprocess
import sys

from exitserve.repository.confidence import DEFAULT_RULE, RULES
from exitserve.repository.format import DEFAULT_OPSET


def test_serve_help_does_not_import_torch() -> None:
    """Building the options must not import PyTorch: the serving image has none."""
    code = ("import sys; from exitserve.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'models.train') if m in sys.modules))")
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
    needs matplotlib, and ``--no-report`` skips it.)"""
    from models.registry import list_models

    assert "serve" in cli_without_torch("--help").stdout
    listed = cli_without_torch("models")
    assert listed.returncode == 0 and listed.stdout.split() == list_models()
    for command in (["train", "--epochs", "1", "--out", str(tmp_path / "x.pt")],
                    ["export", "--out", str(tmp_path / "x")], ["evaluate"]):
        done = cli_without_torch(*command)
        assert done.returncode == 2, done.stderr
        assert "needs the 'train' extra" in done.stderr and "pip install 'exitserve[train]'" in done.stderr


def test_serving_without_torch_answers_a_real_request(served_repository) -> None:
    import httpx

    from tests.server.images import encode, fashion_images
    from tests.server.live import free_port, wait_until_ready

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", WITHOUT_TRAIN_EXTRA, "serve", "--model-repository",
                               str(served_repository), "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", server)
        answer = httpx.post(f"http://127.0.0.1:{port}/classify", content=encode(fashion_images(1)[0][0]),
                            headers={"content-type": "image/png"})
        assert answer.status_code == 200 and 0 <= answer.json()["class_index"] < 10
    finally:
        server.terminate()
        server.wait(30)


def test_serving_never_imports_ray_and_serve_ray_without_the_extra_says_what_to_install(tmp_path) -> None:
    code = ("import sys; from exitserve.cli import build_parser; build_parser()\n"
            "from server.http.serving import serve; from server.http.app import create_app; create_app()\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    without_ray = ("import sys\nsys.modules['ray'] = None  # as without the 'ray' extra\n"
                   "from exitserve.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", without_ray, "serve", "--ray", "127.0.0.1:6379",
                           "--model-repository", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs the 'ray' extra" in done.stderr and "pip install 'exitserve[ray]'" in done.stderr
