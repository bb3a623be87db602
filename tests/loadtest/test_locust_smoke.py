"""A short headless Locust run of ``loadtest/locustfile.py`` against a real exitserve:
no failures, every user class's accuracy reported and sane, and Locust's request counts
equal to the server's ``exitserve_requests_total`` per route."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from exitserve.server.settings import Settings
from tests.support.live import live_server

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
USER_CLASSES = {"ClassifyUser", "CheapUser", "FullDepthUser", "DeadlineUser", "BatchUser"}
USERS = len(USER_CLASSES)  # equal weights: one user of each class
RUN_S = 15
STOP_TIMEOUT_S = 30  # users finish the request in flight, so both sides count the same requests
# the served model gets about 0.93-0.94 on Fashion-MNIST at any budget (its first exit alone
# about 0.93): over every class's answers pooled (hundreds), 0.85 is over 3 standard
# deviations below that, and far above what wrong or shuffled answers get
ACCURACY_FLOOR = 0.85
CLASS_FLOOR = 0.5  # one class's answers may be few: only gross errors are caught per class


def csv_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def server_requests(url: str) -> Counter:
    """``exitserve_requests_total`` per route, summed over statuses."""
    counts: Counter = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "exitserve_requests_total":
                counts[sample.labels["route"]] += int(sample.value)
    return counts


def test_locust_smoke_run_counts_and_accuracy(served_repository: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    report = tmp_path / "accuracy.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITSERVE_LOAD_")}  # the classes' own options
    env.update(EXITSERVE_LOAD_REPORT=str(report),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with live_server(Settings(model_repository=served_repository)) as url:
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(USERS),
               "-r", str(USERS), "-t", f"{RUN_S}s", "--stop-timeout", str(STOP_TIMEOUT_S), "--host", url,
               "--csv", str(prefix), "--json-file", str(prefix), "--only-summary", "--exit-code-on-error", "1"]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=RUN_S + STOP_TIMEOUT_S + 90)
        served = server_requests(url)  # after Locust exited: every request it sent has been answered
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]

    rows = csv_rows(f"{prefix}_stats.csv")
    aggregated = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(aggregated["Failure Count"]) == 0, output[-4000:]
    assert int(aggregated["Request Count"]) > 0
    # The CSV is rewritten every second while Locust runs and not at exit, so it can miss the
    # last second's requests; the JSON file is written at exit, from the final statistics.
    final = json.loads(Path(f"{prefix}.json").read_text())
    assert sum(e["num_failures"] for e in final) == 0, output[-4000:]

    # Locust names requests "<path> (<variant>)": group them by the URL path
    sent: Counter = Counter()
    for entry in final:
        assert entry["name"].startswith("/"), entry["name"]
        sent[entry["name"].split(" ", 1)[0]] += entry["num_requests"]
    assert set(sent) == {"/classify", "/classify/batch"}
    assert sent == served, (sent, served)

    accuracy = json.loads(report.read_text())["accuracy"]
    assert set(accuracy) == USER_CLASSES, accuracy
    with open(f"{prefix}_accuracy.csv", newline="") as handle:
        assert {r["User Class"] for r in csv.DictReader(handle)} == USER_CLASSES
    for name, entry in accuracy.items():
        assert entry["answers"] > 0, (name, entry)
        assert entry["accuracy"] == entry["correct"] / entry["answers"]
        assert entry["accuracy"] > CLASS_FLOOR, (name, entry)
        assert f"accuracy {name}: " in output
    pooled = sum(e["correct"] for e in accuracy.values()) / sum(e["answers"] for e in accuracy.values())
    assert pooled > ACCURACY_FLOOR and sum(e["answers"] for e in accuracy.values()) >= 100, accuracy

    print(f"\nLocust {USERS} users, {RUN_S} s: {sum(sent.values())} requests, 0 failures "
          f"(CSV Aggregated row: {aggregated['Request Count']} requests, {float(aggregated['Requests/s']):.1f}/s); "
          f"per route Locust {dict(sent)} = server {dict(served)}")
    for entry in final:
        print(f"  {entry['method']} {entry['name']}: {entry['num_requests']} requests")
    for name, entry in sorted(accuracy.items()):
        print(f"  accuracy {name}: {entry['accuracy']:.4f} ({entry['correct']}/{entry['answers']})")
