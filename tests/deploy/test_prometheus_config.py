"""The Prometheus config, its alert rules and their unit tests pass promtool, and the
compose file, the Prometheus scrape config and the Grafana provisioning agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
COMPOSE = ROOT / "docker-compose.yml"
PROMTOOL = shutil.which("promtool")

# Host paths compose mounts that a checkout does not hold, and why.
BUILT_BEFORE_COMPOSE = {
    "./model_repository": "built by scripts/build_repository.sh before `docker compose up` (see the compose header)",
}

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) not installed")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_config() -> None:
    # rule_files resolve relative to the config file: alerts.yml is checked too
    done = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alerts.yml" in done.stdout + done.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    done = promtool("test", "rules", str(PROM_DIR / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


EXPECTED_ALERTS = {"ExitserveHighP99Latency", "ExitserveSustained503s", "ExitserveServerErrors",
                   "ExitserveCostAboveBudget", "ExitserveNotReady",
                   # model health without labels (issue 25)
                   "ExitserveAccuracyEstimateDrop", "ExitserveExitDrift", "ExitserveShadowDisagreement"}


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == EXPECTED_ALERTS
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == alerts, f"no firing case for {alerts - fires}"
    assert quiet == alerts, f"no quiet case for {alerts - quiet}"


# ------------------------------------------------------------------ compose consistency
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (host path, mode) of a service's short-syntax bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long-syntax volume not understood here: {volume}"
        host, container, *mode = volume.split(":")
        out[container] = (host, mode[0] if mode else "rw")
    return out


def published(service: dict) -> dict[int, int]:
    """Container port -> host port."""
    out = {}
    for port in service.get("ports", []):
        parts = str(port).split("/")[0].split(":")  # [ip:]host:container[/proto], or container
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def host_file(host: str) -> Path:
    return (COMPOSE.parent / host).resolve()


def container_file(service: dict, path: str) -> Path:
    """The checkout file a path inside the container is mounted from (a file mount, or a
    file under a mounted folder)."""
    wanted = PurePosixPath(path)
    for container, (host, _) in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        c = PurePosixPath(container)
        if wanted == c or c in wanted.parents:
            return host_file(host) / wanted.relative_to(c)
    raise AssertionError(f"{path} is not mounted into the container")


def test_compose_services() -> None:
    services = compose()["services"]
    assert {"exitserve", "prometheus", "grafana"} <= set(services)
    assert published(services["exitserve"]) == {8000: 8000}
    assert published(services["prometheus"]) == {9090: 9090}
    assert published(services["grafana"]) == {3000: 3000}


def test_every_bind_mounted_host_path_exists() -> None:
    for name, service in compose()["services"].items():
        for container, (host, mode) in mounts(service).items():
            if host in BUILT_BEFORE_COMPOSE:
                continue
            assert host.startswith("."), f"{name}: {host} is a named volume or absolute path"
            assert host_file(host).exists(), f"{name}: {host} (mounted at {container}) does not exist"
            assert mode == "ro", f"{name}: {host} should be mounted read-only"


def test_prometheus_container_loads_the_repo_config_and_rules() -> None:
    service = compose()["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in service["command"] if "=" in arg)
    config_path = flags["--config.file"]
    assert container_file(service, config_path) == (PROM_DIR / "prometheus.yml").resolve()
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["rule_files"], "no rule_files in prometheus.yml"
    loaded = set()
    for rule_file in config["rule_files"]:
        inside = PurePosixPath(config_path).parent / rule_file  # relative to the config file
        loaded.add(container_file(service, str(inside)))
        assert (PROM_DIR / rule_file).resolve() in loaded, f"{rule_file} is not mounted from deploy/prometheus/"
    assert (PROM_DIR / "alerts.yml").resolve() in loaded
    assert "--web.listen-address" not in flags  # so it listens on 9090, which compose publishes


def test_scrape_targets_are_compose_services_and_ports() -> None:
    services = compose()["services"]
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "exitserve" in jobs  # the alert rules select job="exitserve"
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services, f"scrape target {target}: no compose service {host}"
                assert int(port) in published(services[host]), f"{target}: {host} does not serve port {port}"
    rules = (PROM_DIR / "alerts.yml").read_text()
    assert set(re.findall(r'job="([^"]+)"', rules)) == {"exitserve"}


def test_grafana_provisioning_points_at_what_compose_mounts_and_serves() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    assert container_file(grafana, "/etc/grafana/provisioning") == (GRAFANA_DIR / "provisioning").resolve()

    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    url = re.fullmatch(r"http://([\w.-]+):(\d+)/?", source["url"])
    assert url, source["url"]
    assert url.group(1) in services and int(url.group(2)) in published(services[url.group(1)])

    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "exitserve.yml").read_text())
    for provider in providers["providers"]:
        folder = container_file(grafana, provider["options"]["path"])
        assert folder == (GRAFANA_DIR / "dashboards").resolve()
        assert (folder / "exitserve.json").is_file()

    # every datasource the dashboard names is the provisioned one
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "exitserve.json").read_text())
    named = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                named.append(node["datasource"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    assert named
    assert all(d == {"type": "prometheus", "uid": source["uid"]} for d in named), named


@needs_promtool
def test_promtool_check_the_ray_scrape_config() -> None:
    """deploy/ray/prometheus.yml: the replicas found through /ray/metrics-targets, the same
    alert rules and job name."""
    config_file = ROOT / "deploy" / "ray" / "prometheus.yml"
    done = promtool("check", "config", str(config_file))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(config_file.read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "exitserve"
    [sd] = job["http_sd_configs"]
    assert sd["url"].endswith("/ray/metrics-targets")
    assert (config_file.parent / config["rule_files"][0]).resolve() == (PROM_DIR / "alerts.yml").resolve()
