"""exitserve on Ray Serve: the same FastAPI app (every route, ``/metrics`` included) as the
replicas of one Serve deployment, spread over the nodes of a Ray cluster.

Imported only when Ray is used (``exitserve serve --ray ADDRESS``, or ``serve run
deploy/ray/serve.yaml``), so serving without Ray never imports ``ray``.

* Each replica builds the app with ``create_app`` and loads the model repository once (the
  path must exist on every node: a shared volume, or baked into the node image). Its ONNX
  Runtime threads are sized from the CPUs Ray gives it (``ray_actor_options.num_cpus``)
  with ``default_intra_op_threads``, unless ``EXITSERVE_INTRA_OP_THREADS`` says otherwise.
* A replica takes traffic only once warm: Serve routes to it after its ASGI lifespan
  startup, which here waits for the warm-up. Serve's health check asks the service what
  ``/readyz`` asks it, so a stalled model gets its replica replaced.
* Every response names the replica (``X-Exitserve-Replica``) and the Ray node
  (``X-Exitserve-Node``) that answered.
* Metrics: Serve's proxy sends ``/metrics`` to whichever replica it picks, so Prometheus
  scrapes each replica's own listener instead (the app's own registry, on the node's
  address). Every replica registers its listener in Ray's cluster key-value store, and any
  replica lists the live ones at ``GET /ray/metrics-targets``, in the format of
  Prometheus's HTTP service discovery (``deploy/ray/prometheus.yml``).
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

import ray
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, start_http_server
from pydantic import BaseModel, Field
from ray import serve
from ray.experimental import internal_kv
from ray.serve.config import AutoscalingConfig

from server.http.app import METRICS_TARGETS_PATH, create_app
from server.http.security import configure_logging
from server.settings import Settings, default_intra_op_threads

log = logging.getLogger("ray.serve")  # in a replica, Serve writes it to the replica's own log
cli_log = logging.getLogger("exitserve")

APP_NAME = "exitserve"
METRICS_PORTS = 64  # a fixed metrics_port means this range: several replicas can share a node
_KV_NAMESPACE = "exitserve"
_KV_PREFIX = "metrics-target/"


class RayOptions(BaseModel):
    """How the deployment runs on the cluster (the server's own settings are ``Settings``)."""

    replicas: int = Field(1, ge=1, description="replicas; with max_replicas, the fewest Serve's autoscaler keeps")
    max_replicas: int | None = Field(None, ge=1, description="set: autoscale between replicas and this")
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling: requests per replica to aim at")
    replica_cpus: float = Field(1, gt=0, description="CPUs Ray reserves per replica; its ONNX Runtime "
                                "threads follow")
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica holds at once (its batcher "
                                      "forms batches from them)")
    max_queued_requests: int = Field(256, ge=1, description="requests waiting for a replica beyond those; "
                                     "more get 503 at once")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    metrics_port: int = Field(0, ge=0, le=65535 - METRICS_PORTS, description="each replica's metrics listener: "
                              f"the first free port from this one (of {METRICS_PORTS}); 0: any free port")

    def deployment_options(self, settings: Settings) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            if self.max_replicas < self.replicas:
                raise ValueError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
            options["autoscaling_config"] = AutoscalingConfig(
                min_replicas=self.replicas, max_replicas=self.max_replicas,
                target_ongoing_requests=self.target_ongoing_requests)
        return options


def replica_intra_op_threads(cpus: float) -> int:
    """ONNX Runtime threads for a replica given ``cpus`` by Ray: the same rule as a worker
    process (its cores minus one for the event loop, at least one)."""
    return default_intra_op_threads(1, cores=max(1, int(cpus)))


def settings_for_replicas(settings: Settings) -> dict[str, Any]:
    """Every setting, resolved once where the deployment is made, so all replicas run the
    same ones whatever the environment of their node. Host and port are the proxy's."""
    return settings.model_dump(mode="json", exclude={"host", "port", "workers"})


@serve.deployment(name=APP_NAME)
@serve.ingress()
class ExitserveReplica:
    """One replica: exitserve's whole app on this replica's share of a node."""

    def __init__(self, settings: dict[str, Any], metrics_port: int = 0) -> None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        resolved = Settings(**settings)
        if resolved.intra_op_threads is None:
            resolved = resolved.model_copy(update={"intra_op_threads": replica_intra_op_threads(cpus)})
        self.settings = resolved
        self.replica = serve.get_replica_context().replica_id
        self.node = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.metrics_port = metrics_port
        log.info("exitserve replica %s on node %s (%s): %g CPUs, %d ONNX Runtime threads", self.replica.unique_id,
                 self.node, self.node_ip, cpus, self.settings.intra_op_threads)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve's proxy adds X-Request-ID itself, with the id it passed on in the request
        app = create_app(self.settings, identity={"x-exitserve-replica": self.replica.unique_id,
                                                  "x-exitserve-node": self.node}, request_id_header=False)
        app.include_router(metrics_targets_router())
        app.router.lifespan_context = self._serving_when_warm(app.router.lifespan_context)
        self._service = app.state.service
        return app

    def _serving_when_warm(self, inner: Callable) -> Callable:
        """The app's lifespan, whose startup also waits for the warm-up (Serve routes to a
        replica once its startup is done) and runs this replica's metrics listener."""

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with inner(app):
                await app.state.loading
                ready, body = app.state.service.readiness()
                if not ready:
                    raise RuntimeError(f"exitserve replica not ready after warm-up: {body}")
                server = start_metrics_listener(app.state.metrics.registry, self.node_ip, self.metrics_port)
                target = f"{self.node_ip}:{server.server_port}"
                key = _KV_PREFIX + self.replica.to_full_id_str()
                internal_kv._internal_kv_put(key, json.dumps({
                    "targets": [target], "labels": {"replica": self.replica.unique_id, "node": self.node}}),
                    namespace=_KV_NAMESPACE)
                log.info("metrics of replica %s on http://%s/metrics", self.replica.unique_id, target)
                try:
                    yield
                finally:
                    internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)
                    server.shutdown()
                    server.server_close()

        return lifespan

    def check_health(self) -> None:
        """Serve's periodic health check: the readiness ``/readyz`` reports."""
        ready, body = self._service.readiness()
        if not ready:
            raise RuntimeError(f"exitserve replica not ready: {body}")


def start_metrics_listener(registry: CollectorRegistry, addr: str, first_port: int) -> WSGIServer:
    """prometheus-client's exposition of ``registry`` in a thread, on the first free port from
    ``first_port`` (any free port when 0)."""
    ports = [0] if first_port == 0 else range(first_port, first_port + METRICS_PORTS)
    for port in ports:
        try:
            server, _ = start_http_server(port, addr=addr, registry=registry)
            return server
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no free metrics port in {first_port}-{first_port + METRICS_PORTS - 1}")


def live_metrics_targets() -> list[dict[str, Any]]:
    """Every live replica's metrics listener (Prometheus HTTP SD groups). A replica that
    stopped cleanly removed its entry; one lost with its node is dropped here, as Ray no
    longer lists its actor."""
    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    groups = []
    for key in internal_kv._internal_kv_list(_KV_PREFIX, namespace=_KV_NAMESPACE):
        name = key.decode()[len(_KV_PREFIX):]
        value = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
        if name in alive and value is not None:
            groups.append(json.loads(value))
        else:
            internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)
    return sorted(groups, key=lambda g: g["targets"])


def metrics_targets_router() -> APIRouter:
    router = APIRouter()

    @router.get(METRICS_TARGETS_PATH, summary="Prometheus HTTP service discovery: every replica's metrics listener")
    def metrics_targets() -> list[dict[str, Any]]:  # plain def: the key-value calls block, FastAPI threads them
        return live_metrics_targets()

    return router


def build(settings: Settings, options: RayOptions) -> serve.Application:
    """The Serve application: ``options.replicas`` (or autoscaled) replicas of the app."""
    if settings.workers > 1:
        raise ValueError("--workers does not apply under Ray: replicas replace worker processes")
    return ExitserveReplica.options(**options.deployment_options(settings)).bind(
        settings_for_replicas(settings), options.metrics_port)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For Serve config files (``import_path: server.http.ray_serve:app_builder``): ``args`` holds
    exitserve settings (``model_repository``, ...) and, under ``ray``, ``RayOptions`` fields.
    Replica counts and CPUs set in the config's ``deployments`` section win, as Serve does."""
    args = dict(args)
    options = RayOptions(**args.pop("ray", {}))
    return build(Settings(**args), options)


def run(address: str, settings: Settings, options: RayOptions, log_level: str = "info") -> int:
    """``exitserve serve --ray ADDRESS``: deploy to the cluster, wait until every replica
    is running and warm, then serve until SIGTERM or SIGINT, which deletes the application
    (Serve drains its replicas). Serve's proxy listens on ``settings.host:port``."""
    configure_logging(log_level, settings.log_format)
    application = build(settings, options)
    ray.init(address=address, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location=options.proxy_location,
                    http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except BaseException:
            serve.delete(APP_NAME)  # a failed deploy does not stay on the cluster
            raise
        replicas = (f"{options.replicas} replicas" if options.max_replicas is None
                    else f"{options.replicas} to {options.max_replicas} replicas")
        cli_log.info("exitserve on Ray Serve (%s): http://%s:%d", replicas, settings.host, settings.port)
        stop.wait()
        cli_log.info("stopping: deleting the application (Serve drains its replicas)")
        serve.delete(APP_NAME)
        return 0
    finally:
        ray.shutdown()
