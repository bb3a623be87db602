"""deploy/kubernetes/: the core kinds validate against the Kubernetes API's own schemas
(kubernetes-validate, strict, for the version below), and every resource agrees with the
image (Dockerfile EXPOSE, CMD, USER), the server (routes, settings, metrics) and the
other resources (selectors, ports, the HPA's metric and the adapter rule, KServe's runtime
and InferenceService)."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import exitserve
from exitserve.cli import build_parser
from exitserve.repository.format import MANIFEST_FORMAT_VERSION
from exitserve.server.http.app import create_app
from exitserve.server.metrics import Metrics
from exitserve.server.settings import Settings, default_intra_op_threads
from tests.test_container import DOCKERFILE, stages

KUBERNETES_VERSION = "1.33.0"  # the version the manifests are written for (README, "Scaling out")
ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
CORE_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"}
CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}  # CRDs: checked structurally here
IMAGE = f"exitserve:{exitserve.__version__}"


def manifests() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(KUBE.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def resource(kind: str) -> dict:
    [doc] = [d for _, d in manifests() if d["kind"] == kind]
    return doc


def runtime_image() -> dict[str, object]:
    """The Dockerfile's runtime stage: its EXPOSEd ports (HTTP first, then gRPC), CMD argv and
    USER id."""
    runtime = dict((k, a) for k, a in stages(DOCKERFILE.read_text())["runtime"])
    http, grpc = (int(p) for p in runtime["EXPOSE"].split())
    return {"port": http, "grpc_port": grpc, "cmd": yaml.safe_load(runtime["CMD"]),
            "uid": int(runtime["USER"].split(":")[0])}


def app_routes() -> set[str]:
    """Every path the app serves (its OpenAPI document lists them all)."""
    return set(create_app(Settings()).openapi()["paths"])


def settings_from(env: list[dict]) -> Settings:
    """The server's settings under a container's env (every name must be a setting)."""
    values = {}
    for item in env:
        name = item["name"]
        assert name.startswith("EXITSERVE_"), name
        field = name.removeprefix("EXITSERVE_").lower()
        assert field in Settings.model_fields, f"{name} is not a server setting"
        values[field] = item["value"]
    return Settings(**values)


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("path,doc", [(p, d) for p, d in manifests() if d["kind"] in CORE_KINDS],
                         ids=lambda v: v.name if isinstance(v, Path) else v["kind"])
def test_core_kinds_validate_against_the_kubernetes_schemas(path: Path, doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validation_catches_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = resource("Deployment")
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


def test_every_kind_is_checked_and_kustomize_applies_every_plain_manifest() -> None:
    kinds = {d["kind"] for _, d in manifests()}
    assert kinds == CORE_KINDS | CUSTOM_KINDS, kinds
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    plain = {p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == plain


# ------------------------------------------------------------------ plain Kubernetes
def test_the_deployment_runs_the_image_as_the_dockerfile_builds_it() -> None:
    image = runtime_image()
    pod = resource("Deployment")["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == IMAGE
    assert "command" not in container and "args" not in container  # the image's CMD
    cmd = image["cmd"]
    assert cmd[:2] == ["exitserve", "serve"]
    served = build_parser().parse_args(cmd[1:])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == image["port"] == served.port
    # gRPC: the port the server is told to serve it on (EXITSERVE_GRPC_PORT), and no other
    assert set(ports) == {"http", "grpc"}
    assert ports["grpc"] == image["grpc_port"] == settings_from(container["env"]).grpc_port
    assert pod["spec"]["securityContext"]["runAsUser"] == image["uid"]
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == image["port"] and annotations["prometheus.io/path"] == "/metrics"


def test_the_deployments_probes_threads_and_shutdown_fit_the_server() -> None:
    pod = resource("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    routes = app_routes()
    port_names = {p["name"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] in port_names
    settings = settings_from(container["env"])
    # ONNX Runtime: the pod's CPUs (not the node's, which os.cpu_count() would see) minus one
    requested = cpus(container["resources"]["requests"]["cpu"])
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"]
    assert settings.intra_op_threads == default_intra_op_threads(settings.workers, cores=int(requested))
    # SIGTERM comes after preStop; then the drain grace and the shutdown timeout must fit
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = float(command[1]) + settings.drain_grace_s + settings.shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] > needed


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = resource("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {p["name"] for p in container["ports"]} == {"http", "grpc"}
    for name, port in ports.items():
        assert port["targetPort"] == name
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"  # gRPC is HTTP/2 without TLS: meshes must know
    pdb = resource("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = resource("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # the budget leaves a pod serving while another is disrupted
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1
    assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"]


def test_the_hpa_scales_on_the_servers_queue_through_the_adapter_rule_with_cpu_as_fallback() -> None:
    hpa = resource("HorizontalPodAutoscaler")
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(by_type) == {"Pods", "Resource"}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    wanted = by_type["Pods"]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(resource("ConfigMap")["data"]["config.yaml"])
    [rule] = [r for r in adapter["rules"] if r["name"]["as"] == wanted]
    series = rule["seriesQuery"].split("{")[0].strip("'\" ")
    exported = {m.name: m.type for m in Metrics().registry.collect()}
    assert exported.get(series) == "gauge", f"{series} is not a gauge the server exports"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_servicemonitor_scrapes_the_service_as_job_exitserve() -> None:
    monitor = resource("ServiceMonitor")
    service = resource("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in app_routes()
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "exitserve"  # alerts.yml's job


# ------------------------------------------------------------------ KServe
def test_the_kserve_runtime_serves_the_image_with_the_protocol_the_service_asks_for() -> None:
    runtime = resource("ServingRuntime")
    service = resource("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["modelFormat"]["version"] == str(MANIFEST_FORMAT_VERSION)
    assert "v2" in runtime["spec"]["protocolVersions"] and model["protocolVersion"] in runtime["spec"]["protocolVersions"]

    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"] == IMAGE
    argv = [*container["command"], *container["args"]]
    assert argv[:2] == runtime_image()["cmd"][:2]
    served = build_parser().parse_args(argv[1:])
    assert served.model_repository == "/mnt/models"  # where KServe's storage initializer puts storageUri
    [port] = container["ports"]  # KServe routes one port: an InferenceService for grpc-v2 names the gRPC one
    assert port["containerPort"] == served.port == runtime_image()["port"]
    assert int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"]) == served.port
    routes = app_routes()
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] in routes and probe["port"] == served.port
    settings = settings_from(container["env"])
    assert settings.intra_op_threads == default_intra_op_threads(1, cores=int(cpus(container["resources"]["requests"]["cpu"])))
    # grpc-v2 is declared exactly when the container serves gRPC, on a port of its own
    assert ("grpc-v2" in runtime["spec"]["protocolVersions"]) == (settings.grpc_port is not None)
    assert settings.grpc_port not in (None, served.port)
    needed = settings.drain_grace_s + settings.shutdown_timeout_s
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > needed


def test_the_readme_names_the_validated_kubernetes_version() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"Kubernetes {KUBERNETES_VERSION.rsplit('.', 1)[0]}" in readme
    assert "deploy/kubernetes" in readme
