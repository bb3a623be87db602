"""Where a /classify request's time goes, measured inside the server, beside the no-op floor.

Starts exitserve with ``EXITSERVE_PHASE_METRICS=true`` (``server.http.phases``) on 127.0.0.1
and drives it with wrk (raw PNG bodies, then multipart forms) at each concurrency; reads
``exitserve_request_phase_seconds`` from /metrics before and after each run, so each phase's
mean per request is (sum after - sum before) / (count after - count before). Then the plain
server's no-op route (``loadtest.plain_server``: reads the body, answers a constant) under
the same wrk load: its latency is what HTTP parsing, the framework and the loopback cost
on their own.

Rows (ms per request, means): the phases that partition the request's time in the app
(body, multipart, options, decode, queue, inference, resume, respond, send, framework),
``stage k`` inside inference (the wall time of that stage of the batch that carried the
request; 0 when the batch stopped before it), and ``outside the app``: wrk's mean latency
minus the app's own (HTTP parsing, the event loop's turn to read the request and write
the answer, the loopback, wrk itself).

    python -m exitserve.loadtest.breakdown --repository model_repository --model msdnet_fmnist

Needs ``wrk`` (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

from exitserve.loadtest.overload import (
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
from exitserve.server.http.phases import FRAMEWORK, PARTITION

PHASE_METRIC = "exitserve_request_phase_seconds"
WARMUP_S = 3


def phase_totals(base_url: str, route: str = "/classify") -> dict[str, tuple[float, float]]:
    """phase -> (sum of seconds, count) for ``route``, from the server's /metrics."""
    with urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != PHASE_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("route") != route:
                continue
            phase = sample.labels["phase"]
            if sample.name == f"{PHASE_METRIC}_sum":
                sums[phase] = sample.value
            elif sample.name == f"{PHASE_METRIC}_count":
                counts[phase] = sample.value
    return {p: (sums.get(p, 0.0), counts.get(p, 0.0)) for p in sums}


def phase_means_ms(before: dict, after: dict) -> tuple[dict[str, float], int]:
    """Mean ms per request of each phase between two scrapes, and the requests timed. A
    phase a request did not go through (multipart for a raw body, a stage its batch never
    reached) counts as 0 for it."""
    requests = int(after["app"][1] - before.get("app", (0.0, 0.0))[1])
    means = {}
    for phase, (total, _) in after.items():
        spent = total - before.get(phase, (0.0, 0.0))[0]
        means[phase] = 1000 * spent / requests if requests else float("nan")
    return means, requests


def measure_exitserve(args: argparse.Namespace, wrk: str, images: Path, log: Path) -> list[dict]:
    env = {"EXITSERVE_PHASE_METRICS": "true", "EXITSERVE_DEFAULT_MODEL": args.model}
    server = start_server(args.repository, port_for(args.port, 0), env, log, label="exitserve (phase metrics)")
    rows = []
    try:
        url = f"{server.url}/classify?model={args.model}"
        run_wrk(wrk, url, images, max(args.concurrency), WARMUP_S, "exitserve (warm-up)", args.wrk_timeout)
        for multipart in (False, True):
            for c in args.concurrency:
                label = f"exitserve {'multipart' if multipart else 'raw body'} C={c}"
                before = phase_totals(server.url)
                run = measured_wrk(wrk, server, url, images, c, args.duration, label, args.wrk_timeout,
                                   multipart=multipart)
                means, timed = phase_means_ms(before, phase_totals(server.url))
                rows.append(row(label, c, run, means, timed))
    finally:
        stop_server(server)
    return rows


def measure_noop(args: argparse.Namespace, wrk: str, images: Path, log: Path) -> list[dict]:
    folder = args.repository / args.model
    port = port_for(args.port, 1)
    cmd = [sys.executable, "-m", "exitserve.loadtest.plain_server", str(folder), "--port", str(port)]
    server = launch(cmd, f"http://127.0.0.1:{port}", "/readyz", {}, log, "plain server /noop", 120.0)
    rows = []
    try:
        url = f"{server.url}/noop"
        run_wrk(wrk, url, images, max(args.concurrency), WARMUP_S, "no-op (warm-up)", args.wrk_timeout)
        for c in args.concurrency:
            run = measured_wrk(wrk, server, url, images, c, args.duration, f"no-op C={c}", args.wrk_timeout)
            rows.append(row(f"no-op route C={c}", c, run, {}, 0))
    finally:
        stop_server(server)
    return rows


def row(label: str, concurrency: int, run: WrkRun, phases: dict[str, float], timed: int) -> dict:
    summary = run.summary()
    return {"configuration": label, "concurrency": concurrency, "requests": summary["requests"],
            "ok_per_s": summary["ok_per_s"], "non_2xx": summary["requests"] - run.ok,
            "latency_ms": summary["latency_ms"], "client_cpu_pct": summary["client_cpu_pct"],
            "server_cpu_pct": summary["server_cpu_pct"],
            "server_cpu_ms_per_request": 1000 * run.server_cpu / max(run.ok, 1),
            "phases_ms": phases, "timed_requests": timed}


def markdown(rows: list[dict]) -> str:
    ours = [r for r in rows if r["phases_ms"]]
    floors = {r["concurrency"]: r for r in rows if not r["phases_ms"]}
    stages = sorted({p for r in ours for p in r["phases_ms"] if p.startswith("stage_")}, key=lambda p: int(p[6:]))
    header = "| ms per request (mean) | " + " | ".join(r["configuration"].removeprefix("exitserve ") for r in ours)
    header += " | " + " | ".join(f"no-op route C={c}" for c in sorted(floors)) + " |"
    lines = [header, "|---" * (1 + len(ours) + len(floors)) + "|"]

    def line(name: str, values: list[str], floor: list[str] | None = None) -> None:
        floor = floor if floor is not None else ["" for _ in floors]
        lines.append(f"| {name} | " + " | ".join(values + floor) + " |")

    for phase in (*PARTITION[:6], *stages, *PARTITION[6:], FRAMEWORK):
        label = f"&nbsp;&nbsp;{phase.replace('_', ' ')} (inside inference)" if phase.startswith("stage_") else phase
        line(label, [f"{r['phases_ms'].get(phase, 0.0):.3f}" for r in ours])
    line("**in the app** (sum of the above)", [f"**{r['phases_ms'].get('app', 0.0):.3f}**" for r in ours])
    line("outside the app (wrk mean - app)",
         [f"{r['latency_ms']['mean'] - r['phases_ms'].get('app', 0.0):.3f}" for r in ours])
    line("**wrk mean latency**", [f"**{r['latency_ms']['mean']:.3f}**" for r in ours],
         [f"**{floors[c]['latency_ms']['mean']:.3f}**" for c in sorted(floors)])
    line("wrk p50 / p99", [f"{r['latency_ms']['p50']:.2f} / {r['latency_ms']['p99']:.2f}" for r in ours],
         [f"{floors[c]['latency_ms']['p50']:.2f} / {floors[c]['latency_ms']['p99']:.2f}" for c in sorted(floors)])
    line("req/s (2xx)", [f"{r['ok_per_s']:.0f}" for r in ours], [f"{floors[c]['ok_per_s']:.0f}" for c in sorted(floors)])
    line("server CPU ms per request", [f"{r['server_cpu_ms_per_request']:.3f}" for r in ours],
         [f"{floors[c]['server_cpu_ms_per_request']:.3f}" for c in sorted(floors)])
    line("server / wrk CPU % of a core", [f"{r['server_cpu_pct']:.0f} / {r['client_cpu_pct']:.0f}" for r in ours],
         [f"{floors[c]['server_cpu_pct']:.0f} / {floors[c]['client_cpu_pct']:.0f}" for c in sorted(floors)])
    line("non-2xx", [str(r["non_2xx"]) for r in ours], [str(floors[c]["non_2xx"]) for c in sorted(floors)])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="model repository (folder of model folders)")
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--duration", type=int, default=10, help="seconds of measured load per column")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated wrk connection counts")
    parser.add_argument("--port", type=int, default=8840,
                        help="exitserve's port; the no-op server gets the next one (0: any free port for each)")
    parser.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images to cycle")
    parser.add_argument("--wrk-timeout", default="10s")
    parser.add_argument("--out", type=Path, default=Path("runs/breakdown.json"))
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    wrk = require_wrk()
    if not (args.repository / args.model / "manifest.json").is_file():
        parser.error(f"{args.repository / args.model} is not a model folder (no manifest.json)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="exitserve-breakdown-") as tmp:
        images = Path(tmp)
        write_images(images, args.images)
        rows = measure_exitserve(args, wrk, images, args.out.with_suffix(".exitserve.log"))
        rows += measure_noop(args, wrk, images, args.out.with_suffix(".noop.log"))
    args.out.write_text(json.dumps({"model": args.model, "duration_s": args.duration, "cpu_count": os.cpu_count(),
                                    "rows": rows}, indent=2))
    print(markdown(rows))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
