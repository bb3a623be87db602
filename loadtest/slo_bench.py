"""Overload, three ways: queue (the plain server), a fixed budget, or the latency objective;
under paced open-loop arrivals and under closed-loop clients that send again at once.

Every exitserve row is driven by ``loadtest.client``, a lean Python client that keeps the
latency of answered (2xx) and refused (503) requests apart and measures its own CPU. wrk
reports one distribution over every response, so a server that refuses quickly would look
faster than it is.

1. Capacity: the plain server (full depth) under closed-loop wrk at C=32; its 2xx req/s is
   what "the full-depth server sustains", R.
2. Open loop: for each server (the plain server; exitserve at its default budget; exitserve
   with ``EXITSERVE_LATENCY_SLO_MS``), offered load at 0.5x, 1x, 2x and 4x R. Poisson
   arrivals at a fixed rate, up to ``--connections`` in flight, so overload does not slow the
   offered rate. Reported: p50/p99 over every response and over the answered ones, goodput
   (answers within the objective per second), 503s and how long they took (client side, and
   ``exitserve_refusal_latency_seconds`` on the server), and, sampled every 0.5 s from
   /metrics, the effective budget and the expected accuracy at it.
3. Closed loop (``--closed-loop``, e.g. 64,256): at each C, exitserve without an objective,
   then with objectives at 0.6x and 0.8x of the answered p99 it just measured. Reported:
   answered req/s (and its ratio to no objective), the refused share, the answered p50/p99
   against the objective, and both sides' CPU.
4. A load step for the plot: the objective server at 0.5x, then 4x, then 0.5x again; the
   answered p99 of each half second (client side) and the effective budget (from /metrics),
   drawn to ``--plot``. The 4x phase's answered p99 after its first second is reported.

    python -m exitserve.loadtest.slo_bench --repository model_repository --model msdnet_fmnist --objective-ms 50 \
        --closed-loop 64,256

Needs ``wrk``; traffic only to 127.0.0.1, bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

from exitserve.loadtest import client
from exitserve.loadtest.images import encoded_test_images
from exitserve.loadtest.overload import (
    Server,
    launch,
    measured_wrk,
    port_for,
    process_cpu_seconds,
    require_wrk,
    run_wrk,
    start_server,
    stop_server,
    write_images,
)

MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
OBJECTIVE_SHARES = (0.6, 0.8)  # closed loop: objectives at these x the answered p99 without one


# --------------------------------------------------------------------------- /metrics


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    with urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def histogram_quantile(before: dict, after: dict, name: str, q: float, **labels: str) -> float | None:
    """The q-quantile of a histogram's observations between two scrapes (the bucket's upper
    bound, as Prometheus's histogram_quantile without interpolation)."""
    buckets = []
    for (metric, labelset), count in after.items():
        if metric != f"{name}_bucket":
            continue
        d = dict(labelset)
        if any(d.get(k) != v for k, v in labels.items()):
            continue
        bound = float("inf") if d["le"] == "+Inf" else float(d["le"])
        buckets.append((bound, count - before.get((metric, labelset), 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= q * total:
            return bound
    return None


class Sampler:
    """Samples /metrics every ``period`` s on a thread: effective budget, expected accuracy,
    and the p99 of the requests answered in each period."""

    def __init__(self, base_url: str, model: str, period: float = 0.5) -> None:
        self.base_url, self.model, self.period = base_url, model, period
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        previous = scrape(self.base_url)
        while not self._stop.wait(self.period):
            try:
                current = scrape(self.base_url)
            except OSError:
                continue
            p99 = histogram_quantile(previous, current, "exitserve_request_latency_seconds", 0.99,
                                     route="/classify", model=self.model)
            self.samples.append({
                "t": time.monotonic() - self.started,
                "effective_budget": value(current, "exitserve_effective_budget", model=self.model),
                "expected_accuracy": value(current, "exitserve_expected_accuracy", model=self.model),
                "p99_ms": None if p99 is None or math.isinf(p99) else 1000 * p99,
            })
            previous = current

    def mean(self, key: str) -> float | None:
        values = [s[key] for s in self.samples if s[key] is not None]
        return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- runs


def start(kind: str, args: argparse.Namespace, port: int, log: Path, objective_ms: float | None = None,
          extra_env: dict[str, str] | None = None) -> Server:
    if kind == "plain":
        folder = args.repository / args.model
        cmd = [sys.executable, "-m", "exitserve.loadtest.plain_server", str(folder), "--port", str(port)]
        return launch(cmd, f"http://127.0.0.1:{port}", "/readyz", {}, log, "plain server", 120.0)
    env = {"EXITSERVE_DEFAULT_MODEL": args.model, "EXITSERVE_LATENCY_SLO_MS": None}
    if kind == "objective":
        env["EXITSERVE_LATENCY_SLO_MS"] = f"{objective_ms or args.objective_ms:g}"
    return start_server(args.repository, port, {**env, **(extra_env or {})}, log, label=f"exitserve ({kind})")


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def warm_up(server: Server, path: str, bodies: list[bytes]) -> None:
    client.closed_loop("127.0.0.1", port_of(server), path, bodies, 32, 3)


def driven(server: Server, run) -> tuple[client.LoadResult, float]:
    """``run()`` (a client run) and the server's CPU seconds over it."""
    before = process_cpu_seconds(server.pid)
    result = run()
    return result, process_cpu_seconds(server.pid) - before


def within(result: client.LoadResult, objective_ms: float, since_s: float = 0.0) -> tuple[float, float]:
    """(answers within the objective per second, share of all responses within it)."""
    kept = [(s, ms) for s, ms, at in zip(result.statuses, result.latencies_ms, result.answered_at) if at >= since_s]
    good = sum(1 for s, ms in kept if 200 <= s < 300 and ms <= objective_ms)
    share = sum(1 for _, ms in kept if ms <= objective_ms) / len(kept) if kept else 0.0
    return good / max(result.duration_s - since_s, 1e-9), share


def measure(kind: str, args: argparse.Namespace, bodies: list[bytes], capacity: float, port: int,
            log: Path) -> list[dict]:
    server = start(kind, args, port, log)
    path = "/classify" if kind == "plain" else f"/classify?model={args.model}"
    rows = []
    try:
        warm_up(server, path, bodies)
        for m in MULTIPLIERS:
            rate = m * capacity
            print(f"{kind} at {m}x ({rate:.0f}/s) ...", file=sys.stderr, flush=True)
            before = scrape(server.url) if kind != "plain" else {}
            with Sampler(server.url, args.model) if kind != "plain" else nullcontext() as sampler:
                result, cpu = driven(server, lambda: client.paced("127.0.0.1", port_of(server), path, bodies, rate,
                                                                   args.connections, args.duration))
            after = scrape(server.url) if kind != "plain" else {}
            rows.append(summarise(kind, m, rate, result, cpu, before, after, sampler, args))
    finally:
        stop_server(server)
    return rows


def summarise(kind: str, m: float, rate: float, result: client.LoadResult, server_cpu: float, before: dict,
              after: dict, sampler: Sampler | None, args: argparse.Namespace) -> dict:
    summary = result.summary()
    refusal_p99 = refusal_max = None
    mean_cost = None
    if after:
        q = histogram_quantile(before, after, "exitserve_refusal_latency_seconds", 0.99, route="/classify")
        refusal_p99 = None if q is None else 1000 * q
        q = histogram_quantile(before, after, "exitserve_refusal_latency_seconds", 1.0, route="/classify")
        refusal_max = None if q is None else 1000 * q
        images = (value(after, "exitserve_images_total", model=args.model) or 0) - \
            (value(before, "exitserve_images_total", model=args.model) or 0)
        cost = (value(after, "exitserve_cost_fraction_total", model=args.model) or 0) - \
            (value(before, "exitserve_cost_fraction_total", model=args.model) or 0)
        mean_cost = cost / images if images else None
    goodput, within_share = within(result, args.objective_ms)
    status = summary["status_counts"]
    return {
        "server": kind, "multiplier": m, "offered_per_s": rate, "duration_s": result.duration_s,
        "achieved_2xx_per_s": summary["answered_per_s"], "refused_503": status.get("503", 0),
        "refused_per_s": summary["refused_per_s"],
        "other_status": {k: n for k, n in status.items() if not (k.startswith("2") or k == "503")},
        "socket_errors": {"client": result.errors} if result.errors else {}, "not_sent": result.not_sent,
        "p99_ms": summary["all_ms"]["p99"], "p50_ms": summary["all_ms"]["p50"],
        "answered_p50_ms": summary["answered_ms"]["p50"], "answered_p99_ms": summary["answered_ms"]["p99"],
        "refused_p50_ms": summary["refused_ms"]["p50"],
        "goodput_per_s": goodput, "within_share": within_share,
        "refusal_p99_ms": refusal_p99, "refusal_max_ms": refusal_max,
        "effective_budget": sampler.mean("effective_budget") if sampler else 1.0,
        "min_effective_budget": min((s["effective_budget"] for s in sampler.samples
                                     if s["effective_budget"] is not None), default=None) if sampler else 1.0,
        "expected_accuracy": sampler.mean("expected_accuracy") if sampler else args.full_accuracy,
        "mean_cost": mean_cost if mean_cost is not None else (1.0 if kind == "plain" else None),
        "server_cpu_pct": 100 * server_cpu / result.duration_s, "client_cpu_pct": summary["client_cpu_pct"],
    }


def closed_loop_row(kind: str, connections: int, objective_ms: float | None, share: float | None,
                    result: client.LoadResult, server_cpu: float, sampler: Sampler) -> dict:
    summary = result.summary(since_s=1.0)  # the first second: the objective finding its floor
    return {
        "server": kind, "connections": connections, "objective_ms": objective_ms, "objective_share": share,
        "answered_per_s": summary["answered_per_s"], "refused_per_s": summary["refused_per_s"],
        "refused_share": summary["refused_share"], "status_counts": summary["status_counts"],
        "answered_ms": summary["answered_ms"], "refused_ms": summary["refused_ms"], "errors": result.errors,
        "server_cpu_pct": 100 * server_cpu / result.duration_s, "client_cpu_pct": summary["client_cpu_pct"],
        "effective_budget": sampler.mean("effective_budget"), "expected_accuracy": sampler.mean("expected_accuracy"),
    }


def closed_loop(args: argparse.Namespace, bodies: list[bytes], port: int, log: Path) -> list[dict]:
    """At each C: no objective, then objectives at OBJECTIVE_SHARES x its answered p99."""
    path = f"/classify?model={args.model}"
    rows: list[dict] = []
    for connections in args.closed_loop:
        plan: list[tuple[str, float | None, float | None]] = [("fixed", None, None)]
        while plan:
            kind, objective_ms, share = plan.pop(0)
            server = start(kind, args, port, log, objective_ms)
            try:
                warm_up(server, path, bodies)
                print(f"closed loop C={connections}, {kind} {objective_ms or ''} ...", file=sys.stderr, flush=True)
                with Sampler(server.url, args.model) as sampler:
                    result, cpu = driven(server, lambda: client.closed_loop(
                        "127.0.0.1", port_of(server), path, bodies, connections, args.duration + 1))
            finally:
                stop_server(server)
            row = closed_loop_row(kind, connections, objective_ms, share, result, cpu, sampler)
            rows.append(row)
            if kind == "fixed":
                p99 = row["answered_ms"]["p99"]
                plan += [("objective", round(f * p99, 1), f) for f in OBJECTIVE_SHARES]
    for row in rows:
        base = next(r for r in rows if r["connections"] == row["connections"] and r["server"] == "fixed")
        row["vs_no_objective"] = row["answered_per_s"] / base["answered_per_s"]
    return rows


def refusal_cost(args: argparse.Namespace, bodies: list[bytes], port: int, log: Path, closed: list[dict]) -> dict:
    """What a refusal costs the server: an objective no request can meet (1 ms) puts the line
    at the floor at once, with its smallest limit and room for one waiter, so nearly every
    request of a closed loop at C=64 is refused on arrival. The server's CPU, less the
    answered requests at the no-objective rows' CPU per answer, per refusal."""
    path = f"/classify?model={args.model}"
    server = start("objective", args, port, log, 1.0, {"EXITSERVE_SLO_MAX_WAITING": "1"})
    try:
        warm_up(server, path, bodies)
        print("refusal cost ...", file=sys.stderr, flush=True)
        result, cpu = driven(server, lambda: client.closed_loop("127.0.0.1", port_of(server), path, bodies, 64,
                                                                 args.duration))
    finally:
        stop_server(server)
    summary = result.summary()
    answered = summary["answered_per_s"] * result.duration_s
    refused = summary["refused_per_s"] * result.duration_s
    base = [r for r in closed if r["server"] == "fixed"]
    per_answer_ms = (sum(r["server_cpu_pct"] / 100 / r["answered_per_s"] for r in base) / len(base) * 1000
                     if base else None)
    per_refusal_ms = ((cpu - answered * per_answer_ms / 1000) / refused * 1000
                      if refused and per_answer_ms is not None else None)
    return {"answered_per_s": summary["answered_per_s"], "refused_per_s": summary["refused_per_s"],
            "server_cpu_s": cpu, "cpu_ms_per_answer_without_objective": per_answer_ms,
            "cpu_ms_per_refusal": per_refusal_ms, "refused_ms": summary["refused_ms"]}


def load_step(args: argparse.Namespace, bodies: list[bytes], capacity: float, port: int,
              log: Path) -> dict:
    server = start("objective", args, port, log)
    path = f"/classify?model={args.model}"
    phases = []
    try:
        warm_up(server, path, bodies)
        with Sampler(server.url, args.model) as sampler:
            for m, seconds in ((0.5, args.step_s), (4.0, 2 * args.step_s), (0.5, 2 * args.step_s)):
                print(f"load step {m}x ...", file=sys.stderr, flush=True)
                offset = time.monotonic() - sampler.started
                result = client.paced("127.0.0.1", port_of(server), path, bodies, m * capacity, args.connections,
                                      seconds)
                phases.append({"multiplier": m, "offset_s": offset, "result": result})
                sampler.samples.append({"t": time.monotonic() - sampler.started, "marker": f"end of {m}x",
                                        "effective_budget": None, "expected_accuracy": None, "p99_ms": None})
    finally:
        stop_server(server)
    step = phases[1]["result"]
    return {
        "samples": sampler.samples,
        "answered_p99_per_half_second": [
            point for phase in phases for point in half_second_p99(phase["result"], phase["offset_s"])],
        "step_4x": step.summary(since_s=1.0),
        "step_4x_first_second": step.summary() | {"note": "the whole 4x phase, its first second included"},
    }


def half_second_p99(result: client.LoadResult, offset_s: float) -> list[dict]:
    bins: dict[int, list[float]] = {}
    for status, ms, at in zip(result.statuses, result.latencies_ms, result.answered_at):
        if 200 <= status < 300:
            bins.setdefault(int(at / 0.5), []).append(ms)
    return [{"t": offset_s + (k + 1) * 0.5, "p99_ms": client.percentiles(v)["p99"]} for k, v in sorted(bins.items())]


def plot(step: dict, objective_ms: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = step["samples"]
    points = [s for s in samples if "marker" not in s]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([s["t"] for s in points if s["effective_budget"] is not None],
             [s["effective_budget"] for s in points if s["effective_budget"] is not None], drawstyle="steps-post")
    top.set_ylabel("effective budget")
    top.set_title("Latency objective during a load step (0.5x -> 4x -> 0.5x of full-depth capacity)")
    answered = step["answered_p99_per_half_second"]
    bottom.plot([p["t"] for p in answered], [p["p99_ms"] for p in answered], marker=".", linestyle="-")
    bottom.axhline(objective_ms, color="red", linestyle="--", label=f"objective {objective_ms:g} ms")
    bottom.set_ylabel("answered p99 per 0.5 s (ms)")
    bottom.set_xlabel("seconds")
    bottom.legend()
    for s in samples:
        if "marker" in s:
            for ax in (top, bottom):
                ax.axvline(s["t"], color="grey", linewidth=0.6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(rows: list[dict], capacity: float, args: argparse.Namespace) -> str:
    names = {"plain": "plain server (full depth)", "fixed": "exitserve, fixed default budget",
             "objective": f"exitserve, {args.objective_ms:g} ms objective"}
    lines = [f"Full-depth capacity (plain server, closed-loop wrk C=32): **{capacity:.0f} req/s**; objective "
             f"{args.objective_ms:g} ms; paced arrivals (loadtest.client), {args.connections} connections, "
             f"{args.duration} s per row.", "",
             "| offered | server | 2xx/s | p50 / p99 ms, all | p50 / p99 ms, answered | goodput/s | 503s | "
             "503 p50 ms (client) | effective budget (mean / min) | expected accuracy | mean cost | CPU server / client |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['multiplier']:g}x ({r['offered_per_s']:.0f}/s) | {names[r['server']]} | {r['achieved_2xx_per_s']:.0f} "
            f"| {f(r['p50_ms'], '.1f')} / {f(r['p99_ms'], '.1f')} | {f(r['answered_p50_ms'], '.1f')} / "
            f"{f(r['answered_p99_ms'], '.1f')} | {r['goodput_per_s']:.0f} | {r['refused_503']} | "
            f"{f(r['refused_p50_ms'], '.1f')} | "
            f"{f(r['effective_budget'], '.3f')} / {f(r['min_effective_budget'], '.3f')} | "
            f"{f(r['expected_accuracy'] and 100 * r['expected_accuracy'], '.2f')}% | {f(r['mean_cost'], '.3f')} | "
            f"{r['server_cpu_pct']:.0f}% / {r['client_cpu_pct']:.0f}% |")
    return "\n".join(lines)


def closed_loop_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Closed loop (loadtest.client: each connection sends again as soon as it is answered or refused), "
             f"{args.duration} s per row after the first second:", "",
             "| C | objective | answered/s | vs no objective | refused | answered p50 / p99 ms | p99 / objective | "
             "503 p50 ms | effective budget | CPU server / client |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        objective = "none" if r["objective_ms"] is None else f"{r['objective_ms']:g} ms ({r['objective_share']:g}x)"
        ratio = "-" if r["objective_ms"] is None else f"{r['answered_ms']['p99'] / r['objective_ms']:.2f}"
        lines.append(
            f"| {r['connections']} | {objective} | {r['answered_per_s']:.0f} | {r['vs_no_objective']:.2f}x | "
            f"{100 * r['refused_share']:.1f}% | {f(r['answered_ms']['p50'], '.1f')} / {f(r['answered_ms']['p99'], '.1f')} "
            f"| {ratio} | {f(r['refused_ms']['p50'], '.0f')} | {f(r['effective_budget'], '.3f')} | "
            f"{r['server_cpu_pct']:.0f}% / {r['client_cpu_pct']:.0f}% |")
    return "\n".join(lines)


def targets(closed: list[dict], step: dict, objective_ms: float) -> list[str]:
    """The issue's targets, met or MISSED, with the numbers."""
    lines = []
    for r in closed:
        if r["objective_ms"] is None:
            continue
        what = f"C={r['connections']}, objective {r['objective_ms']:g} ms ({r['objective_share']:g}x)"
        p99 = r["answered_ms"]["p99"]
        lines.append(f"- {'met' if p99 is not None and p99 <= 1.2 * r['objective_ms'] else 'MISSED'}: {what}: "
                     f"answered p99 {f(p99, '.1f')} ms (target <= {1.2 * r['objective_ms']:.1f})")
        lines.append(f"- {'met' if r['vs_no_objective'] >= 0.95 else 'MISSED'}: {what}: answered "
                     f"{r['answered_per_s']:.0f}/s, {r['vs_no_objective']:.2f}x no objective (target >= 0.95x)")
        if r["connections"] == 64:
            lines.append(f"- {'met' if r['refused_share'] <= 0.10 else 'MISSED'}: {what}: refused "
                         f"{100 * r['refused_share']:.1f}% (target <= 10%)")
    p99 = step["step_4x"]["answered_ms"]["p99"]
    lines.append(f"- {'met' if p99 is not None and p99 <= 1.5 * objective_ms else 'MISSED'}: open loop at 4x, "
                 f"after the first second of the step: answered p99 {f(p99, '.1f')} ms (target <= "
                 f"{1.5 * objective_ms:.1f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--objective-ms", type=float, default=50.0)
    parser.add_argument("--duration", type=int, default=15, help="seconds per row")
    parser.add_argument("--step-s", type=int, default=8, help="seconds of the first phase of the load step")
    parser.add_argument("--connections", type=int, default=256, help="open loop: requests in flight, at most")
    parser.add_argument("--closed-loop", default="64,256",
                        help="closed-loop client counts (comma-separated; empty: skip the closed loop)")
    parser.add_argument("--port", type=int, default=8860,
                        help="first port; each server gets one of the next (0: any free port for each)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--wrk-timeout", default="10s")
    parser.add_argument("--servers", default="plain,fixed,objective")
    parser.add_argument("--capacity-s", type=int, default=8, help="seconds of the full-depth capacity run")
    parser.add_argument("--out", type=Path, default=Path("runs/slo_bench.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/slo_load_step.png"))
    args = parser.parse_args(argv)
    args.closed_loop = [int(c) for c in args.closed_loop.split(",") if c.strip()]
    wrk = require_wrk()
    folder = args.repository / args.model
    report = json.loads((folder / "calibration_report.json").read_text())
    args.full_accuracy = max(report["curve"], key=lambda p: p["budget"])["expected_accuracy"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bodies, _ = encoded_test_images(args.images)
    with tempfile.TemporaryDirectory(prefix="exitserve-slo-bench-") as tmp:
        images = Path(tmp)
        write_images(images, args.images)
        plain = start("plain", args, port_for(args.port, 0), args.out.with_suffix(".plain.log"))
        try:
            run_wrk(wrk, f"{plain.url}/classify", images, 32, 3, "capacity (warm-up)", args.wrk_timeout)
            run = measured_wrk(wrk, plain, f"{plain.url}/classify", images, 32, args.capacity_s, "capacity",
                               args.wrk_timeout)
        finally:
            stop_server(plain)
    capacity = run.ok / run.duration
    rows: list[dict] = []
    for i, kind in enumerate(k.strip() for k in args.servers.split(",")):
        rows += measure(kind, args, bodies, capacity, port_for(args.port, 1 + i), args.out.with_suffix(f".{kind}.log"))
    closed = closed_loop(args, bodies, port_for(args.port, 4), args.out.with_suffix(".closed.log"))
    refusals = refusal_cost(args, bodies, port_for(args.port, 6), args.out.with_suffix(".refusal.log"), closed)
    step = load_step(args, bodies, capacity, port_for(args.port, 5), args.out.with_suffix(".step.log"))
    plot(step, args.objective_ms, args.plot)
    checks = targets(closed, step, args.objective_ms)
    args.out.write_text(json.dumps({"capacity_per_s": capacity, "objective_ms": args.objective_ms,
                                    "connections": args.connections, "duration_s": args.duration,
                                    "rows": rows, "closed_loop": closed, "load_step": step["samples"],
                                    "load_step_answered_p99": step["answered_p99_per_half_second"],
                                    "step_4x": step["step_4x"], "refusal_cost": refusals, "targets": checks},
                                   indent=2))
    print(markdown(rows, capacity, args))
    if closed:
        print("\n" + closed_loop_markdown(closed, args))
    print("\nLoad step, 4x phase after its first second (client side): answered "
          f"{step['step_4x']['answered_per_s']:.0f}/s, p50 / p99 {f(step['step_4x']['answered_ms']['p50'], '.1f')} / "
          f"{f(step['step_4x']['answered_ms']['p99'], '.1f')} ms, refused {100 * step['step_4x']['refused_share']:.1f}%")
    print(f"\nRefusal cost (closed loop C=64, an objective of 1 ms, one place in line): "
          f"{refusals['refused_per_s']:.0f} refused/s and {refusals['answered_per_s']:.0f} answered/s; server CPU per "
          f"refusal {f(refusals['cpu_ms_per_refusal'], '.3f')} ms, per answer without an objective "
          f"{f(refusals['cpu_ms_per_answer_without_objective'], '.3f')} ms")
    print("\nTargets (issue 27):\n" + "\n".join(checks))
    print(f"\nplot: {args.plot}; written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
