"""Overload, three ways: queue (the plain server), a fixed budget, or the latency objective.

1. Capacity: the plain server (full depth) under closed-loop wrk at C=32; its 2xx req/s is
   what "the full-depth server sustains", R.
2. For each server (the plain server; exitserve at its default budget; exitserve with
   ``EXITSERVE_LATENCY_SLO_MS``), offered load at 0.5x, 1x, 2x and 4x R with
   ``loadtest/wrk/paced.lua`` (Poisson arrivals at a fixed rate, up to ``--connections`` in
   flight, so overload does not slow the offered rate): p99 over all answers, goodput
   (answers within the objective per second: wrk's share of responses within it, minus
   the 503s, every one of which the server refused within the objective), 503s, how fast
   the refusals were (``exitserve_refusal_latency_seconds``), and, sampled every 0.5 s
   from /metrics, the effective budget and the expected accuracy at it.
3. A load step for the plot: the objective server at 0.5x, then 4x, then 0.5x again,
   /metrics sampled every 0.5 s (effective budget, expected accuracy, and the p99 of each
   half-second from the latency histogram's buckets), drawn to ``--plot``.

    python -m exitserve.loadtest.slo_bench --repository model_repository --model msdnet_fmnist --objective-ms 50

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

from exitserve.loadtest.overload import (
    Server,
    WrkRun,
    launch,
    measured_wrk,
    port_for,
    require_wrk,
    run_wrk,
    start_server,
    stop_server,
    write_images,
)

PACED_SCRIPT = Path(__file__).resolve().parent / "wrk" / "paced.lua"
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
WITHIN_MARKER = "WITHIN_OBJECTIVE "


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


def start(kind: str, args: argparse.Namespace, port: int, log: Path) -> Server:
    if kind == "plain":
        folder = args.repository / args.model
        cmd = [sys.executable, "-m", "exitserve.loadtest.plain_server", str(folder), "--port", str(port)]
        return launch(cmd, f"http://127.0.0.1:{port}", "/readyz", {}, log, "plain server", 120.0)
    env = {"EXITSERVE_DEFAULT_MODEL": args.model, "EXITSERVE_LATENCY_SLO_MS": None}
    if kind == "objective":
        env["EXITSERVE_LATENCY_SLO_MS"] = str(args.objective_ms)
    return start_server(args.repository, port, env, log, label=f"exitserve ({kind})")


def paced(wrk: str, server: Server, path: str, images: Path, rate: float, args: argparse.Namespace,
          label: str, duration: int | None = None) -> tuple[WrkRun, float]:
    """One paced run, and the share of its responses within the objective."""
    env = {"EXITSERVE_WRK_RATE": f"{rate:.3f}", "EXITSERVE_WRK_OBJECTIVE_MS": str(args.objective_ms)}
    run = measured_wrk(wrk, server, f"{server.url}{path}", images, args.connections, duration or args.duration,
                       label, args.wrk_timeout, script=PACED_SCRIPT, env=env)
    within = next(json.loads(line[len(WITHIN_MARKER):]) for line in run.output.splitlines()
                  if line.startswith(WITHIN_MARKER))
    return run, within["share"]


def measure(kind: str, args: argparse.Namespace, wrk: str, images: Path, capacity: float, port: int,
            log: Path) -> list[dict]:
    server = start(kind, args, port, log)
    path = "/classify" if kind == "plain" else f"/classify?model={args.model}"
    rows = []
    try:
        run_wrk(wrk, f"{server.url}{path}", images, 32, 3, f"{kind} (warm-up)", args.wrk_timeout)
        for m in MULTIPLIERS:
            rate = m * capacity
            before = scrape(server.url) if kind != "plain" else {}
            with Sampler(server.url, args.model) if kind != "plain" else nullcontext() as sampler:
                run, within_share = paced(wrk, server, path, images, rate, args, f"{kind} at {m}x ({rate:.0f}/s)")
            after = scrape(server.url) if kind != "plain" else {}
            rows.append(summarise(kind, m, rate, run, within_share, before, after, sampler, args))
    finally:
        stop_server(server)
    return rows


def summarise(kind: str, m: float, rate: float, run: WrkRun, within_share: float, before: dict, after: dict,
              sampler: Sampler | None, args: argparse.Namespace) -> dict:
    record, duration, status, ok = run.record, run.duration, run.status, run.ok
    refused = status.get(503, 0)
    answered = sum(status.values())
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
    # every 503 was refused within the objective (refusal_max says so); the rest within it are answers
    good = max(within_share * answered - refused, 0)
    return {
        "server": kind, "multiplier": m, "offered_per_s": rate, "duration_s": duration,
        "achieved_2xx_per_s": ok / duration, "refused_503": refused, "refused_per_s": refused / duration,
        "other_status": {str(k): n for k, n in status.items() if not (200 <= k < 300 or k == 503)},
        "socket_errors": run.socket_errors,
        "p99_ms": record["latency_ms"]["p99"], "p50_ms": record["latency_ms"]["p50"],
        "goodput_per_s": good / duration, "within_share": within_share,
        "refusal_p99_ms": refusal_p99, "refusal_max_ms": refusal_max,
        "effective_budget": sampler.mean("effective_budget") if sampler else 1.0,
        "min_effective_budget": min((s["effective_budget"] for s in sampler.samples
                                     if s["effective_budget"] is not None), default=None) if sampler else 1.0,
        "expected_accuracy": sampler.mean("expected_accuracy") if sampler else args.full_accuracy,
        "mean_cost": mean_cost if mean_cost is not None else (1.0 if kind == "plain" else None),
    }


def load_step(args: argparse.Namespace, wrk: str, images: Path, capacity: float, port: int, log: Path) -> list[dict]:
    server = start("objective", args, port, log)
    path = f"/classify?model={args.model}"
    try:
        run_wrk(wrk, f"{server.url}{path}", images, 32, 3, "load step (warm-up)", args.wrk_timeout)
        with Sampler(server.url, args.model) as sampler:
            for m, seconds in ((0.5, args.step_s), (4.0, 2 * args.step_s), (0.5, 2 * args.step_s)):
                paced(wrk, server, path, images, m * capacity, args, f"load step {m}x", duration=seconds)
                sampler.samples.append({"t": time.monotonic() - sampler.started, "marker": f"end of {m}x",
                                        "effective_budget": None, "expected_accuracy": None, "p99_ms": None})
        return sampler.samples
    finally:
        stop_server(server)


def plot(samples: list[dict], objective_ms: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [s for s in samples if "marker" not in s]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([s["t"] for s in points if s["effective_budget"] is not None],
             [s["effective_budget"] for s in points if s["effective_budget"] is not None], drawstyle="steps-post")
    top.set_ylabel("effective budget")
    top.set_title("Latency objective during a load step (0.5x -> 4x -> 0.5x of full-depth capacity)")
    bottom.plot([s["t"] for s in points if s["p99_ms"] is not None],
                [s["p99_ms"] for s in points if s["p99_ms"] is not None], marker=".", linestyle="-")
    bottom.axhline(objective_ms, color="red", linestyle="--", label=f"objective {objective_ms:g} ms")
    bottom.set_ylabel("server p99 per 0.5 s (ms)")
    bottom.set_xlabel("seconds")
    bottom.legend()
    for s in samples:
        if "marker" in s:
            for ax in (top, bottom):
                ax.axvline(s["t"], color="grey", linewidth=0.6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def markdown(rows: list[dict], capacity: float, args: argparse.Namespace) -> str:
    names = {"plain": "plain server (full depth)", "fixed": "exitserve, fixed default budget",
             "objective": f"exitserve, {args.objective_ms:g} ms objective"}
    lines = [f"Full-depth capacity (plain server, closed-loop wrk C=32): **{capacity:.0f} req/s**; objective "
             f"{args.objective_ms:g} ms; paced wrk, {args.connections} connections, {args.duration} s per row.", "",
             "| offered | server | 2xx/s | p50 ms | p99 ms | goodput/s | 503s | refusal p99 / max ms | "
             "effective budget (mean / min) | expected accuracy | mean cost |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r['multiplier']:g}x ({r['offered_per_s']:.0f}/s) | {names[r['server']]} | {r['achieved_2xx_per_s']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['goodput_per_s']:.0f} | {r['refused_503']} | "
            f"{f(r['refusal_p99_ms'], '.1f')} / {f(r['refusal_max_ms'], '.1f')} | "
            f"{f(r['effective_budget'], '.3f')} / {f(r['min_effective_budget'], '.3f')} | "
            f"{f(r['expected_accuracy'] and 100 * r['expected_accuracy'], '.2f')}% | {f(r['mean_cost'], '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--objective-ms", type=float, default=50.0)
    parser.add_argument("--duration", type=int, default=15, help="seconds per offered-load row")
    parser.add_argument("--step-s", type=int, default=8, help="seconds of the first phase of the load step")
    parser.add_argument("--connections", type=int, default=256, help="wrk connections (requests in flight, at most)")
    parser.add_argument("--port", type=int, default=8860,
                        help="first port; each server gets one of the next (0: any free port for each)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--wrk-timeout", default="10s")
    parser.add_argument("--servers", default="plain,fixed,objective")
    parser.add_argument("--capacity-s", type=int, default=8, help="seconds of the full-depth capacity run")
    parser.add_argument("--out", type=Path, default=Path("runs/slo_bench.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/slo_load_step.png"))
    args = parser.parse_args(argv)
    wrk = require_wrk()
    folder = args.repository / args.model
    report = json.loads((folder / "calibration_report.json").read_text())
    args.full_accuracy = max(report["curve"], key=lambda p: p["budget"])["expected_accuracy"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
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
            rows += measure(kind, args, wrk, images, capacity, port_for(args.port, 1 + i),
                            args.out.with_suffix(f".{kind}.log"))
        samples = load_step(args, wrk, images, capacity, port_for(args.port, 5), args.out.with_suffix(".step.log"))
    plot(samples, args.objective_ms, args.plot)
    args.out.write_text(json.dumps({"capacity_per_s": capacity, "objective_ms": args.objective_ms,
                                    "connections": args.connections, "duration_s": args.duration,
                                    "rows": rows, "load_step": samples}, indent=2))
    print(markdown(rows, capacity, args))
    print(f"\nplot: {args.plot}; written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
