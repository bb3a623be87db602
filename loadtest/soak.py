"""Soak test: exitserve under steady Locust load, with the server's memory sampled over time.

Starts exitserve on loopback, waits until it is ready, runs Locust headless with
``loadtest/locustfile.py`` (mixed single-image and batch users) for ``--duration``
seconds, and samples the server's RSS (VmRSS) every ``--interval`` seconds. Reports
requests, failures and requests/s (Locust's Aggregated row), RSS at the end of the
warm-up, at the end and its maximum, and the growth after the warm-up, as Markdown and
JSON (``--out``, with the RSS series; Locust's CSVs go next to it). Traffic goes only to
127.0.0.1, for ``--duration`` seconds. The server is stopped at the end whatever happens.

    python -m exitserve.loadtest.soak --repository model_repository --duration 600 --warmup 60 --users 16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from exitserve.loadtest.overload import ROOT, Server, start_server, stop_server

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def rss_mib(pid: int) -> float | None:
    """VmRSS of a live process in MiB, from /proc/<pid>/status; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        return None
    return None


def locust_command() -> list[str]:
    """The venv's ``locust`` next to this interpreter, else ``python -m locust``."""
    binary = Path(sys.executable).parent / "locust"
    return [str(binary)] if binary.is_file() and os.access(binary, os.X_OK) else [sys.executable, "-m", "locust"]


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_stats(prefix: Path) -> dict:
    """Locust's ``<prefix>_stats.csv``: the Aggregated row and one row per request name."""
    path = prefix.with_name(prefix.name + "_stats.csv")
    if not path.is_file():
        raise RuntimeError(f"Locust wrote no {path}")

    def row_summary(row: dict) -> dict:
        def num(key: str) -> float | None:
            try:
                return float(row[key])
            except (KeyError, TypeError, ValueError):
                return None
        return {"type": row.get("Type", ""), "name": row["Name"], "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]), "requests_per_s": num("Requests/s"),
                "failures_per_s": num("Failures/s"), "median_ms": num("Median Response Time"),
                "average_ms": num("Average Response Time"), "p99_ms": num("99%"), "max_ms": num("Max Response Time")}

    with open(path, newline="") as handle:
        rows = [row_summary(row) for row in csv.DictReader(handle)]
    aggregated = next((r for r in rows if r["name"] == "Aggregated"), None)
    if aggregated is None:
        raise RuntimeError(f"{path}: no Aggregated row")
    return {"aggregated": aggregated, "by_name": [r for r in rows if r["name"] != "Aggregated"], "csv": str(path)}


def load_start_time(prefix: Path) -> float | None:
    """Unix time of Locust's first stats-history row (when the load began), if any."""
    path = prefix.with_name(prefix.name + "_stats_history.csv")
    try:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                return float(row["Timestamp"])
    except (OSError, KeyError, ValueError):
        return None
    return None


def run_locust(server: Server, args: argparse.Namespace, prefix: Path, log: Path) -> tuple[int, list[dict], float]:
    """Run Locust to completion, sampling the server's RSS. Returns (exit status, samples, start)."""
    cmd = locust_command() + [
        "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users), "-r", str(args.users),
        "-t", f"{args.duration}s", "--host", server.url, "--csv", str(prefix), "--only-summary",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    samples: list[dict] = []

    def sample() -> float | None:
        rss = rss_mib(server.pid)
        if rss is not None:
            samples.append({"unix": time.time(), "rss_mib": rss})
        return rss

    sample()  # idle, ready server
    started = time.time()
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + args.duration + 180  # Locust's own start-up and shutdown on top
    try:
        next_sample = time.monotonic() + args.interval
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Locust still running {args.duration + 180} s after start; stopped")
            if server.proc.poll() is not None:
                raise RuntimeError(f"exitserve exited with {server.proc.returncode} during the soak:\n"
                                   f"{server.log_tail()}")
            if time.monotonic() >= next_sample:
                next_sample += args.interval
                rss = sample()
                peak = max(s["rss_mib"] for s in samples)
                print(f"\rsoak: {time.time() - started:5.0f}/{args.duration} s, server RSS {rss or 0:7.1f} MiB "
                      f"(max {peak:7.1f}), {len(samples)} samples", end="", file=sys.stderr, flush=True)
            try:
                proc.wait(timeout=max(0.05, min(1.0, next_sample - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
    finally:
        stop_process(proc)
        print(file=sys.stderr)
    sample()  # the end: load over, server still up
    return proc.returncode, samples, started


def summarize(samples: list[dict], load_start: float, warmup: float) -> dict:
    """RSS at the end of the warm-up (first sample at or after it), at the end, maximum, growth."""
    for s in samples:
        s["t_s"] = round(s["unix"] - load_start, 3)
    after = [s for s in samples if s["t_s"] >= warmup]
    warm = after[0] if after else samples[-1]
    end = samples[-1]
    out = {
        "rss_start_mib": samples[0]["rss_mib"],
        "rss_warmup_end_mib": warm["rss_mib"], "warmup_sample_t_s": warm["t_s"],
        "rss_end_mib": end["rss_mib"],
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        "growth_after_warmup_pct": 100 * (end["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"],
    }
    tail = [s for s in samples if s["t_s"] >= warm["t_s"]]
    if len(tail) >= 3 and tail[-1]["t_s"] - tail[0]["t_s"] >= 120:  # a trend over less is mostly noise
        n = len(tail)
        mean_t = sum(s["t_s"] for s in tail) / n
        mean_r = sum(s["rss_mib"] for s in tail) / n
        var = sum((s["t_s"] - mean_t) ** 2 for s in tail)
        cov = sum((s["t_s"] - mean_t) * (s["rss_mib"] - mean_r) for s in tail)
        out["rss_slope_after_warmup_mib_per_h"] = 3600 * cov / var
    return out


def markdown(report: dict) -> str:
    agg, rss = report["locust"]["aggregated"], report["rss"]
    failure_pct = 100 * agg["failures"] / agg["requests"] if agg["requests"] else 0.0
    lines = [
        f"Soak: {report['users']} Locust users, {report['duration_s']} s (warm-up {report['warmup_s']} s), "
        f"RSS sampled every {report['interval_s']} s ({len(report['rss_series'])} samples)",
        "",
        "| requests | failures | requests/s | RSS end of warm-up MiB | RSS end MiB | RSS max MiB | growth after warm-up |",
        "|---|---|---|---|---|---|---|",
        f"| {agg['requests']} | {agg['failures']} ({failure_pct:.2f}%) | {agg['requests_per_s'] or 0:.1f} | "
        f"{rss['rss_warmup_end_mib']:.1f} | {rss['rss_end_mib']:.1f} | {rss['rss_max_mib']:.1f} | "
        f"{rss['growth_after_warmup_pct']:+.2f}% |",
        "",
        "| request | requests | failures | requests/s | median ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["locust"]["by_name"]:
        lines.append(f"| {r['type']} {r['name']} | {r['requests']} | {r['failures']} | {r['requests_per_s'] or 0:.1f} | "
                     f"{r['median_ms'] or 0:.0f} | {r['p99_ms'] or 0:.0f} |")
    if "rss_slope_after_warmup_mib_per_h" in rss:
        lines += ["", f"RSS trend after warm-up (least squares): {rss['rss_slope_after_warmup_mib_per_h']:+.1f} MiB/h; "
                  f"idle RSS before the load: {rss['rss_start_mib']:.1f} MiB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="model repository (folder of model folders)")
    parser.add_argument("--duration", type=int, default=600, help="seconds of Locust load")
    parser.add_argument("--warmup", type=int, default=60, help="seconds of the load before the RSS baseline")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--out", type=Path, default=Path("runs/soak.json"))
    args = parser.parse_args(argv)
    if not args.repository.is_dir():
        parser.error(f"{args.repository} is not a directory")
    if args.warmup >= args.duration:
        parser.error("--warmup must be shorter than --duration")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    prefix = args.out.with_suffix("")  # Locust writes <prefix>_stats.csv, _stats_history.csv, _failures.csv ...
    for stale in prefix.parent.glob(prefix.name + "_*.csv"):
        stale.unlink()
    locust_log, server_log = args.out.with_suffix(".locust.log"), args.out.with_suffix(".server.log")

    server = start_server(args.repository, args.port, {}, server_log, label="exitserve")
    try:
        locust_status, samples, started = run_locust(server, args, prefix, locust_log)
    finally:
        server_status = stop_server(server)
    stats = read_stats(prefix)
    load_start = load_start_time(prefix) or started
    report = {
        "repository": str(args.repository), "users": args.users, "duration_s": args.duration,
        "warmup_s": args.warmup, "interval_s": args.interval, "cpu_count": os.cpu_count(),
        "locust_exit_status": locust_status, "server_exit_status": server_status,
        "locust": stats, "rss": summarize(samples, load_start, args.warmup), "rss_series": samples,
        "locust_log": str(locust_log), "server_log": str(server_log),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nwritten: {args.out} (Locust CSVs: {prefix}_*.csv)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
