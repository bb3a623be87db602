"""Schemathesis fuzzes every operation of the live server's own OpenAPI schema: no 5xx,
every status documented, every body matching its schema.

``positive_data_acceptance`` is left out: it expects every schema-valid request to be
accepted, and the schema cannot say what we refuse on purpose: bytes that are not an
image Pillow decodes, a budget below the chosen model's first exit, budget together with
thresholds. Those refusals are tested one by one elsewhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from exitserve.server.settings import Settings
from tests.support.live import live_server

SCHEMATHESIS = shutil.which("schemathesis") or str(Path(__file__).resolve().parents[2] / ".venv/bin/schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")  # 413 and 408 are right answers to bad requests too
EXAMPLES_PER_OPERATION = 150


def test_schemathesis_finds_no_server_error_or_schema_violation(served_repository: Path, tmp_path: Path) -> None:
    settings = Settings(model_repository=served_repository, max_files=8, max_body_bytes=2_000_000)
    with live_server(settings) as url:
        done = subprocess.run(
            [SCHEMATHESIS, "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--max-examples", str(EXAMPLES_PER_OPERATION),
             "--workers", "1", "--seed", "20261127", "--no-color"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    summary = done.stdout[-3000:]
    assert done.returncode == 0, summary
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) > 500, summary
    print(f"schemathesis: {generated.group(0)}")
