"""exitserve against a plain FastAPI + ONNX Runtime server, LitServe and the framework floor, under wrk.

Starts one server at a time on 127.0.0.1 and drives it with
``wrk -t1 -c<C> -d<duration>s --latency -s loadtest/wrk/classify.lua`` (raw PNG bodies of
Fashion-MNIST test images, POSTed to the route) at each concurrency C:

a. exitserve at the *near-full* budget: the smallest budget in the model's
   ``calibration_report.json`` whose test accuracy is within 0.003 (0.3 points) of the
   budget-1.0 point's (sent as ``?budget=``);
b. exitserve at its default budget (no ``budget`` in the query);
c. exitserve at budget 1.0 (full depth through the staged path);
d. the plain server (``loadtest.plain_server``: FastAPI, one ONNX Runtime session of
   ``full_model.onnx``, no batching);
e. LitServe (``loadtest.litserve_server``: the same ``full_model.onnx``, LitServe's dynamic
   batching); skipped, with a note, when ``litserve`` is not importable (the ``bench`` extra);
f. the plain server's POST /noop (reads the body, answers a constant): the framework floor.

Each server gets 3 s of unmeasured wrk load once (at the highest concurrency), then one measured
run per concurrency. Per row: successful (2xx) req/s, non-2xx responses, socket errors,
p50/p99 latency, and the CPU of wrk and of the server (its child processes included), as %
of one core. Prints a Markdown table, then the ratios of each exitserve row to the plain server,
to LitServe and to the no-op route at the same concurrency; writes everything to ``--out``.

    python -m exitserve.loadtest.wrk_bench --repository /tmp/repo --model msdnet_fmnist --duration 10

``--guard``: exit 1 when exitserve's default-budget throughput at C=32 is under 2.5x the
plain server's. Needs ``wrk`` (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from exitserve.repository.format import DEFAULT_BUDGET
from exitserve.loadtest.overload import (
    Server,
    WrkRun,
    _descendants,
    launch,
    measured_wrk,
    port_for,
    require_wrk,
    run_wrk,
    start_server,
    stop_server,
    wrk_version,
    write_images,
)

NEAR_FULL_TOLERANCE = 0.003  # accuracy, absolute: 0.3 points
GUARD_CONCURRENCY = 32
GUARD_RATIO = 2.5
WARMUP_S = 3


# --------------------------------------------------------------------------- budgets


def near_full_budget(folder: Path, tolerance: float = NEAR_FULL_TOLERANCE) -> tuple[float, float, float]:
    """(budget, its test accuracy, the budget-1.0 point's test accuracy) from calibration_report.json."""
    report = json.loads((folder / "calibration_report.json").read_text())
    curve = sorted(report["curve"], key=lambda p: p["budget"])
    full = [p for p in curve if abs(p["budget"] - 1.0) < 1e-9]
    if not full:
        raise SystemExit(f"{folder}/calibration_report.json has no budget-1.0 point")
    full_acc = full[-1]["test"]["accuracy"]
    for point in curve:
        if point["test"]["accuracy"] >= full_acc - tolerance:
            return point["budget"], point["test"]["accuracy"], full_acc
    raise AssertionError("unreachable: the budget-1.0 point itself qualifies")


# --------------------------------------------------------------------------- baseline servers


def start_command(cmd: list[str], base_url: str, ready_path: str, log: Path, label: str,
                  timeout: float = 120.0) -> Server:
    """Start ``cmd`` (a baseline server) and wait until ``base_url + ready_path`` answers 200."""
    return launch(cmd, base_url, ready_path, {}, log, label, timeout, stop=stop_all)


def stop_all(server: Server, grace: float = 10.0) -> int | None:
    """Stop the server, then any of its descendants that outlived it (LitServe can leave
    worker processes behind when its main process goes first). Only processes this
    benchmark started, by pid."""
    try:
        children = _descendants(server.pid) if server.proc.poll() is None else []
    except OSError:
        children = []
    status = stop_server(server, grace=grace)
    leftovers = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in leftovers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while leftovers and time.monotonic() < deadline:
            leftovers = [pid for pid in leftovers if _alive(pid)]
            time.sleep(0.2)
        if not leftovers:
            break
    return status


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return state[state.rindex(")") + 2] != "Z"


# --------------------------------------------------------------------------- configurations


@dataclass
class Target:
    key: str            # short id: exitserve_near_full, plain, ...
    name: str           # table label
    kind: str           # exitserve | plain | litserve
    route: str          # path + query
    note: str = ""
    extra: dict = field(default_factory=dict)


def start_target(target: Target, args: argparse.Namespace, port: int, log: Path) -> Server:
    folder = args.repository / args.model
    if target.kind == "exitserve":
        env = {"EXITSERVE_DEFAULT_MODEL": args.model, **target.extra}
        return start_server(args.repository, port, env, log, label=target.name)
    base = f"http://127.0.0.1:{port}"
    if target.kind == "plain":
        cmd = [sys.executable, "-m", "exitserve.loadtest.plain_server", str(folder), "--port", str(port)]
        return start_command(cmd, base, "/readyz", log, target.name)
    if target.kind == "litserve":
        cmd = [sys.executable, "-m", "exitserve.loadtest.litserve_server", str(folder), "--port", str(port)]
        return start_command(cmd, base, "/health", log, target.name)
    raise ValueError(target.kind)


def summarise(target: Target, concurrency: int, run: WrkRun) -> dict:
    non_2xx = {str(code): n for code, n in sorted(run.status.items()) if not 200 <= code < 300}
    return {
        "key": target.key,
        "configuration": target.name,
        "route": target.route,
        "concurrency": concurrency,
        **run.summary(),
        "non_2xx": sum(non_2xx.values()),
        "non_2xx_by_status": non_2xx,
    }


def measure_target(target: Target, args: argparse.Namespace, wrk: str, images: Path, port: int,
                   log: Path) -> list[dict]:
    server = start_target(target, args, port, log)
    rows = []
    try:
        url = f"{server.url}{target.route}"
        run_wrk(wrk, url, images, max(args.concurrency), WARMUP_S, f"{target.name} (warm-up)", args.wrk_timeout)
        for c in args.concurrency:
            label = f"{target.name} C={c}"
            run = measured_wrk(wrk, server, url, images, c, args.duration, label, args.wrk_timeout)
            rows.append(summarise(target, c, run))
            if server.proc.poll() is not None:
                raise RuntimeError(f"{target.name} died during the run:\n{server.log_tail()}")
    finally:
        exit_status = stop_all(server)
    for row in rows:
        row["server_exit_status"] = exit_status
    return rows


# --------------------------------------------------------------------------- output


def markdown(rows: list[dict], ratios: list[dict], notes: list[str], args: argparse.Namespace) -> str:
    lines = [
        "| configuration | C | req/s (2xx) | non-2xx | socket errors | p50 ms | p99 ms | client CPU % | server CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sock = ", ".join(f"{k}: {v}" for k, v in r["socket_errors"].items()) or "0"
        lat = r["latency_ms"]
        lines.append(f"| {r['configuration']} | {r['concurrency']} | {r['ok_per_s']:.0f} | {r['non_2xx']} | {sock} | "
                     f"{lat['p50']:.2f} | {lat['p99']:.2f} | {r['client_cpu_pct']:.0f} | {r['server_cpu_pct']:.0f} |")
    lines += ["", "Throughput ratios (2xx req/s, same concurrency):", "",
              "| exitserve configuration | C | vs plain server | vs LitServe | vs no-op route |",
              "|---|---|---|---|---|"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    for q in ratios:
        lines.append(f"| {q['configuration']} | {q['concurrency']} | {fmt(q['vs_plain'])} | {fmt(q['vs_litserve'])} | "
                     f"{fmt(q['vs_noop'])} |")
    lines += ["", f"wrk -t1, {args.duration} s measured per row after {WARMUP_S} s of unmeasured load once per server; "
              f"CPU % is of one core ({os.cpu_count()} cores here); latency percentiles are wrk's, over all responses."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def compute_ratios(rows: list[dict]) -> list[dict]:
    by = {(r["key"], r["concurrency"]): r["ok_per_s"] for r in rows}
    out = []
    for r in rows:
        if not r["key"].startswith("exitserve"):
            continue
        c = r["concurrency"]

        def ratio(key: str) -> float | None:
            base = by.get((key, c))
            return r["ok_per_s"] / base if base else None

        out.append({"key": r["key"], "configuration": r["configuration"], "concurrency": c,
                    "vs_plain": ratio("plain"), "vs_litserve": ratio("litserve"), "vs_noop": ratio("noop")})
    return out


def guard(rows: list[dict]) -> tuple[bool, str]:
    by = {(r["key"], r["concurrency"]): r["ok_per_s"] for r in rows}
    ours, plain = by.get(("exitserve_default", GUARD_CONCURRENCY)), by.get(("plain", GUARD_CONCURRENCY))
    if ours is None or plain is None:
        return False, (f"guard: no exitserve default-budget and plain-server rows at C={GUARD_CONCURRENCY} "
                       f"(include {GUARD_CONCURRENCY} in --concurrency and run both)")
    if not plain:
        return False, f"guard: the plain server answered no request at C={GUARD_CONCURRENCY}"
    ratio = ours / plain
    verdict = (f"guard: exitserve default budget at C={GUARD_CONCURRENCY}: {ours:.0f} req/s, plain server "
               f"{plain:.0f} req/s: {ratio:.2f}x (required: >= {GUARD_RATIO}x)")
    return ratio >= GUARD_RATIO, verdict


# --------------------------------------------------------------------------- main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True, help="model repository (folder of model folders)")
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--duration", type=int, default=10, help="seconds of measured load per row")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated wrk connection counts")
    parser.add_argument("--port", type=int, default=8810, help="first port; each server gets the next one (0: any free port for each)")
    parser.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images to cycle")
    parser.add_argument("--wrk-timeout", default="10s", help="wrk --timeout (wrk's default: 2s)")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of: exitserve_near_full, exitserve_default, exitserve_full, "
                             "exitserve_default_2_workers, plain, litserve, noop (development)")


def parse_concurrency(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: positive integers, e.g. 1,8,32")
    if not (args.repository / args.model / "manifest.json").is_file():
        parser.error(f"{args.repository / args.model} is not a model folder (no manifest.json)")


def run(args: argparse.Namespace) -> dict:
    """Every target under wrk, one server at a time; the report (rows, ratios, guard verdict)."""
    wrk = require_wrk()
    folder = args.repository / args.model
    near_budget, near_acc, full_acc = near_full_budget(folder)
    base_budget = DEFAULT_BUDGET
    model_q = {"model": args.model}
    notes = [f"near-full budget {near_budget:.4f}: smallest calibrated budget with test accuracy {near_acc:.4f} "
             f"within {NEAR_FULL_TOLERANCE} of budget 1.0's {full_acc:.4f} ({folder}/calibration_report.json)",
             f"exitserve default budget: {base_budget} (server.settings; no budget in the query)"]
    targets = [
        Target("exitserve_near_full", f"exitserve budget {near_budget:.3f} (near-full)", "exitserve",
               "/classify?" + urlencode({**model_q, "budget": f"{near_budget:.6f}"})),
        Target("exitserve_default", f"exitserve default budget ({base_budget})", "exitserve",
               "/classify?" + urlencode(model_q)),
        Target("exitserve_full", "exitserve budget 1.0", "exitserve",
               "/classify?" + urlencode({**model_q, "budget": "1.0"})),
        Target("exitserve_default_2_workers", f"exitserve default budget ({base_budget}), 2 workers", "exitserve",
               "/classify?" + urlencode(model_q), extra={"EXITSERVE_WORKERS": "2"}),
        Target("plain", "plain FastAPI + ORT", "plain", "/classify"),
        Target("litserve", "LitServe (batch 32, 2 ms)", "litserve", "/classify"),
        Target("noop", "plain FastAPI /noop (floor)", "plain", "/noop"),
    ]
    if importlib.util.find_spec("litserve") is None:
        targets = [t for t in targets if t.key != "litserve"]
        notes.append("LitServe skipped: `litserve` is not importable (pip install -e '.[bench]')")
    else:
        from importlib.metadata import version

        notes.append(f"LitServe {version('litserve')}: max_batch_size=32, batch_timeout=0.002 s, fast_queue, "
                     "1 ORT intra-op thread (loadtest/litserve_server.py)")
    if args.only:
        wanted = {k.strip() for k in args.only.split(",")}
        targets = [t for t in targets if t.key in wanted]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="exitserve-wrk-bench-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        print(f"writing {args.images} test images as PNG to {images}", file=sys.stderr)
        count = write_images(images, args.images)
        for i, target in enumerate(targets):
            log = args.out.with_name(f"{args.out.stem}.{target.key}.log")
            rows += measure_target(target, args, wrk, images, port_for(args.port, i), log)
    ratios = compute_ratios(rows)
    passed, verdict = guard(rows)
    return {"repository": str(args.repository), "model": args.model, "images": count,
            "near_full_budget": near_budget, "near_full_accuracy": near_acc, "full_accuracy": full_acc,
            "default_budget": base_budget, "concurrency": args.concurrency, "duration_s": args.duration,
            "warmup_s": WARMUP_S, "cpu_count": os.cpu_count(), "wrk": wrk_version(wrk),
            "notes": notes, "results": rows, "ratios": ratios,
            "guard": {"concurrency": GUARD_CONCURRENCY, "min_ratio": GUARD_RATIO, "passed": passed,
                      "verdict": verdict}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--guard", action="store_true",
                        help=f"exit 1 when exitserve's default-budget req/s at C={GUARD_CONCURRENCY} is under "
                             f"{GUARD_RATIO}x the plain server's")
    parser.add_argument("--out", type=Path, default=Path("runs/wrk_bench.json"))
    args = parser.parse_args(argv)
    parse_concurrency(parser, args)
    report = run(args)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report["results"], report["ratios"], report["notes"], args))
    verdict = report["guard"]["verdict"]
    print(f"\n{verdict}")
    print(f"\nwritten: {args.out}", file=sys.stderr)
    if args.guard and not report["guard"]["passed"]:
        print(f"--guard: FAILED. {verdict}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
