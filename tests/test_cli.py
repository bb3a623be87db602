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
