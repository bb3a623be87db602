"""Model-health monitoring benchmark (issue 25): does the label-free estimate follow the true
accuracy when the images drift, and do the alerts fire when they should and only then?

Starts one exitserve server (default settings) on loopback and drives it with an async
Python client (httpx, ``--concurrency`` requests in flight) sending Fashion-MNIST test
images as raw PNG bodies to ``POST /classify``; every answer's ``class_index`` is compared
with the true class. The sequence:

1. ``--clean-requests`` clean images (the 10,000 test images cycled, shuffled per pass);
2. for each shift of ``--shifts`` (``loadtest/shifts.py``): ``--images-per-stream``
   shifted images, then ``--recovery`` clean ones ("then back to clean").

Each block ends with every request answered before the next begins, so the reading taken
there covers that block's images alone (the estimate's window, ``EXITSERVE_MONITOR_WINDOW``,
1,000 by default, is shorter than a block). ``GET /v1/models/{model}`` is polled every
``--poll-every`` answered requests for its ``monitoring`` block. Per stream: the true
accuracy, the estimate at its end and its error against the true accuracy of the same
images (the window's), requests from the stream's start until each alert condition first
held (``alerts`` of the monitoring block: the condition now, without Prometheus's ``for``),
and when the accuracy alert cleared during the recovery. The shadow runs' share of the
compute comes from /metrics (``exitserve_shadow_cost_fraction_total`` over
``exitserve_cost_fraction_total``).

``--ab`` (default): C=32 wrk runs of the default server with shadow runs on and with
``EXITSERVE_SHADOW_SHARE=0``, alternating on/off/on/off (``--ab-rounds`` each; both servers
up throughout, each warmed up once), req/s and p99 of each and the ratio of the means,
called within noise when it is within the larger run-to-run spread ((max - min) / mean of
one configuration's rounds).

Writes the JSON report (``--out``), a plot (``--plot``: true accuracy per ``--bin``
requests, the estimate, the accuracy alert's threshold line, the exit drift) and prints a
Markdown table and the issue's target lines. Traffic goes only to 127.0.0.1.

    python -m exitserve.loadtest.monitoring --repository model_repository --model msdnet_fmnist

Needs the model folder (``scripts/build_repository.sh`` builds ``model_repository``) and,
for ``--ab``, ``wrk`` (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import numpy as np

from exitserve.loadtest.images import encode_image
from exitserve.loadtest.overload import (
    Server,
    measured_wrk,
    port_for,
    require_wrk,
    run_wrk,
    start_server,
    stop_server,
    wrk_version,
    write_images,
)
from exitserve.loadtest.shifts import SHIFTS
from exitserve.loadtest.slo_bench import scrape
from exitserve.loadtest.wrk_bench import GUARD_CONCURRENCY, WARMUP_S

ALERTS = ("accuracy_drop", "exit_drift", "shadow_agreement")
DEFAULT_SHIFTS = [name for name in SHIFTS if name != "clean"]
# the targets
CLEAN_ERROR_TARGET = 0.05  # estimate within 5 points of the true accuracy on the clean stream
SHIFTED_MEAN_ERROR_TARGET = 0.08  # and within 8 points averaged over the shifted streams
COSTLY_SHIFT = 0.10  # a shift that costs more than 10 points of accuracy ...
ALERT_WITHIN = 2000  # ... raises the accuracy alert within 2,000 requests
SHADOW_COST_TARGET = 0.02  # shadow runs cost at most 2% of the served compute
SHADOW_COST_METRIC = "exitserve_shadow_cost_fraction_total"
SERVED_COST_METRIC = "exitserve_cost_fraction_total"


# --------------------------------------------------------------------------- the sequence


@dataclass
class Block:
    """A run of requests of one kind: ``clean`` (the opening clean block), ``shift`` (a
    shifted stream) or ``recovery`` (clean images after a shifted stream)."""

    name: str
    kind: str
    shift: str
    bodies: list[bytes]
    labels: np.ndarray


def clean_cycle(count: int, rng: np.random.Generator) -> Iterator[int]:
    """Indices into the ``count`` test images, every pass a fresh shuffle, forever."""
    while True:
        yield from rng.permutation(count)


def build_blocks(args: argparse.Namespace) -> list[Block]:
    """The whole sequence, encoded up front (the client then only sends bytes)."""
    from exitserve.models.data import load_splits

    test = load_splits("fashion-mnist").test
    images, labels = test.images, np.asarray(test.labels, dtype=np.int64)
    clean_bodies = [encode_image(p) for p in images]
    rng = np.random.default_rng(args.seed)
    cycle = clean_cycle(len(images), rng)

    def clean_block(name: str, kind: str, n: int) -> Block:
        idx = np.fromiter((next(cycle) for _ in range(n)), dtype=np.int64, count=n)
        return Block(name, kind, "clean", [clean_bodies[i] for i in idx], labels[idx])

    blocks = [clean_block("clean", "clean", args.clean_requests)]
    for number, name in enumerate(args.shifts):
        stream_rng = np.random.default_rng([args.seed, number + 1])
        idx = np.resize(stream_rng.permutation(len(images)), args.images_per_stream)
        shifted = SHIFTS[name](images[idx], stream_rng)
        blocks.append(Block(name, "shift", name, [encode_image(p) for p in shifted], labels[idx]))
        if args.recovery > 0:
            blocks.append(clean_block(f"{name} recovery", "recovery", args.recovery))
    return blocks


# --------------------------------------------------------------------------- the client


@dataclass
class Record:
    """Everything the client saw, in the order the answers came."""

    block: list[int] = field(default_factory=list)  # per answer: index of its block
    correct: list[bool] = field(default_factory=list)
    exit_index: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    polls: list[dict] = field(default_factory=list)
    errors: dict[str, dict[str, int]] = field(default_factory=dict)  # block name -> {status or exception: n}
    block_spans: list[dict] = field(default_factory=list)  # start/end answer counts, seconds, /metrics

    @property
    def answered(self) -> int:
        return len(self.correct)


def scrape_costs(base_url: str, model: str) -> dict:
    """Served and shadow cost counters (full-network units), shadow images and skips, from /metrics."""
    out: dict = {"served_cost": 0.0, "shadow_cost": 0.0, "shadow_images": 0.0, "shadow_skipped": {}}
    for (name, labelset), value in scrape(base_url).items():
        labels = dict(labelset)
        if labels.get("model") != model:
            continue
        if name == SERVED_COST_METRIC:
            out["served_cost"] += value
        elif name == SHADOW_COST_METRIC:
            out["shadow_cost"] += value
        elif name == "exitserve_shadow_images_total":
            out["shadow_images"] += value
        elif name == "exitserve_shadow_skipped_total":
            reason = labels.get("reason", "")
            out["shadow_skipped"][reason] = out["shadow_skipped"].get(reason, 0.0) + value
    return out


def cost_delta(before: dict, after: dict) -> dict:
    served = after["served_cost"] - before["served_cost"]
    shadow = after["shadow_cost"] - before["shadow_cost"]
    reasons = set(before["shadow_skipped"]) | set(after["shadow_skipped"])
    return {"served_cost": served, "shadow_cost": shadow,
            "shadow_images": after["shadow_images"] - before["shadow_images"],
            "shadow_skipped": {r: after["shadow_skipped"].get(r, 0.0) - before["shadow_skipped"].get(r, 0.0)
                               for r in sorted(reasons)},
            "shadow_cost_share": shadow / served if served > 0 else None}


async def drive(server: Server, blocks: list[Block], args: argparse.Namespace) -> Record:
    import httpx

    record = Record()
    query = urlencode({"model": args.model})
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits) as client:

        async def poll(block: int, end: bool = False) -> None:
            answered = record.answered
            response = await client.get(f"/v1/models/{args.model}")
            response.raise_for_status()
            body = response.json()
            record.polls.append({"answered": answered, "block": block, "end": end, "t": time.monotonic(),
                                 "effective_budget": body.get("effective_budget"),
                                 "monitoring": body["monitoring"]})

        await poll(-1, end=True)  # before anything: the window is empty
        for number, block in enumerate(blocks):
            before = scrape_costs(server.url, args.model)
            start, started = record.answered, time.monotonic()
            errors = record.errors.setdefault(block.name, {})
            items = iter(range(len(block.bodies)))

            async def worker(number: int, block: Block, items: Iterator[int], errors: dict[str, int]) -> None:
                for i in items:  # a shared iterator: requests leave in sequence order
                    try:
                        response = await client.post(f"/classify?{query}", content=block.bodies[i],
                                                     headers={"content-type": "image/png"})
                    except httpx.HTTPError as exc:
                        key = type(exc).__name__
                        errors[key] = errors.get(key, 0) + 1
                        continue
                    if response.status_code != 200:
                        key = str(response.status_code)
                        errors[key] = errors.get(key, 0) + 1
                        continue
                    answer = response.json()
                    record.block.append(number)
                    record.correct.append(answer["class_index"] == int(block.labels[i]))
                    record.exit_index.append(answer["exit"]["index"])
                    record.cost.append(answer["exit"]["cost_fraction"])
                    if record.answered % args.poll_every == 0:
                        await poll(number)

            await asyncio.gather(*(worker(number, block, items, errors) for _ in range(args.concurrency)))
            seconds = time.monotonic() - started
            await poll(number, end=True)
            after = scrape_costs(server.url, args.model)
            record.block_spans.append({"start": start, "end": record.answered, "seconds": seconds,
                                       "costs": cost_delta(before, after), "metrics_before": before,
                                       "metrics_after": after})
            n = record.answered - start
            bad = sum(errors.values())
            print(f"{block.name}: {n} answered{f', {bad} failed' if bad else ''} in {seconds:.1f} s "
                  f"({n / max(seconds, 1e-9):.0f} req/s), accuracy {np.mean(record.correct[start:]):.3f}",
                  file=sys.stderr)
    return record


# --------------------------------------------------------------------------- analysis


def _first(polls: list[dict], predicate) -> dict | None:
    return next((p for p in polls if predicate(p)), None)


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def window_accuracy(correct: np.ndarray, answered: int, window_images: int) -> float | None:
    """True accuracy of the images the server's window held when ``answered`` answers had come."""
    if window_images <= 0 or answered <= 0:
        return None
    return float(correct[max(0, answered - window_images):answered].mean())


def analyse(blocks: list[Block], record: Record) -> dict:
    correct = np.asarray(record.correct, dtype=bool)
    cost = np.asarray(record.cost, dtype=np.float64)
    exits = np.asarray(record.exit_index, dtype=np.int64)
    polls = record.polls
    rows = []
    for number, (block, span) in enumerate(zip(blocks, record.block_spans)):
        start, end = span["start"], span["end"]
        inside = [p for p in polls if p["block"] == number]
        end_poll = next(p for p in reversed(inside) if p["end"])
        previous_end = next(p for p in reversed(polls) if p["end"] and p["block"] == number - 1)
        mon = end_poll["monitoring"]
        estimate, calibrated = mon["estimated_accuracy"], mon["calibrated_accuracy"]
        truth = float(correct[start:end].mean()) if end > start else None
        window_truth = window_accuracy(correct, end, mon["window_images"])
        alert_after = {}
        for alert in ALERTS:
            first = _first(inside, lambda p, a=alert: p["monitoring"]["alerts"][a])
            alert_after[alert] = None if first is None else first["answered"] - start
        held = [p for p in inside if p["monitoring"]["estimated_accuracy"] is not None]
        poll_errors = [abs(p["monitoring"]["estimated_accuracy"]
                           - window_accuracy(correct, p["answered"], p["monitoring"]["window_images"]))
                       for p in held if p["answered"] > 0]
        rows.append({
            "name": block.name, "kind": block.kind, "shift": block.shift, "requests": len(block.bodies),
            "answered": end - start, "errors": record.errors.get(block.name, {}),
            "start": start, "end": end, "seconds": round(span["seconds"], 3),
            "requests_per_s": round((end - start) / span["seconds"], 1) if span["seconds"] else None,
            "true_accuracy": _round(truth),
            "window_images": mon["window_images"],
            "window_true_accuracy": _round(window_truth),
            "estimated_accuracy": estimate,
            "calibrated_accuracy": calibrated,
            "abs_error": _round(None if estimate is None or window_truth is None else abs(estimate - window_truth)),
            "abs_error_vs_block": _round(None if estimate is None or truth is None else abs(estimate - truth)),
            "max_abs_error_over_polls": _round(max(poll_errors) if poll_errors else None),
            "exit_drift": mon["exit_drift"],
            "shadow": mon["shadow"],
            "alerts_at_end": mon["alerts"],
            "alerts_at_start": previous_end["monitoring"]["alerts"],
            "alert_after": alert_after,
            "polls": len(inside),
            "polls_with_estimate": len(held),
            "polls_with_alert": {a: sum(p["monitoring"]["alerts"][a] for p in inside) for a in ALERTS},
            "polls_with_any_alert": sum(any(p["monitoring"]["alerts"].values()) for p in inside),
            "mean_cost": _round(float(cost[start:end].mean()) if end > start else None),
            "exit_shares": [_round(float((exits[start:end] == k).mean())) for k in range(int(exits.max()) + 1)]
            if end > start else [],
            "costs": span["costs"],
        })
    # the recovery after each shifted stream: did the accuracy alert clear, and when
    for i, row in enumerate(rows):
        if row["kind"] != "shift":
            continue
        after = rows[i + 1] if i + 1 < len(rows) and rows[i + 1]["kind"] == "recovery" else None
        recovery: dict = {"block": None if after is None else after["name"]}
        if after is not None:
            inside = [p for p in polls if p["block"] == i + 1]
            for alert in ALERTS:
                raised = row["alerts_at_end"][alert]
                cleared = _first(inside, lambda p, a=alert: not p["monitoring"]["alerts"][a]) if raised else None
                recovery[alert] = {"held_at_stream_end": raised,
                                   "cleared_after": None if cleared is None else cleared["answered"] - after["start"],
                                   "held_at_recovery_end": after["alerts_at_end"][alert]}
            recovery["true_accuracy"] = after["true_accuracy"]
            recovery["estimated_accuracy_at_end"] = after["estimated_accuracy"]
        row["recovery"] = recovery
    return {"blocks": rows}


def targets(rows: list[dict], shadow_share: float | None) -> dict:
    clean = next(r for r in rows if r["kind"] == "clean")
    shifted = [r for r in rows if r["kind"] == "shift"]
    clean_error = clean["abs_error"]
    errors = [r["abs_error"] for r in shifted if r["abs_error"] is not None]
    mean_error = float(np.mean(errors)) if errors else None
    costly = [r for r in shifted if r["true_accuracy"] is not None and clean["true_accuracy"] is not None
              and r["true_accuracy"] < clean["true_accuracy"] - COSTLY_SHIFT]
    late = [r["name"] for r in costly
            if r["alert_after"]["accuracy_drop"] is None or r["alert_after"]["accuracy_drop"] > ALERT_WITHIN]
    return {
        "clean_error": {"value": clean_error, "target": CLEAN_ERROR_TARGET,
                        "met": clean_error is not None and clean_error <= CLEAN_ERROR_TARGET},
        "shifted_mean_error": {"value": _round(mean_error), "target": SHIFTED_MEAN_ERROR_TARGET,
                               "each": {r["name"]: r["abs_error"] for r in shifted},
                               "met": mean_error is not None and mean_error <= SHIFTED_MEAN_ERROR_TARGET},
        "alert_on_costly_shifts": {"within": ALERT_WITHIN, "costly_shifts": [r["name"] for r in costly],
                                   "after": {r["name"]: r["alert_after"]["accuracy_drop"] for r in costly},
                                   "late_or_missing": late, "met": not late},
        "no_alert_on_clean": {"requests": clean["answered"], "polls": clean["polls"],
                              "polls_with_any_alert": clean["polls_with_any_alert"],
                              "polls_with_alert": clean["polls_with_alert"],
                              "met": clean["polls_with_any_alert"] == 0},
        "shadow_cost_share": {"value": _round(shadow_share), "target": SHADOW_COST_TARGET,
                              "met": shadow_share is not None and shadow_share <= SHADOW_COST_TARGET},
    }


# --------------------------------------------------------------------------- the A/B throughput check


def ab_check(args: argparse.Namespace, repository: Path, log_prefix: Path) -> dict:
    """C=32 wrk runs, shadow runs on (defaults) and off (EXITSERVE_SHADOW_SHARE=0), alternating."""
    wrk = require_wrk()
    base_env: dict[str, str | None] = {"EXITSERVE_DEFAULT_MODEL": args.model, **args.server_env}
    configurations = [("shadow on (defaults)", base_env),
                      ("shadow off (EXITSERVE_SHADOW_SHARE=0)", {**base_env, "EXITSERVE_SHADOW_SHARE": "0"})]
    route = "/classify?" + urlencode({"model": args.model})
    servers: list[Server] = []
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="exitserve-monitoring-ab-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        count = write_images(images, args.images)
        try:
            for i, (name, env) in enumerate(configurations):
                log = log_prefix.with_name(f"{log_prefix.name}.ab{i}.log")
                servers.append(start_server(repository, port_for(args.port, i + 1), env, log, label=name))
            for (name, _), server in zip(configurations, servers):  # once each, unmeasured
                run_wrk(wrk, f"{server.url}{route}", images, args.ab_connections, WARMUP_S, f"{name} (warm-up)",
                        args.wrk_timeout)
            for round_ in range(args.ab_rounds):
                for (name, _), server in zip(configurations, servers):
                    before = scrape_costs(server.url, args.model)
                    run = measured_wrk(wrk, server, f"{server.url}{route}", images, args.ab_connections,
                                       args.ab_duration, f"{name} round {round_ + 1}", args.wrk_timeout)
                    summary = run.summary()
                    summary.pop("wrk_output")
                    runs.append({"configuration": name, "round": round_ + 1, **summary,
                                 "non_2xx": sum(n for code, n in run.status.items() if not 200 <= code < 300),
                                 "costs": cost_delta(before, scrape_costs(server.url, args.model))})
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"{name} died during the run:\n{server.log_tail()}")
        finally:
            for server in servers:
                stop_server(server)
    by: dict[str, dict] = {}
    for name, _ in configurations:
        mine = [r for r in runs if r["configuration"] == name]
        rates = [r["ok_per_s"] for r in mine]
        by[name] = {"ok_per_s": rates, "mean_ok_per_s": float(np.mean(rates)),
                    "spread": (max(rates) - min(rates)) / float(np.mean(rates)) if np.mean(rates) else None,
                    "p99_ms": [r["latency_ms"]["p99"] for r in mine],
                    "mean_p99_ms": float(np.mean([r["latency_ms"]["p99"] for r in mine]))}
    on, off = (by[name] for name, _ in configurations)
    ratio = on["mean_ok_per_s"] / off["mean_ok_per_s"] if off["mean_ok_per_s"] else None
    noise = max(on["spread"] or 0.0, off["spread"] or 0.0)
    return {"connections": args.ab_connections, "duration_s": args.ab_duration, "rounds": args.ab_rounds,
            "warmup_s": WARMUP_S, "images": count, "wrk": wrk_version(wrk), "route": route,
            "configurations": [name for name, _ in configurations], "runs": runs, "by_configuration": by,
            "ratio_on_off": ratio, "noise": noise,
            "within_noise": ratio is not None and abs(1 - ratio) <= noise}


# --------------------------------------------------------------------------- output


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _after(value: int | None) -> str:
    return "never" if value is None else str(value)


def markdown(report: dict) -> str:
    rows = report["blocks"]
    clean = next(r for r in rows if r["kind"] == "clean")
    window = clean["window_images"]
    lines = [
        "| stream | images | true accuracy | true accuracy, window | estimate (end) | calibrated (end) | abs error "
        "(points) | accuracy alert after | exit-drift alert after | shadow alert after | accuracy alert cleared "
        "in recovery after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "recovery":
            continue
        if r["kind"] == "clean":
            alerts = f"held in {r['polls_with_any_alert']}/{r['polls']} polls"
            columns = [alerts, "", "", "n/a"]
        else:
            rec = r["recovery"].get("accuracy_drop")
            if rec is None:
                cleared = "no recovery"
            elif not rec["held_at_stream_end"]:
                cleared = "not raised at end"
            else:
                cleared = "never" if rec["cleared_after"] is None else str(rec["cleared_after"])
            start = r["alerts_at_start"]
            columns = [_after(r["alert_after"][a]) + (" (held at start)" if start[a] else "") for a in ALERTS]
            columns.append(cleared)
        lines.append(f"| {r['name']} | {r['answered']} | {_pct(r['true_accuracy'])} | "
                     f"{_pct(r['window_true_accuracy'])} | {_pct(r['estimated_accuracy'])} | "
                     f"{_pct(r['calibrated_accuracy'])} | {_points(r['abs_error'])} | " + " | ".join(columns) + " |")
    t = report["targets"]
    each = ", ".join(f"{k} {_points(v)}" for k, v in t["shifted_mean_error"]["each"].items())
    after = t["alert_on_costly_shifts"]["after"]
    verdict = {True: "met", False: "MISSED"}
    lines += [
        "",
        f"Alerts: requests from the stream's start until the condition first held (the monitoring block's `alerts`, "
        f"polled every {report['settings']['poll_every']} answers; Prometheus's `for` comes on top). "
        f"Window: the last {window} images; the error compares the estimate with the true accuracy of those images.",
        "",
        "Alert conditions during the clean recoveries (polls holding each / polls in the recovery): " + ("; ".join(
            f"{r['name']}: " + ", ".join(f"{a} {n}/{r['polls']}" for a, n in r["polls_with_alert"].items() if n)
            for r in rows if r["kind"] == "recovery" and r["polls_with_any_alert"]) or "none") + ".",
        "",
        "Targets (issue 25):",
        f"- clean estimate error: {_points(t['clean_error']['value'])} points (target <= 5): "
        f"{verdict[t['clean_error']['met']]}",
        f"- mean absolute error over the shifted streams: {_points(t['shifted_mean_error']['value'])} points "
        f"(target <= 8): {verdict[t['shifted_mean_error']['met']]}; each: {each}",
        f"- accuracy alert within {ALERT_WITHIN} requests of every shift more than 10 points below clean "
        f"({len(after)} such): " + (", ".join(f"{k} {_after(v)}" for k, v in after.items()) or "none") +
        f": {verdict[t['alert_on_costly_shifts']['met']]}",
        f"- no alert over the {t['no_alert_on_clean']['requests']} clean requests: alert held in "
        f"{t['no_alert_on_clean']['polls_with_any_alert']}/{t['no_alert_on_clean']['polls']} polls "
        f"({', '.join(f'{k} {v}' for k, v in t['no_alert_on_clean']['polls_with_alert'].items())}): "
        f"{verdict[t['no_alert_on_clean']['met']]}",
        f"- shadow cost share (shadow / served cost, /metrics, whole run): "
        f"{_pct(t['shadow_cost_share']['value'], 2)} (target <= 2%): {verdict[t['shadow_cost_share']['met']]}; "
        f"{report['shadow']['shadow_images']:.0f} shadow runs, skipped: "
        f"{', '.join(f'{k} {v:.0f}' for k, v in report['shadow']['shadow_skipped'].items()) or 'none'}; "
        f"clean block alone {_pct(clean['costs']['shadow_cost_share'], 2)}",
    ]
    ab = report.get("ab")
    if ab:
        on, off = (ab["by_configuration"][name] for name in ab["configurations"])
        lines += [
            f"- C={ab['connections']} throughput, shadow on vs off (wrk, {ab['rounds']} alternating rounds of "
            f"{ab['duration_s']} s): on {on['mean_ok_per_s']:.0f} req/s (p99 {on['mean_p99_ms']:.1f} ms), off "
            f"{off['mean_ok_per_s']:.0f} req/s (p99 {off['mean_p99_ms']:.1f} ms), ratio {ab['ratio_on_off']:.3f}; "
            f"run-to-run spread {100 * ab['noise']:.1f}%: "
            f"{'within noise' if ab['within_noise'] else 'OUTSIDE the run-to-run spread'}",
            "",
            "| configuration | round | req/s (2xx) | non-2xx | p50 ms | p99 ms | server CPU % | shadow runs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ab["runs"]:
            lines.append(f"| {r['configuration']} | {r['round']} | {r['ok_per_s']:.0f} | {r['non_2xx']} | "
                         f"{r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | {r['server_cpu_pct']:.0f} | "
                         f"{r['costs']['shadow_images']:.0f} |")
    failed = {name: e for name, e in report["errors"].items() if e}
    if failed:
        lines += ["", f"FAILED requests (left out of the accuracies): {failed}"]
    return "\n".join(lines)


def plot(report: dict, record: Record, out: Path, bin_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correct = np.asarray(record.correct, dtype=np.float64)
    polls = [p for p in record.polls if p["monitoring"]["estimated_accuracy"] is not None]
    x = [p["answered"] for p in polls]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 7.5), sharex=True, height_ratios=[3, 1.3])
    edges: list[int] = [0]  # bins restart at every block boundary
    for r in report["blocks"]:
        edges += list(range(r["start"] + bin_size, r["end"], bin_size)) + [r["end"]]
    edges = sorted(set(edges))
    binned = [correct[a:b].mean() for a, b in itertools.pairwise(edges)]
    top.stairs(binned, edges, color="black", linewidth=1.1, label=f"true accuracy (per {bin_size} requests)")
    top.plot(x, [window_accuracy(correct, p["answered"], p["monitoring"]["window_images"]) for p in polls],
             color="grey", linestyle=":", linewidth=1.0, label="true accuracy of the estimate's window")
    top.plot(x, [p["monitoring"]["estimated_accuracy"] for p in polls], color="tab:blue", linewidth=1.4,
             label="estimated accuracy (no labels)")
    calibrated = np.array([p["monitoring"]["calibrated_accuracy"] for p in polls])
    threshold = np.array([p["monitoring"]["thresholds"]["accuracy_drop"] for p in polls])
    top.plot(x, calibrated, color="tab:green", linewidth=0.9, label="calibrated (expected)")
    top.plot(x, calibrated - threshold, color="tab:red", linestyle="--", linewidth=1.0,
             label="accuracy alert threshold (calibrated - drop)")
    drift = [(p["answered"], p["monitoring"]["exit_drift"]) for p in polls if p["monitoring"]["exit_drift"] is not None]
    if drift:
        bottom.plot(*zip(*drift), color="tab:purple", linewidth=1.2, label="exit drift (JS divergence)")
    bottom.axhline(report["settings"]["thresholds"]["exit_drift"], color="tab:red", linestyle="--", linewidth=1.0,
                   label="exit drift alert threshold")
    for r in report["blocks"]:
        if r["kind"] != "shift":
            continue
        for ax in (top, bottom):
            ax.axvspan(r["start"], r["end"], color="tab:orange", alpha=0.18, linewidth=0)
        top.text((r["start"] + r["end"]) / 2, 1.005, r["name"], rotation=90, ha="center", va="bottom", fontsize=8,
                 transform=top.get_xaxis_transform())
    clean = next(r for r in report["blocks"] if r["kind"] == "clean")
    top.text(clean["end"] / 2, 0.02, "clean", ha="center", va="bottom", fontsize=9, transform=top.get_xaxis_transform())
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.legend(loc="lower left", fontsize=8, framealpha=0.9)
    bottom.set_ylabel("exit drift")
    bottom.set_xlabel("requests answered (shifted streams shaded; each followed by clean images)")
    bottom.legend(loc="upper left", fontsize=8, framealpha=0.9)
    bottom.set_xlim(0, len(correct))
    fig.suptitle(f"Label-free accuracy estimate vs true accuracy, {report['model']} at default settings",
                 y=0.995, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--server-env {pair!r}: KEY=VALUE")
        env[key] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository (folder of model folders; scripts/build_repository.sh builds it)")
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--clean-requests", type=int, default=20_000, help="clean requests before the first shift")
    parser.add_argument("--images-per-stream", type=int, default=2000, help="shifted images per stream")
    parser.add_argument("--recovery", type=int, default=2000, help="clean images after each shifted stream")
    parser.add_argument("--shifts", default=",".join(DEFAULT_SHIFTS),
                        help=f"comma-separated, in order, from: {', '.join(SHIFTS)}")
    parser.add_argument("--poll-every", type=int, default=50, help="GET /v1/models/{model} every N answers")
    parser.add_argument("--bin", type=int, default=200, help="requests per true-accuracy bin in the plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the servers (default: none, the default settings)")
    parser.add_argument("--port", type=int, default=0, help="first port; the A/B servers get the next ones "
                        "(0: any free port for each)")
    parser.add_argument("--ab", action=argparse.BooleanOptionalAction, default=True,
                        help="the shadow on/off C=32 throughput check (wrk)")
    parser.add_argument("--ab-duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--ab-rounds", type=int, default=3, help="on/off rounds (at least 2)")
    parser.add_argument("--ab-connections", type=int, default=GUARD_CONCURRENCY)
    parser.add_argument("--images", type=int, default=256, help="test images wrk cycles")
    parser.add_argument("--wrk-timeout", default="10s", help="wrk --timeout")
    parser.add_argument("--out", type=Path, default=Path("runs/monitoring25.json"))
    parser.add_argument("--plot", default="docs/monitoring_streams.png",
                        help="the plot ('' for none)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.shifts = [s.strip() for s in args.shifts.split(",") if s.strip()]
    unknown = [s for s in args.shifts if s not in SHIFTS]
    if unknown:
        parser.error(f"--shifts: unknown {unknown}; known: {', '.join(SHIFTS)}")
    if not args.shifts:
        parser.error("--shifts: at least one")
    if min(args.concurrency, args.clean_requests, args.images_per_stream, args.poll_every, args.bin) < 1:
        parser.error("--concurrency, --clean-requests, --images-per-stream, --poll-every, --bin: positive")
    if args.recovery < 0:
        parser.error("--recovery: 0 or more")
    if args.ab and args.ab_rounds < 2:
        parser.error("--ab-rounds: at least 2 (alternating on/off/on/off)")
    try:
        args.server_env = parse_env(args.server_env)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    repository = args.repository.resolve()
    if not (repository / args.model / "manifest.json").is_file():
        parser.error(f"{repository / args.model} is not a model folder (no manifest.json); "
                     "scripts/build_repository.sh builds model_repository")
    if args.ab:
        require_wrk()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    print("encoding the sequence ...", file=sys.stderr)
    blocks = build_blocks(args)
    env: dict[str, str | None] = {"EXITSERVE_DEFAULT_MODEL": args.model, **args.server_env}
    log = args.out.with_name(f"{args.out.stem}.server.log")
    server = start_server(repository, port_for(args.port, 0), env, log, label="exitserve (monitoring)")
    try:
        started = time.monotonic()
        record = asyncio.run(drive(server, blocks, args))
        wall = time.monotonic() - started
        run_costs = cost_delta(record.block_spans[0]["metrics_before"], record.block_spans[-1]["metrics_after"])
        with urlopen(f"{server.url}/v1/models/{args.model}", timeout=10) as response:
            model_info = json.loads(response.read())
    finally:
        exit_status = stop_server(server)
    analysis = analyse(blocks, record)
    shadow_share = run_costs["shadow_cost_share"]
    thresholds = next(p["monitoring"]["thresholds"] for p in record.polls)
    report = {
        "repository": str(repository), "model": args.model, "cpu_count": os.cpu_count(),
        "settings": {"concurrency": args.concurrency, "clean_requests": args.clean_requests,
                     "images_per_stream": args.images_per_stream, "recovery": args.recovery, "shifts": args.shifts,
                     "poll_every": args.poll_every, "seed": args.seed, "server_env": args.server_env,
                     "thresholds": thresholds, "shadow_share": model_info["monitoring"]["shadow"]["share"],
                     "budget": model_info.get("budget"), "effective_budget_at_end": model_info.get("effective_budget"),
                     "calibrated_expected_accuracy": model_info.get("expected_accuracy")},
        "wall_s": round(wall, 1), "answered": record.answered, "server_exit_status": exit_status,
        "errors": record.errors,
        "shadow": run_costs,
        **analysis,
        "polls": record.polls,
    }
    report["targets"] = targets(report["blocks"], shadow_share)
    if args.ab:
        report["ab"] = ab_check(args, repository, args.out.with_name(args.out.stem))
    args.out.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, record, Path(args.plot), args.bin)
        print(f"plot: {args.plot}", file=sys.stderr)
    print(markdown(report))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    failed = sum(sum(e.values()) for e in record.errors.values())
    if failed:
        print(f"{failed} requests failed (see 'errors' in {args.out})", file=sys.stderr)
        return 1
    missed = [name for name, t in report["targets"].items() if not t["met"]]
    if args.ab and not report["ab"]["within_noise"]:
        missed.append("ab_throughput")
    if args.check and missed:
        print(f"--check: missed {missed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
