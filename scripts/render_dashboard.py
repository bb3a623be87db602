"""Render the Grafana dashboard's main panels from real Prometheus data into one PNG.

Grafana is not needed: the panels' queries are read from
deploy/grafana/dashboards/exitserve.json (by panel title), their variables substituted the
way Grafana does, evaluated with Prometheus' query_range API and drawn with matplotlib.

End to end (starts exitserve on the repository, a Prometheus scraping it every second, a
bounded Locust load, renders, then stops all three):

    .venv/bin/python scripts/render_dashboard.py --repository /tmp/repo --out docs/dashboard.png

Against what runs already (a server, optionally its Prometheus; --no-load when the load
already happened, then --since says how far back to draw):

    .venv/bin/python scripts/render_dashboard.py --server http://127.0.0.1:8000 \\
        [--prometheus-url http://127.0.0.1:9090] [--no-load --since 120]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import httpx

from exitserve.loadtest.overload import free_port, launch, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "exitserve.json"
VENV_BIN = ROOT / ".venv" / "bin"
JOB = "exitserve"

# The panels drawn, by their title in the dashboard JSON, in grid order (two columns).
MAIN_PANELS = (
    "Requests/s by route and status",
    "Images/s",
    "Request latency p50 / p95 / p99 by route",
    "Exit depth distribution (share of images per exit)",
    "Mean cost per image vs budget",
    "Stage latency p50 / p99",
    "Batch size (mean and p90)",
    "Queue depth",
    "Estimated vs calibrated accuracy",
    "Exit drift from calibration",
)


# ------------------------------------------------------------------ the dashboard JSON
def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those inside (collapsed) rows included; rows themselves left out."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_by_title(dashboard: dict, title: str) -> dict:
    for panel in iter_panels(dashboard):
        if panel.get("title") == title:
            return panel
    raise KeyError(f"no panel titled {title!r} in the dashboard")


def variable_queries(dashboard: dict) -> dict[str, str]:
    """Template variable name -> its query (``label_values(metric, label)``)."""
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        out[var["name"]] = query.get("query") if isinstance(query, dict) else query
    return out


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """``label_values(metric, label)`` -> (series selector or None, label)."""
    m = LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group("match"), m.group("label")


def label_values(prometheus: str, query: str) -> list[str]:
    """What Grafana's variable query returns: the label's values on the matching series."""
    match, label = parse_label_values(query)
    params = {"match[]": match} if match else {}
    body = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params=params, timeout=10).json()
    if body.get("status") != "success":
        raise RuntimeError(f"label values of {query!r}: {body}")
    return sorted(body["data"])


_REGEX_SPECIAL = re.compile(r"([\\^$*+?.()|{}\[\]])")


def grafana_regex(values: list[str] | str) -> str:
    """A multi-value variable as Grafana writes it into ``label=~"..."``: each value
    regex-escaped (a doubled backslash, a PromQL string escape), several as ``(a|b)``;
    ``"$__all"`` (All, allValue ``.*``) as ``.*``."""
    if values == "$__all" or values == ["$__all"]:
        return ".*"
    if isinstance(values, str):
        values = [values]
    escaped = [_REGEX_SPECIAL.sub(r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, str], rate_interval: str = "1m", interval: str = "15s",
               range_: str = "5m") -> str:
    """Grafana's substitution: ``$__rate_interval``, ``$__interval``, ``$__range`` and
    the template variables (already formatted, e.g. by ``grafana_regex``)."""
    builtins = {"__rate_interval": rate_interval, "__interval": interval, "__range": range_,
                "__range_s": str(int(_seconds(range_))), "__interval_ms": str(int(_seconds(interval) * 1000))}
    values = {**builtins, **variables}

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    # a name runs up to the first non-word character: $__range_s is not $__range + "_s"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration)
    if not m:
        raise ValueError(f"not a duration: {duration!r}")
    return float(m.group(1)) * units[m.group(2)]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


# ------------------------------------------------------------------ processes
@contextmanager
def exitserve_server(repository: Path, log: Path) -> Iterator[str]:
    server = start_server(repository, free_port(), {}, log)
    try:
        yield server.url
    finally:
        stop_server(server)


def prometheus_config(target: str, scrape_interval: str = "1s", rule_files: Sequence[Path] = ()) -> str:
    config = (f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
              f"scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n")
    if rule_files:
        config += "rule_files:\n" + "".join(f"  - '{path}'\n" for path in rule_files)
    return config


@contextmanager
def prometheus(target: str, workdir: Path, scrape_interval: str = "1s",
               rule_files: Sequence[Path] = ()) -> Iterator[str]:
    """A Prometheus scraping ``target`` (and evaluating ``rule_files``) until the block ends."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not on PATH (apt-get install prometheus)")
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(target, scrape_interval, rule_files))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = launch([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}"], url, "/-/ready", {}, workdir / "prometheus.log",
                    "prometheus", 60)
    try:
        yield url
    finally:
        stop_server(server)


def wait_for_scrape(prom: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = instant(prom, f'up{{job="{JOB}"}} == 1')
            if result and instant(prom, "exitserve_budget"):
                return
        except (httpx.HTTPError, RuntimeError):
            pass
        time.sleep(0.5)
    raise RuntimeError("prometheus never scraped exitserve")


def run_locust(host: str, users: int, spawn_rate: int, duration: str, log: Path) -> int:
    exe = VENV_BIN / "locust"
    command = [str(exe) if exe.exists() else "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
               "--headless", "-u", str(users), "-r", str(spawn_rate), "-t", duration, "--host", host,
               "--only-summary"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=_seconds(duration) + 120)
    return done.returncode  # 1 when some requests failed: the picture shows them, not an error here


# ------------------------------------------------------------------ queries
def instant(prom: str, expr: str) -> list[dict]:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    body = httpx.get(f"{prom}/api/v1/query_range",
                     params={"query": expr, "start": start, "end": end, "step": step}, timeout=30).json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


# ------------------------------------------------------------------ drawing
UNITS = {  # Grafana unit -> (scale, axis label)
    "s": (1000.0, "ms"), "percentunit": (100.0, "%"), "reqps": (1.0, "requests/s"), "short": (1.0, ""),
}
LINESTYLES = ("-", "--", ":", "-.")


def render(dashboard: dict, prom: str, variables: dict[str, str], start: float, end: float, out: Path,
           rate_interval: str, subtitle: str = "", drop_labels: tuple[str, ...] = ()) -> list[str]:
    """Draw ``MAIN_PANELS`` over [start, end] into ``out``; returns the queries run.
    ``drop_labels``: labels left out of the legends (a model, when there is one only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    step = max(1.0, (end - start) / 300)
    cols = 2
    rows = math.ceil(len(MAIN_PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(18, 4.2 * rows), squeeze=False)
    used: list[str] = []
    for ax, title in zip(axes.flat, MAIN_PANELS):
        panel = panel_by_title(dashboard, title)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        scale, ylabel = UNITS.get(unit, (1.0, unit))
        stacked = (panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
                   .get("stacking", {}).get("mode", "none") != "none")
        quantiles = all("histogram_quantile" in t["expr"] for t in panel["targets"])
        colors: dict = {}
        drawn = 0
        stack_x, stack_ys, stack_labels = None, [], []
        for i, target in enumerate(panel["targets"]):
            expr = substitute(target["expr"], variables, rate_interval=rate_interval,
                              range_=f"{int(end - start)}s")
            used.append(expr)
            for series in sorted(query_range(prom, expr, start, end, step), key=lambda s: sorted(s["metric"].items())):
                drawn += 1
                labels = series["metric"]
                xs = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                ys = [float(v) * scale for _, v in series["values"]]
                name = legend(target.get("legendFormat", ""), {k: ("" if k in drop_labels else v)
                                                                 for k, v in labels.items()})
                name = " ".join(name.split()) or legend(target.get("legendFormat", ""), labels)
                if stacked:
                    stack_x = stack_x or xs
                    if len(xs) == len(stack_x):
                        stack_ys.append([0.0 if math.isnan(y) else y for y in ys])
                        stack_labels.append(name)
                    continue
                key = frozenset(labels.items()) if quantiles else (i, frozenset(labels.items()))
                if key not in colors:
                    colors[key] = f"C{len(colors) % 10}"
                ax.plot(xs, ys, label=name, color=colors[key], linestyle=LINESTYLES[i % len(LINESTYLES)],
                        linewidth=1.6)
        if stacked and stack_ys:
            ax.stackplot(stack_x, *stack_ys, labels=stack_labels, alpha=0.85)
            ax.set_ylim(0, 100 if unit == "percentunit" else None)
        ax.set_title(title, fontsize=12, fontweight="bold", loc="left")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        scale_type = (panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
                      .get("scaleDistribution", {}).get("type", "linear"))
        if scale_type == "log" and drawn:
            ax.set_yscale("log")  # as the panel is configured in Grafana
            ax.grid(True, which="minor", alpha=0.12)
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        if drawn:
            ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                      frameon=False)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    for ax in list(axes.flat)[len(MAIN_PANELS):]:
        ax.set_visible(False)
    fig.suptitle(f"{dashboard.get('title', 'dashboard')} dashboard, rendered from Prometheus with the dashboard's "
                 f"own queries ($__rate_interval = {rate_interval})", fontsize=15, fontweight="bold", y=0.995)
    if subtitle:
        fig.text(0.5, 0.968, subtitle, ha="center", fontsize=11, color="dimgray")
    fig.tight_layout(rect=(0, 0, 1, 0.962), h_pad=2.0, w_pad=1.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return used


def resolve_variables(dashboard: dict, prom: str, chosen: dict[str, list[str] | None]) -> dict[str, str]:
    """Each template variable: the values asked for (checked against its label_values
    query), else All."""
    out = {}
    for name, query in variable_queries(dashboard).items():
        wanted = chosen.get(name)
        if wanted:
            available = label_values(prom, query)
            missing = sorted(set(wanted) - set(available))
            if missing:
                raise SystemExit(f"${name}: {missing} not among {available}")
            out[name] = grafana_regex(wanted)
        else:
            out[name] = ".*"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--repository", type=Path, help="model repository: start exitserve on it (end to end)")
    src.add_argument("--server", help="URL of a running exitserve")
    ap.add_argument("--prometheus-url", help="a Prometheus already scraping the server (else one is started)")
    ap.add_argument("--no-load", action="store_true", help="the load already happened: draw the last --since s")
    ap.add_argument("--since", type=float, default=120, help="with --no-load: seconds back to draw (120)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--spawn-rate", type=int, default=8)
    ap.add_argument("--duration", default="60s", help="Locust run time (60s)")
    ap.add_argument("--rate-interval", default="15s", help="what $__rate_interval becomes (15s)")
    ap.add_argument("--model", action="append", help="$model values (default All)")
    ap.add_argument("--instance", action="append", help="$instance values (default All)")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = ap.parse_args(argv)
    if args.repository and args.no_load:
        ap.error("--no-load goes with --server")

    dashboard = load_dashboard(args.dashboard)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="render_dashboard_")))
        server = args.server.rstrip("/") if args.server else stack.enter_context(
            exitserve_server(args.repository, work / "exitserve.log"))
        if args.prometheus_url:
            prom = args.prometheus_url.rstrip("/")
        else:
            prom = stack.enter_context(prometheus(urlparse(server).netloc, work))
        wait_for_scrape(prom)
        if args.no_load:
            end = time.time()
            start = end - args.since
            subtitle = f"server {server}, last {args.since:.0f} s"
        else:
            print(f"locust: {args.users} users for {args.duration} against {server}", flush=True)
            start = time.time()
            rc = run_locust(server, args.users, args.spawn_rate, args.duration, work / "locust.log")
            time.sleep(_seconds(args.rate_interval) / 2 + 3)  # the last scrapes, and the tail of the load
            end = time.time()
            summary = (work / "locust.log").read_text(errors="replace")
            print(summary[-2500:], flush=True)
            if rc not in (0, 1):
                raise SystemExit(f"locust exited with {rc}")
            subtitle = (f"Locust loadtest/locustfile.py, {args.users} users, {args.duration}, against exitserve "
                        f"on {urlparse(server).netloc} (1 s scrapes)")
        variables = resolve_variables(dashboard, prom, {"model": args.model, "instance": args.instance})
        models = args.model or label_values(prom, variable_queries(dashboard)["model"])
        drop = ("model",) if len(models) == 1 else ()
        if drop:
            subtitle += f"; model {models[0]}"
        used = render(dashboard, prom, variables, start, end, args.out, args.rate_interval, subtitle, drop)
    print(f"wrote {args.out} ({len(used)} queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
