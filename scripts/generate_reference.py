"""Writes docs/reference/settings.md and docs/reference/metrics.md from the code.

``Settings`` (every ``EXITSERVE_*`` variable) and ``Metrics`` (every family ``/metrics``
exposes) are the truth; these pages are generated from them so they cannot drift. The output
depends on nothing but the code: no timestamps, no environment.

    python scripts/generate_reference.py           # write both files
    python scripts/generate_reference.py --check   # exit 1 naming each stale file
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import annotated_types
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from pydantic.fields import FieldInfo

from exitserve.cli import build_parser
from exitserve.server.metrics import Metrics
from exitserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_PAGE = Path("docs/reference/settings.md")
METRICS_PAGE = Path("docs/reference/metrics.md")
COMMAND = "python scripts/generate_reference.py"
GENERATED = f"Generated from the code by `{COMMAND}`; do not edit by hand."

TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
BOUNDS = {annotated_types.Gt: (">", "gt"), annotated_types.Ge: (">=", "ge"), annotated_types.Lt: ("<", "lt"),
          annotated_types.Le: ("<=", "le")}
WORKER_MODES = {
    "counter": "added up over every worker, live and exited",
    "histogram": "added up over every worker, live and exited",
    "all": "one series per worker (`pid` label), exited ones included",
    "liveall": "one series per live worker (`pid` label)",
    "livesum": "summed over the live workers",
    "livemax": "the largest of the live workers' values",
    "max": "the largest of every worker's values, exited ones included",
    "min": "the smallest of every worker's values, exited ones included",
    "livemin": "the smallest of the live workers' values",
    "sum": "summed over every worker, exited ones included",
    "mostrecent": "the most recently set value",
    "livemostrecent": "the most recently set value of the live workers",
}


# --------------------------------------------------------------------------- shared


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


# --------------------------------------------------------------------------- settings


def env_name(field: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def type_text(annotation: object) -> str:
    """A field's type in words: optional types read as their value's type (the default says unset)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"comma-separated list of {type_text(typing.get_args(annotation)[0])}s"
    return TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))  # type: ignore[call-overload]


def bounds_text(info: FieldInfo) -> str:
    """The field's numeric constraints, such as ``> 0, <= 1``."""
    bounds = [(BOUNDS[type(m)], m) for m in info.metadata if type(m) in BOUNDS]
    return ", ".join(f"{symbol} {getattr(m, attribute)}" for (symbol, attribute), m in bounds)


def value_text(value: object) -> str:
    """A default as it would be written in the variable."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`" + ",".join(map(str, value)) + "`" if value else "empty"
    return "unset" if value is None else f"`{value}`"


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return value_text(info.default_factory())  # type: ignore[call-arg]
    return value_text(info.default)


def serve_options() -> dict[str, str]:
    """Settings field -> the ``exitserve serve`` option that overrides it."""
    subcommands = next(a for a in build_parser()._actions if a.choices and "serve" in a.choices)
    serve = subcommands.choices["serve"]
    return {a.dest: a.option_strings[0] for a in serve._actions
            if a.dest in Settings.model_fields and a.option_strings}


def settings_markdown() -> str:
    options = serve_options()
    rows = []
    for name, info in Settings.model_fields.items():
        kind = type_text(info.annotation)
        if bounds := bounds_text(info):
            kind += f", {bounds}"
        option = f"`{options[name]}`" if name in options else ""
        rows.append([f"`{env_name(name)}`", option, kind, default_text(info), info.description or ""])
    lines = [
        "# Settings", "", GENERATED, "",
        "`exitserve serve` reads every setting from its environment variable (`server/settings.py`, ",
        "`exitserve.server.settings.Settings`); a command-line option, where there is one, wins over the ",
        "variable. Booleans are `true` or `false`; lists are comma-separated. Per model, a `serving.json` ",
        "beside the manifest may override `default_budget`, `max_batch_size`, `max_queue_images`, ",
        "`max_pixels`, `latency_slo_ms` and `slo_floor_budget`.", "",
        *table(["variable", "option", "type", "default", "meaning"], rows), "",
    ]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------- metrics


def metric_wrappers(metrics: Metrics) -> list[MetricWrapperBase]:
    """The metric objects of ``metrics``, in the order they were registered. Fails when the
    registry holds a family that is not one of them (it would be missing from the page)."""
    by_name = {family(w).name: w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
    registered = [f.name for f in metrics.registry.collect()]
    if sorted(registered) != sorted(by_name):
        raise SystemExit(f"Metrics' registry and attributes differ: {sorted(set(registered) ^ set(by_name))}")
    return [by_name[name] for name in registered]


def family(wrapper: MetricWrapperBase) -> Metric:
    """Name (a counter's without ``_total``), type and help, through the public API."""
    return wrapper.describe()[0]


# prometheus_client has no public accessor for a metric's label names, buckets or
# multiprocess mode: these read its attributes.
def label_names(wrapper: MetricWrapperBase) -> tuple[str, ...]:
    return tuple(wrapper._labelnames)


def worker_mode(wrapper: MetricWrapperBase) -> str:
    kind = family(wrapper).type
    mode = getattr(wrapper, "_multiprocess_mode", None) if kind == "gauge" else kind
    return WORKER_MODES.get(mode, str(mode))


def buckets_text(wrapper: MetricWrapperBase) -> str:
    bounds = [b for b in wrapper._upper_bounds if b != float("inf")]
    return ", ".join(f"{b:g}" for b in bounds) + ", +Inf"


def exposed_name(wrapper: MetricWrapperBase) -> str:
    name, kind = family(wrapper).name, family(wrapper).type
    return f"{name}_total" if kind == "counter" else name


def metrics_markdown() -> str:
    wrappers = metric_wrappers(Metrics())
    rows = [[f"`{exposed_name(w)}`", family(w).type, ", ".join(f"`{label}`" for label in label_names(w)),
             worker_mode(w), family(w).documentation] for w in wrappers]
    histograms = [[f"`{family(w).name}`", buckets_text(w)] for w in wrappers if family(w).type == "histogram"]
    lines = [
        "# Metrics", "", GENERATED, "",
        "`GET /metrics` serves these families in Prometheus's text format (`server/metrics.py`, ",
        "`exitserve.server.metrics.Metrics`). A counter is exposed as its name below (ending in ",
        "`_total`), a histogram as its name with `_bucket`, `_sum` and `_count`; with one worker, ",
        "counters and histograms also carry a `_created` sample. With several workers ",
        "(`EXITSERVE_WORKERS`), `/metrics` aggregates the workers' values as the column \"with several ",
        "workers\" says.", "",
        *table(["metric", "type", "labels", "with several workers", "help"], rows), "",
        "## Histogram buckets", "",
        *table(["histogram", "upper bounds (seconds, or images for the batch size)"], histograms), "",
    ]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------- command


PAGES: dict[Path, Callable[[], str]] = {SETTINGS_PAGE: settings_markdown, METRICS_PAGE: metrics_markdown}


def stale_pages(root: Path = ROOT) -> list[Path]:
    """The pages whose file under ``root`` differs from what would be generated."""
    return [page for page, render in PAGES.items()
            if not (root / page).is_file() or (root / page).read_text() != render()]


def write_pages(root: Path = ROOT) -> None:
    for page, render in PAGES.items():
        (root / page).parent.mkdir(parents=True, exist_ok=True)
        (root / page).write_text(render())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is stale")
    args = parser.parse_args(argv)
    if not args.check:
        write_pages()
        print("wrote " + ", ".join(map(str, PAGES)))
        return 0
    stale = stale_pages()
    for page in stale:
        print(f"{page} is stale: run `{COMMAND}`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
