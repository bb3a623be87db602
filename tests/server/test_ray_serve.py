"""The Ray Serve deployment's pieces that need no cluster: replica sizing, deployment
options, the settings handed to replicas, the Serve config file, the metrics listener and
the list of metrics targets. (tests/deploy/test_ray_cluster.py runs the whole thing on a
real two-node cluster.)"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

pytest.importorskip("ray.serve", reason="the 'ray' extra is not installed")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from exitserve.errors import ExitserveError  # noqa: E402
from exitserve.server.deployments import ray_serve  # noqa: E402
from exitserve.server.deployments.ray_serve import (  # noqa: E402
    MetricsTargets,
    RayOptions,
    replica_intra_op_threads,
    settings_for_replicas,
)
from exitserve.server.settings import Settings  # noqa: E402

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve.yaml"


@pytest.mark.parametrize(("cpus", "threads"), [(0.5, 1), (1, 1), (2, 1), (4, 3), (8, 7)])
def test_replica_threads_follow_the_cpus_ray_gives_it(cpus: float, threads: int) -> None:
    assert replica_intra_op_threads(cpus) == threads


def test_fixed_replicas_or_autoscaling_and_the_drain_follows_the_settings() -> None:
    settings = Settings(shutdown_timeout_s=12)
    fixed = RayOptions(replicas=3, replica_cpus=2).deployment_options(settings)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["graceful_shutdown_timeout_s"] == 12
    scaled = RayOptions(replicas=2, max_replicas=6, target_ongoing_requests=4).deployment_options(settings)
    assert "num_replicas" not in scaled
    config = scaled["autoscaling_config"]
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (2, 6, 4)
    with pytest.raises(ValueError, match="below replicas") as refused:
        RayOptions(replicas=4, max_replicas=2).deployment_options(settings)
    assert isinstance(refused.value, ExitserveError)  # a user's mistake: the command prints it, no traceback


def test_replicas_get_every_setting_resolved_once_but_the_proxys_address() -> None:
    settings = Settings(model_repository=Path("/models"), default_budget=0.3, api_keys="a,b", port=9000)
    handed = settings_for_replicas(settings)
    assert "host" not in handed and "port" not in handed and "workers" not in handed
    again = Settings(**handed)
    assert again.model_repository == Path("/models") and again.default_budget == 0.3 and again.api_keys == ["a", "b"]


def test_workers_do_not_apply_under_ray() -> None:
    with pytest.raises(ValueError, match="replicas replace worker processes"):
        ray_serve.build(Settings(workers=2), RayOptions())


def test_the_serve_config_file_is_valid_and_its_builder_builds_it() -> None:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    [app] = schema.applications
    assert app.import_path == "exitserve.server.deployments.ray_serve:app_builder" and app.route_prefix == "/"
    assert [d.name for d in app.deployments] == [ray_serve.APP_NAME]  # the config's section meets the deployment
    module, _, name = app.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    deployment = bound(builder(app.args))
    assert deployment.name == ray_serve.APP_NAME
    assert deployment.func_or_class is ray_serve.ExitserveReplica.func_or_class
    # the builder's own options (RayOptions' defaults); the config's deployments section
    # overrides them when Serve deploys it (4 CPUs, autoscaling 2 to 8)
    assert deployment.num_replicas == 1 and deployment._deployment_config.autoscaling_config is None
    assert deployment.ray_actor_options == {"num_cpus": 1}
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (32, 256)
    # what each replica is built from: the config's settings, resolved once, and its metrics port
    handed, metrics_port = deployment.init_args
    assert metrics_port == app.args["ray"]["metrics_port"] == 9100
    assert handed["model_repository"] == "/models" and handed["default_budget"] == 0.25
    assert "ray" not in handed and "host" not in handed and "port" not in handed
    assert handed == settings_for_replicas(Settings(model_repository=Path("/models"), default_budget=0.25))


def bound(application: object) -> object:
    """The deployment a Serve application was bound from (``ray.serve.Application`` keeps it
    there for Serve's own build step; it has no public view of it)."""
    assert type(application).__name__ == "Application", application
    return application._bound_deployment  # type: ignore[attr-defined]


def test_the_cli_builds_its_replicas_and_options_into_the_application() -> None:
    settings = Settings(model_repository=Path("/models"), shutdown_timeout_s=12, default_budget=0.4, port=9000)
    fixed = bound(ray_serve.build(settings, RayOptions(replicas=3, replica_cpus=2, max_ongoing_requests=16,
                                                       metrics_port=9200)))
    assert fixed.name == ray_serve.APP_NAME
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    assert fixed.ray_actor_options == {"num_cpus": 2}
    assert fixed.max_ongoing_requests == 16 and fixed._deployment_config.graceful_shutdown_timeout_s == 12
    handed, metrics_port = fixed.init_args
    assert metrics_port == 9200 and Settings(**handed).default_budget == 0.4 and "port" not in handed

    scaled = bound(ray_serve.build(settings, RayOptions(replicas=2, max_replicas=6, target_ongoing_requests=4)))
    config = scaled._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (2, 6, 4)
    assert scaled.ray_actor_options == {"num_cpus": 1} and scaled.init_args[1] == 0


def test_the_metrics_listener_takes_the_next_free_port_of_its_range() -> None:
    registry = CollectorRegistry()
    Counter("exitserve_images_total", "Images classified.", ["model"], registry=registry).labels("m").inc(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        first = taken.getsockname()[1]
        if first + ray_serve.METRICS_PORTS > 65535:
            pytest.skip("the kernel gave a port at the top of the range")
        server = ray_serve.start_metrics_listener(registry, "127.0.0.1", first)
        try:
            port = server.server_port
            assert first < port < first + ray_serve.METRICS_PORTS
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert 'exitserve_images_total{model="m"} 3.0' in text
        finally:
            server.shutdown()
            server.server_close()


def group(replica: str, target: str) -> dict:
    return {"targets": [target], "labels": {"replica": replica, "node": "n"}}


def test_metrics_targets_list_registered_replicas_and_drop_those_ray_no_longer_lists() -> None:
    alive = {"SERVE_REPLICA::a", "SERVE_REPLICA::b", "SERVE_REPLICA::c"}
    targets = MetricsTargets(alive=lambda: alive)
    targets.register("SERVE_REPLICA::b", group("b", "10.0.0.2:9100"))
    targets.register("SERVE_REPLICA::a", group("a", "10.0.0.1:9100"))
    targets.register("SERVE_REPLICA::c", group("c", "10.0.0.3:9100"))
    assert targets.live() == [group("a", "10.0.0.1:9100"), group("b", "10.0.0.2:9100"), group("c", "10.0.0.3:9100")]
    targets.unregister("SERVE_REPLICA::c")  # stopped cleanly
    targets.unregister("SERVE_REPLICA::gone-before")  # never there, or unregistered twice: no error
    alive.discard("SERVE_REPLICA::b")  # lost with its node: it could not unregister
    assert targets.live() == [group("a", "10.0.0.1:9100")]
    alive.add("SERVE_REPLICA::b")  # the entry went with the replica; a new one registers anew
    assert targets.live() == [group("a", "10.0.0.1:9100")]
    targets.register("SERVE_REPLICA::a", group("a", "10.0.0.1:9101"))  # a replica re-registering replaces its entry
    assert targets.live() == [group("a", "10.0.0.1:9101")]
