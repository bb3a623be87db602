"""CI runs what it claims: with CI=true a skipped test fails the run (a broken install step
would otherwise turn its tests into skips and leave CI green); only GPU tests may skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pytest_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_a_missing_tool_fails_ci_instead_of_skipping() -> None:
    # no /usr/bin on PATH: Debian's prometheus "is not installed", as after a broken install step
    without_tools = {"PATH": str(Path(sys.executable).parent)}
    in_ci = pytest_run({**without_tools, "CI": "true"}, "tests/server/test_prometheus.py")
    assert in_ci.returncode == 1 and "skipped" in in_ci.stdout and "only tests marked 'gpu'" in in_ci.stdout, \
        in_ci.stdout[-2000:]
    outside_ci = pytest_run({**without_tools, "CI": ""}, "tests/server/test_prometheus.py")
    assert outside_ci.returncode == 0 and "1 skipped" in outside_ci.stdout, outside_ci.stdout[-2000:]
