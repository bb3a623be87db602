"""docs/reference/ is generated from ``Settings`` and ``Metrics`` (scripts/generate_reference.py):
a committed page that differs from what the code generates fails here, and each page is checked
against the code it documents (every variable read as documented, every metric with its labels)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from exitserve.server.metrics import Metrics
from exitserve.server.settings import Settings
from tests.support.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


generator = load_script("generate_reference")


def table_rows(page: Path) -> list[list[str]]:
    """The cells of the page's first table, header and separator left out."""
    lines = (ROOT / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def unquoted(cell: str) -> str:
    return cell.strip("`")


@pytest.mark.parametrize("page", sorted(generator.PAGES), ids=str)
def test_the_committed_page_is_what_the_code_generates(page: Path) -> None:
    committed = (ROOT / page).read_text() if (ROOT / page).is_file() else ""
    assert committed == generator.PAGES[page](), f"{page} is stale: run `{generator.COMMAND}` and commit it"


def test_check_names_a_stale_page(tmp_path: Path) -> None:
    (tmp_path / generator.SETTINGS_PAGE).parent.mkdir(parents=True)
    (tmp_path / generator.SETTINGS_PAGE).write_text(generator.settings_markdown())
    (tmp_path / generator.METRICS_PAGE).write_text(generator.metrics_markdown().replace("histogram", "gauge", 1))
    assert generator.stale_pages(tmp_path) == [generator.METRICS_PAGE]


def test_every_setting_is_documented_as_the_server_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {unquoted(row[0]): row for row in table_rows(generator.SETTINGS_PAGE)}
    assert list(rows) == [f"EXITSERVE_{name.upper()}" for name in Settings.model_fields]
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"EXITSERVE_{name.upper()}", raising=False)
    defaults = Settings()
    for name, info in Settings.model_fields.items():
        variable = f"EXITSERVE_{name.upper()}"
        _, _, _, default, meaning = rows[variable]
        assert info.description and " ".join(info.description.split()) == meaning.replace("\\|", "|"), name
        expected = getattr(defaults, name)
        if default in ("unset", "empty"):
            assert expected in (None, []), f"{variable}: documented {default}, is {expected!r}"
            continue
        monkeypatch.setenv(variable, unquoted(default))  # the documented default, read back as the server reads it
        assert getattr(Settings(), name) == expected, variable
        monkeypatch.delenv(variable)


def test_every_metric_is_documented_with_its_type_and_labels() -> None:
    metrics = Metrics()
    families = {w.describe()[0].name: w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
    rows = table_rows(generator.METRICS_PAGE)
    documented = {}
    for name, kind, labels, _, help_text in rows:
        family = unquoted(name).removesuffix("_total") if kind == "counter" else unquoted(name)
        label_names = [unquoted(label) for label in labels.split(", ") if label]
        if label_names:
            families[family].labels(**{label: "x" for label in label_names})  # ValueError: not its labels
        documented[family] = (unquoted(name), kind, help_text)
    assert sorted(documented) == sorted(families)
    created = {f"{family}_created" for family in documented}  # prometheus_client's creation times
    exposed = [family for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               if family.name not in created]
    assert sorted(family.name for family in exposed) == sorted(documented)
    for family in exposed:
        name, kind, help_text = documented[family.name]
        assert kind == family.type, name
        assert help_text.replace("\\|", "|") == " ".join(family.documentation.split()), name
        samples = {sample.name for sample in family.samples}
        assert (name + "_bucket" if kind == "histogram" else name) in samples, (name, samples)
