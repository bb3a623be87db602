"""The wrk harnesses run end to end on a real server, briefly: the side-by-side benchmark's
wrk part and the per-request breakdown. Numbers are not asserted (speed belongs in
BENCHMARKS.md), only that every request was answered and the reports hold what they claim.
Every server gets a free port (``--port 0``): no fixed port to collide with whatever else
runs on the machine, and the harness refuses a port someone else answers on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exitserve.loadtest import breakdown, wrk_bench

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by scripts/install.sh")


def test_wrk_bench_rows_and_ratios(served_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "wrk.json"
    status = wrk_bench.main(["--repository", str(served_repository), "--duration", "1", "--concurrency", "1,4",
                             "--only", "exitserve_default,plain,noop", "--images", "16", "--port", "0",
                             "--out", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    rows = {(r["key"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(k, c) for k in ("exitserve_default", "plain", "noop") for c in (1, 4)}
    for row in rows.values():
        assert row["ok_per_s"] > 0 and row["non_2xx"] == 0 and not row["socket_errors"], row["configuration"]
        assert row["server_cpu_s"] > 0 and row["client_cpu_s"] > 0
    ratio = next(q for q in report["ratios"] if q["key"] == "exitserve_default" and q["concurrency"] == 4)
    assert ratio["vs_plain"] == pytest.approx(rows["exitserve_default", 4]["ok_per_s"] / rows["plain", 4]["ok_per_s"])
    assert "C=32" in report["guard"]["verdict"]  # not measured at 32 here: the guard says so, and fails
    assert report["guard"]["passed"] is False


def test_breakdown_table(served_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "breakdown.json"
    assert breakdown.main(["--repository", str(served_repository), "--duration", "1", "--concurrency", "1,4",
                           "--images", "16", "--port", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["phases_ms"]]
    assert [r["configuration"] for r in ours] == ["exitserve raw body C=1", "exitserve raw body C=4",
                                                  "exitserve multipart C=1", "exitserve multipart C=4"]
    for r in ours:
        # the previous run's last requests (up to its concurrency, 4) may finish after the scrape
        assert r["non_2xx"] == 0 and abs(r["timed_requests"] - r["requests"]) <= 4
        phases = r["phases_ms"]
        assert phases["decode"] > 0 and phases["stage_0"] > 0
        assert (phases.get("multipart", 0.0) > 0) == ("multipart" in r["configuration"])
        assert r["latency_ms"]["mean"] > phases["app"] > 0  # the client sees more than the app spends
    assert len(rows) - len(ours) == 2  # the no-op floor at both concurrencies


def test_slo_bench_rows_and_plot(served_repository: Path, tmp_path: Path) -> None:
    from exitserve.loadtest import slo_bench

    out, plot = tmp_path / "slo.json", tmp_path / "step.png"
    assert slo_bench.main(["--repository", str(served_repository), "--duration", "1", "--step-s", "1",
                           "--capacity-s", "2", "--servers", "plain,objective", "--images", "16", "--port", "0",
                           "--closed-loop", "8", "--out", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert report["capacity_per_s"] > 0
    rows = report["rows"]
    assert [(r["server"], r["multiplier"]) for r in rows] == [(k, m) for k in ("plain", "objective")
                                                               for m in slo_bench.MULTIPLIERS]
    for r in rows:
        assert r["achieved_2xx_per_s"] > 0 and not r["socket_errors"], r
        assert 0 <= r["within_share"] <= 1 and 0 <= r["goodput_per_s"] <= r["achieved_2xx_per_s"] + 1e-9
    objective_rows = [r for r in rows if r["server"] == "objective"]
    assert all(0 < r["effective_budget"] <= 1 and 0 < r["expected_accuracy"] < 1 for r in objective_rows)
    assert plot.stat().st_size > 10_000  # drawn
    assert any(s.get("effective_budget") for s in report["load_step"])
    assert report["load_step_answered_p99"] and report["step_4x"]["responses"] > 0
    closed = report["closed_loop"]
    assert [(r["server"], r["objective_share"]) for r in closed] == [("fixed", None), ("objective", 0.6),
                                                                      ("objective", 0.8)]
    p99 = closed[0]["answered_ms"]["p99"]
    assert [r["objective_ms"] for r in closed[1:]] == [round(0.6 * p99, 1), round(0.8 * p99, 1)]
    for r in closed:
        assert r["answered_per_s"] > 0 and r["errors"] == 0 and set(r["status_counts"]) <= {"200", "503"}, r
    assert closed[0]["vs_no_objective"] == 1.0
    assert any(line.startswith("- met") or line.startswith("- MISSED") for line in report["targets"])
