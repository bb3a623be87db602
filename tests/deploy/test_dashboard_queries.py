"""Every query of the Grafana dashboard, and every alert expression, evaluated by a real
Prometheus (Debian's package) scraping a real exitserve that served real traffic."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml

from exitserve.server.batcher import DynamicBatcher
from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")


def _load_render_script():
    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "scripts" / "render_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render_script()  # the dashboard parsing and Grafana substitution, shared with the PNG

# Queries that have no data on this test's traffic, and why. Everything else must return
# at least one finite sample.
NO_DATA_HERE = {
    'sum by (model) (rate(exitserve_inference_failures_total{model=~"$model", instance=~"$instance"}'
    '[$__rate_interval]))': "no engine run fails here: the counter has no series until the first failure",
}

MODEL = "msdnet_fmnist"
IMAGES = 16  # single-image requests per round
ROUNDS = 2  # the first creates every series, the second moves them: rate() needs a scraped value before
MAX_QUEUE = 8  # the model's queue; the test fills it to have a request refused with 503
V2_IMAGES = 2  # images in the one v2 inference request per round
# Over by the time the request reaches the engine, on any machine: each such image, sent with
# thresholds no confidence reaches, leaves after stage 0 because of its deadline (1 ms is not
# enough: a fast machine answers well inside it; and a confident image leaves at exit 0 anyway)
PAST_DEADLINE_MS = 0.001
NEVER = "1e9"  # a threshold no confidence reaches
DEADLINED = IMAGES // 8  # single images sent with that deadline, per round
REQUESTS = IMAGES + 6  # inference requests per round: the singles, 2 batches, 1 v2, 3 bad ones
ANSWERED_IMAGES = IMAGES + 4 + V2_IMAGES  # images classified per round (the refused batch's are not)
RATE_INTERVAL = "5m"  # what $__rate_interval becomes: wide, so the sample before the second round stays inside
SCRAPE_TIMEOUT_S = 60
# Model health (issue 25): before the rounds, enough images for the label-free estimate and the
# exit drift (monitor_min_images, 100 by default) and for the shadow agreement (20 shadowed
# images), labels for a few of them, so that the Model health row has data. The exit drift
# counts only images whose exit the thresholds chose: single images, not a batch's (its
# budget is spread over the batch). Every answered image is sampled for a shadow run here, but
# shadow runs may cost at most what the answers cost (the cap is 1 at most): at the default
# budget, 160 images pay for fewer than 20 full-depth runs. So every fourth single image asks
# for budget 1: it pays for a shadow run of another, and one answered at the last exit is its
# own shadow (an agreement at no cost).
HEALTH_SINGLES = 128  # single images, at the default budget or (every fourth) at budget 1
HEALTH_LABELLED = 16  # of them, labelled afterwards by their answers' X-Request-ID
HEALTH_BATCH = MAX_QUEUE // 2  # images per /classify/batch, well inside max_queue_images
HEALTH_BATCHES = 8
HEALTH_IMAGES = HEALTH_SINGLES + HEALTH_BATCHES * HEALTH_BATCH
HEALTH_SHADOWED = 20  # the agreement is published from this many shadowed images on
SHADOW_TIMEOUT_S = 30  # shadow runs happen off the request path, while the model is idle


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query target of every panel."""
    dashboard = render.load_dashboard()
    return [(p["title"], t["expr"]) for p in render.iter_panels(dashboard) for t in p.get("targets", [])]


# ------------------------------------------------------------------ fast: the JSON itself
def test_dashboard_shape() -> None:
    dashboard = render.load_dashboard()
    queries = render.variable_queries(dashboard)
    assert queries == {"model": "label_values(exitserve_images_total, model)",
                       "instance": "label_values(exitserve_images_total, instance)"}
    for var in dashboard["templating"]["list"]:
        assert var["multi"] and var["includeAll"]
    titles = [p["title"] for p in render.iter_panels(dashboard)]
    assert len(titles) == len(set(titles)), "panel titles are how the PNG script finds panels"
    for title in render.MAIN_PANELS:
        render.panel_by_title(dashboard, title)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


MODEL_LABELLED = ("exitserve_request_latency_seconds", "exitserve_images_total", "exitserve_exits_total",
                  "exitserve_deadline_exits_total", "exitserve_cost_fraction_total", "exitserve_stage_latency_seconds",
                  "exitserve_batch_size", "exitserve_queue_images", "exitserve_budget", "exitserve_effective_budget",
                  "exitserve_rejected_total", "exitserve_inference_failures_total", "exitserve_slo_requests_total",
                  "exitserve_expected_accuracy", "exitserve_latency_objective_seconds",
                  "exitserve_estimated_accuracy", "exitserve_calibrated_accuracy", "exitserve_exit_drift",
                  "exitserve_shadow_agreement", "exitserve_labelled_accuracy", "exitserve_shadow_images_total",
                  "exitserve_shadow_cost_fraction_total", "exitserve_shadow_skipped_total", "exitserve_labels_total",
                  "exitserve_alert_threshold")


def test_every_selector_filters_on_the_variables() -> None:
    for title, expr in dashboard_targets():
        selectors = re.findall(r"(exitserve_\w+)\{([^}]*)\}", expr)
        assert selectors, f"{title}: no selector in {expr}"
        bare = re.findall(r"(exitserve_\w+)(?![\w{])", expr)
        assert not bare, f"{title}: unfiltered {bare} in {expr}"
        for metric, matchers in selectors:
            assert 'instance=~"$instance"' in matchers, f"{title}: {metric} not filtered on $instance"
            if metric.startswith(MODEL_LABELLED):
                assert 'model=~"$model"' in matchers, f"{title}: {metric} not filtered on $model"


def test_substitution_like_grafana() -> None:
    assert render.grafana_regex(["127.0.0.1:8000"]) == r"127\\.0\\.0\\.1:8000"
    assert render.grafana_regex(["a", "b"]) == "(a|b)"
    assert render.grafana_regex("$__all") == ".*"
    out = render.substitute('rate(x{model=~"$model"}[$__rate_interval]) / $__range_s + ${model}',
                            {"model": "m"}, rate_interval="30s", range_="5m")
    assert out == 'rate(x{model=~"m"}[30s]) / 300 + m'
    with pytest.raises(KeyError):
        render.substitute("x{a=~\"$nope\"}", {})


# ------------------------------------------------------------------ slow: a real Prometheus
def _traffic(url: str, exits: int, batcher: DynamicBatcher) -> dict[str, int]:
    """Single images at different budgets (a few with a deadline already past), a batch, a
    v2 request, a request refused at a full queue (503) and bad requests (4xx): every counter and histogram the
    panels read moves, whatever the machine's speed. Returns the status counts."""
    pixels, _ = fashion_images(IMAGES)
    blobs = [encode(p) for p in pixels]
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        def note(response: httpx.Response) -> None:
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1

        for i, blob in enumerate(blobs):
            params = {"budget": (0.2, 0.35, 0.6, 1.0)[i % 4]}
            if i % 8 == 7:
                params = {"thresholds": ",".join([NEVER] * (exits - 1)), "deadline_ms": PAST_DEADLINE_MS}
            note(client.post("/classify", content=blob, headers={"content-type": "image/png"}, params=params))
        files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs[:4])]
        note(client.post("/classify/batch", files=files, data={"budget": "0.5"}))
        v2 = {"inputs": [{"name": "images", "shape": [V2_IMAGES], "datatype": "BYTES",
                          "data": [base64.b64encode(b).decode() for b in blobs[:V2_IMAGES]]}]}
        note(client.post(f"/v2/models/{MODEL}/infer", json=v2))  # the Open Inference Protocol's route
        batcher.waiting_images += MAX_QUEUE  # the queue full, as under a burst: the next request is refused
        try:
            note(client.post("/classify", content=blobs[0], headers={"content-type": "image/png"}))
        finally:
            batcher.waiting_images -= MAX_QUEUE
        note(client.post("/classify", content=b"not an image", headers={"content-type": "image/png"}))
        note(client.post("/classify", content=blobs[0], headers={"content-type": "text/plain"}))
        note(client.post("/classify", content=blobs[0], headers={"content-type": "image/png"},
                         params={"budget": 7}))
    return statuses


def _health_traffic(url: str) -> dict:
    """HEALTH_IMAGES images (singles, then small batches at the default budget), then labels
    for the first singles (their true classes, by the X-Request-ID of each answer) and for
    the first batch's images (by index), and one id the server never gave; then a wait until
    enough images were shadowed. Returns the labels answer."""
    assert HEALTH_IMAGES >= 150 and HEALTH_SINGLES >= 100 and HEALTH_BATCH < MAX_QUEUE
    pixels, labels = fashion_images(HEALTH_IMAGES)
    blobs = [encode(p) for p in pixels]
    with httpx.Client(base_url=url, timeout=60) as client:
        request_ids = []
        for i, blob in enumerate(blobs[:HEALTH_SINGLES]):
            params = {"budget": 1.0} if i % 4 == 3 else {}
            answer = client.post("/classify", content=blob, headers={"content-type": "image/png"}, params=params)
            assert answer.status_code == 200, answer.text
            request_ids.append(answer.headers["x-request-id"])
        batch_ids = []
        for first in range(HEALTH_SINGLES, HEALTH_IMAGES, HEALTH_BATCH):
            files = [("files", (f"{i}.png", blobs[i], "image/png")) for i in range(first, first + HEALTH_BATCH)]
            answer = client.post("/classify/batch", files=files)
            assert answer.status_code == 200, answer.text
            batch_ids.append(answer.headers["x-request-id"])
        body = {"labels": [{"request_id": rid, "label": int(labels[i])}
                           for i, rid in enumerate(request_ids[:HEALTH_LABELLED])]
                + [{"request_id": batch_ids[0], "label": int(labels[HEALTH_SINGLES + j]), "image": j}
                   for j in range(HEALTH_BATCH)]
                + [{"request_id": "never-answered", "label": 0}]}
        answer = client.post(f"/v1/models/{MODEL}/labels", json=body)
        assert answer.status_code == 200, answer.text
        labelled = answer.json()
        assert labelled["matched"] == HEALTH_LABELLED + HEALTH_BATCH, labelled
        assert labelled["unknown"] == ["never-answered"], labelled
        assert labelled["labelled_accuracy"] is not None, labelled

        deadline = time.monotonic() + SHADOW_TIMEOUT_S
        while True:
            monitoring = client.get(f"/v1/models/{MODEL}").json()["monitoring"]
            if (monitoring["shadow"]["images"] or 0) >= HEALTH_SHADOWED:
                break
            assert time.monotonic() < deadline, f"fewer than {HEALTH_SHADOWED} images shadowed: {monitoring}"
            time.sleep(0.2)
    assert monitoring["estimated_accuracy"] is not None and monitoring["calibrated_accuracy"] is not None, monitoring
    assert monitoring["exit_drift"] is not None and monitoring["shadow"]["agreement"] is not None, monitoring
    return labelled


def _query(api: str, expr: str) -> dict:
    return httpx.get(f"{api}/api/v1/query", params={"query": expr}, timeout=10).json()


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def _scalar(api: str, expr: str) -> tuple[float, float] | None:
    """(sample time, value) of a one-series query, None while it has no series."""
    result = _query(api, expr)["data"]["result"]
    return (float(result[0]["value"][0]), float(result[0]["value"][1])) if result else None


def _wait_for_scrapes(api: str, target: str, rounds: int, before: tuple[int, int] = (0, 0)) -> None:
    """Poll Prometheus until a scrape of ``target`` holds every request and image of
    ``rounds`` rounds of traffic (after ``before``: requests, images served earlier), then
    until one more scrape is in: the server counts a request after sending its answer, so
    the scrape that first shows the last request may still miss a counter of it; the next
    one cannot."""
    wanted = {f'sum(exitserve_requests_total{{job="exitserve", instance="{target}"}})': before[0] + rounds * REQUESTS,
              f'sum(exitserve_images_total{{job="exitserve", instance="{target}"}})':
                  before[1] + rounds * ANSWERED_IMAGES}
    last_scrape = f'timestamp(up{{job="exitserve", instance="{target}"}})'
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    seen: dict[str, tuple[float, float] | None] = {}
    while True:
        seen = {expr: _scalar(api, expr) for expr in wanted}
        if all(got is not None and got[1] == value for (expr, value), got in zip(wanted.items(), seen.values())):
            break
        assert time.monotonic() < deadline, f"Prometheus never scraped {rounds} round(s) of traffic: {seen}"
        time.sleep(0.2)
    complete = _scalar(api, last_scrape)
    assert complete is not None
    while (scrape := _scalar(api, last_scrape)) is None or scrape[1] <= complete[1]:
        assert time.monotonic() < deadline, f"no scrape of {target} after {complete[1]}"
        time.sleep(0.2)


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (scripts/install.sh installs it)")
def test_every_dashboard_query_has_data(served_repository: Path, tmp_path: Path) -> None:
    dashboard = render.load_dashboard()
    exits = len(json.loads((served_repository / MODEL / "manifest.json").read_text())["stages"])
    # a latency objective far above anything this traffic sees: its series exist, it never acts;
    # every answered image sampled for a shadow run, and a cost cap that lets most of them run
    settings = Settings(model_repository=served_repository, max_queue_images=MAX_QUEUE, max_files=MAX_QUEUE,
                        latency_slo_ms=60_000,
                        shadow_share=1.0, shadow_max_cost_share=1.0)
    apps: list = []
    with live_server(settings, apps=apps) as url:
        batcher = apps[0].state.service.models[MODEL].batcher
        target = url.removeprefix("http://")
        # the alert rules are loaded too: Prometheus must evaluate them without error
        with render.prometheus(target, tmp_path, rule_files=[ALERTS]) as api:
            render.wait_for_scrape(api)
            labelled = _health_traffic(url)
            before = (HEALTH_SINGLES + HEALTH_BATCHES, HEALTH_IMAGES)
            # two rounds, each scraped in full before going on: the first creates every series,
            # the second moves each of them between two of its samples, which is what rate()
            # (and a ratio of rates, which is NaN without an increase) needs
            for round_ in range(1, ROUNDS + 1):
                statuses = _traffic(url, exits, batcher)
                assert statuses.get("200") == IMAGES + 2 and statuses.get("503") == 1, statuses
                assert sum(n for s, n in statuses.items() if s.startswith("4")) == 3, statuses
                _wait_for_scrapes(api, target, round_, before)
            deadline_exits = _scalar(api, f'sum(exitserve_deadline_exits_total{{instance="{target}"}})')
            assert deadline_exits is not None and deadline_exits[1] == ROUNDS * DEADLINED, deadline_exits

            # the variables, through the label values API as Grafana's label_values() does
            values = {name: render.label_values(api, query)
                      for name, query in render.variable_queries(dashboard).items()}
            assert values == {"model": [MODEL], "instance": [target]}

            selections = {
                "chosen": {name: render.grafana_regex(v) for name, v in values.items()},
                "All": {name: render.grafana_regex("$__all") for name in values},
            }
            checked, no_data = [], []
            for selection, variables in selections.items():
                for title, expr in dashboard_targets():
                    query = render.substitute(expr, variables, rate_interval=RATE_INTERVAL, interval="15s",
                                              range_="5m")
                    assert "$" not in query, query
                    body = _query(api, query)
                    assert body.get("status") == "success", f"{title}: {query}: {body}"
                    result = body["data"]["result"]
                    if expr in NO_DATA_HERE:
                        no_data.append(expr)
                        continue
                    assert result and _finite(result), f"{title} ({selection}): no data for {query}: {result}"
                    checked.append(query)
            assert len(checked) == 2 * (len(dashboard_targets()) - len(NO_DATA_HERE))
            assert set(no_data) == set(NO_DATA_HERE), "an exemption names a query the dashboard no longer has"

            # the route panels show the v2 inference route beside the classify routes
            for title in ("Requests/s by route and status", "Request latency p50 / p95 / p99 by route"):
                expr = [e for t, e in dashboard_targets() if t == title][0]
                routes = {s["metric"].get("route") for s in
                          _query(api, render.substitute(expr, selections["All"], rate_interval=RATE_INTERVAL))
                          ["data"]["result"]}
                assert {"/classify", "/classify/batch", "/v2/models/{name}/infer"} <= routes, (title, routes)

            # a value or two that the traffic pins down
            budget = _query(api, render.substitute(
                [e for t, e in dashboard_targets() if t == "Mean cost per image vs budget"][1], selections["All"]))
            assert float(budget["data"]["result"][0]["value"][1]) == pytest.approx(settings.default_budget)
            shares = _query(api, render.substitute(
                [e for t, e in dashboard_targets() if t.startswith("Exit share")][0], selections["chosen"],
                range_="5m"))
            assert sum(float(s["value"][1]) for s in shares["data"]["result"]) == pytest.approx(1.0)

            # the Model health row: the thresholds drawn are the configured ones, the labelled
            # accuracy is the one the labels answer gave
            def health(title: str, index: int = 0) -> list[float]:
                expr = [e for t, e in dashboard_targets() if t == title][index]
                return [float(s["value"][1]) for s in _query(api, render.substitute(
                    expr, selections["All"], rate_interval=RATE_INTERVAL))["data"]["result"]]

            [estimated] = health("Estimated vs calibrated accuracy", 0)
            [calibrated] = health("Estimated vs calibrated accuracy", 1)
            assert 0 <= estimated <= 1 and 0 <= calibrated <= 1
            assert health("Estimated vs calibrated accuracy", 2) == pytest.approx(
                [calibrated - settings.alert_accuracy_drop])
            assert health("Estimated vs calibrated accuracy", 3) == pytest.approx([labelled["labelled_accuracy"]])
            assert health("Exit drift from calibration", 1) == pytest.approx([settings.alert_exit_drift])
            assert health("Shadow agreement with full depth", 1) == pytest.approx([settings.alert_shadow_agreement])
            [cost_share] = health("Shadow cost share")
            assert cost_share > 0  # images answered in the rounds were shadowed too

            # every alert expression parses, and the healthy server is not "not ready"
            rules = yaml.safe_load(ALERTS.read_text())
            for group in rules["groups"]:
                for rule in group["rules"]:
                    body = _query(api, rule["expr"])
                    assert body.get("status") == "success", f"{rule['alert']}: {body}"
                    if rule["alert"] == "ExitserveNotReady":
                        assert body["data"]["result"] == [], body
            deadline = time.monotonic() + 30
            while True:  # Prometheus loaded the rule file and evaluates every rule without error
                groups = httpx.get(f"{api}/api/v1/rules", timeout=10).json()["data"]["groups"]
                loaded = [r for g in groups for r in g["rules"]]
                if loaded and all(r.get("health") == "ok" for r in loaded):
                    break
                assert time.monotonic() < deadline, loaded
                time.sleep(0.5)
            assert {r["name"] for r in loaded} == {r["alert"] for g in rules["groups"] for r in g["rules"]}
