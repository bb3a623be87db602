"""exitserve on Ray Serve: the same FastAPI app (every route, ``/metrics`` included) as the
replicas of one Serve deployment, spread over the nodes of a Ray cluster.

Imported only when Ray is used (``exitserve serve --ray ADDRESS``, or ``serve run
deploy/ray/serve.yaml``), so serving without Ray never imports ``ray``.

* Each replica builds the app with ``create_app`` and loads the model repository once (the
  path must exist on every node: a shared volume, or baked into the node image). Its ONNX
  Runtime threads are sized from the CPUs Ray gives it (``ray_actor_options.num_cpus``)
  with ``default_intra_op_threads``, unless ``EXITSERVE_INTRA_OP_THREADS`` says otherwise.
* A replica takes traffic only once warm: Serve routes to it after its ASGI lifespan
  startup, which here waits for the warm-up (``create_app(ready_before_startup=True)``).
  Serve's health check asks the service what ``/readyz`` asks it, so a stalled model gets
  its replica replaced.
* Every response names the replica (``X-Exitserve-Replica``) and the Ray node
  (``X-Exitserve-Node``) that answered.
* Metrics: Serve's proxy sends ``/metrics`` to whichever replica it picks, so Prometheus
  scrapes each replica's own listener instead (the app's own registry, on the node's
  address). Every warm replica registers its listener with one named, detached actor on
  the head node (``MetricsTargets``), and any replica lists the live ones at
  ``GET /ray/metrics-targets``, in the format of Prometheus's HTTP service discovery
  (``deploy/ray/prometheus.yml``). Only Ray's public actor API: no private key-value store.
"""

from __future__ import annotations

import errno
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
from ray.actor import ActorHandle
from ray.serve.config import AutoscalingConfig

from exitserve.errors import ConfigurationError, ExitserveError
from exitserve.server.http.app import METRICS_TARGETS_PATH, create_app
from exitserve.server.http.security import configure_logging
from exitserve.server.process import configure_process, freeze_heap_when_ready
from exitserve.server.settings import Settings, default_intra_op_threads

log = logging.getLogger("ray.serve")  # in a replica, Serve writes it to the replica's own log
cli_log = logging.getLogger("exitserve")

APP_NAME = "exitserve"
METRICS_PORTS = 64  # a fixed metrics_port means this range: several replicas can share a node
TARGETS_ACTOR = "metrics-targets"
TARGETS_NAMESPACE = "exitserve"
# the resource Ray gives the head node alone; Ray Train places its state actor with it too
HEAD_NODE = "node:__internal_head__"


class RayDeployError(ExitserveError, RuntimeError):
    """The cluster cannot be reached, or the application did not deploy on it."""


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
                raise ConfigurationError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
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


# ---------------------------------------------------------------------- metrics targets
def named_actors() -> set[str]:
    """The names of the named actors Ray still lists: a replica lost with its node is not."""
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}


class MetricsTargets:
    """Every warm replica's metrics listener, keyed by the replica's actor name: the state of
    one detached actor (``metrics_targets()``), so any replica can list them all."""

    def __init__(self, alive: Callable[[], set[str]] = named_actors) -> None:
        self._groups: dict[str, dict[str, Any]] = {}
        self._alive = alive

    def register(self, replica: str, group: dict[str, Any]) -> None:
        self._groups[replica] = group

    def unregister(self, replica: str) -> None:
        self._groups.pop(replica, None)

    def live(self) -> list[dict[str, Any]]:
        """The Prometheus HTTP SD groups of the replicas Ray still lists. A replica that
        stopped cleanly unregistered; one lost with its node could not, and is dropped here."""
        alive = self._alive()
        for replica in [r for r in self._groups if r not in alive]:
            del self._groups[replica]
        return sorted(self._groups.values(), key=lambda g: g["targets"])


_MetricsTargetsActor = ray.remote(MetricsTargets)


def metrics_targets() -> ActorHandle:
    """The cluster's one ``MetricsTargets`` actor, made by whichever replica asks first.
    Detached, so it outlives the replica that made it (and the application: the next
    deployment finds it, empty); on the head node, so losing a worker node does not lose it
    (the head's loss ends the cluster anyway); no CPU of its own."""
    return _MetricsTargetsActor.options(
        name=TARGETS_ACTOR, namespace=TARGETS_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, resources={HEAD_NODE: 0.001},
        scheduling_strategy="DEFAULT",  # never inside a replica's placement group
    ).remote()


def metrics_targets_router(targets: ActorHandle) -> APIRouter:
    router = APIRouter()

    @router.get(METRICS_TARGETS_PATH, summary="Prometheus HTTP service discovery: every replica's metrics listener")
    async def list_metrics_targets() -> list[dict[str, Any]]:
        return await targets.live.remote()

    return router


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


# ---------------------------------------------------------------------- the deployment
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
        configure_process(resolved)  # the replica's process is this one: switches set once, here
        self.replica = serve.get_replica_context().replica_id
        self.node = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.metrics_port = metrics_port
        self.targets = metrics_targets()
        log.info("exitserve replica %s on node %s (%s): %g CPUs, %d ONNX Runtime threads", self.replica.unique_id,
                 self.node, self.node_ip, cpus, self.settings.intra_op_threads)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve's proxy adds X-Request-ID itself, with the id it passed on in the request;
        # Serve routes to a replica once its startup is done, so startup waits for the warm-up
        app = create_app(self.settings, identity={"x-exitserve-replica": self.replica.unique_id,
                                                  "x-exitserve-node": self.node},
                         request_id_header=False, routers=[metrics_targets_router(self.targets)],
                         ready_before_startup=True, while_ready=self._while_ready)
        self._service = app.state.service
        return app

    @asynccontextmanager
    async def _while_ready(self, app: FastAPI) -> AsyncIterator[None]:
        """Warm until shutdown: the metrics listener, listed; the heap frozen last, once
        everything long-lived exists."""
        async with self._listed_metrics(app), freeze_heap_when_ready(app):
            yield

    @asynccontextmanager
    async def _listed_metrics(self, app: FastAPI) -> AsyncIterator[None]:
        """This replica's metrics listener on its node, registered with ``MetricsTargets``
        under the replica's actor name (how ``live()`` tells it is still there)."""
        server = start_metrics_listener(app.state.metrics.registry, self.node_ip, self.metrics_port)
        target = f"{self.node_ip}:{server.server_port}"
        name = self.replica.to_full_id_str()
        try:
            await self.targets.register.remote(name, {
                "targets": [target], "labels": {"replica": self.replica.unique_id, "node": self.node}})
            log.info("metrics of replica %s on http://%s/metrics", self.replica.unique_id, target)
            try:
                yield
            finally:
                await self.targets.unregister.remote(name)
        finally:
            server.shutdown()
            server.server_close()

    def check_health(self) -> None:
        """Serve's periodic health check: the readiness ``/readyz`` reports."""
        ready, body = self._service.readiness()
        if not ready:
            raise RuntimeError(f"exitserve replica not ready: {body}")


def build(settings: Settings, options: RayOptions) -> serve.Application:
    """The Serve application: ``options.replicas`` (or autoscaled) replicas of the app."""
    if settings.workers > 1:
        raise ConfigurationError("--workers does not apply under Ray: replicas replace worker processes")
    return ExitserveReplica.options(**options.deployment_options(settings)).bind(
        settings_for_replicas(settings), options.metrics_port)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For Serve config files (``import_path: exitserve.server.deployments.ray_serve:app_builder``): ``args`` holds
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
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:  # "auto" with no cluster running here
        raise RayDeployError(f"cannot reach a Ray cluster at {address}: {exc}") from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location=options.proxy_location,
                    http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except BaseException as exc:
            serve.delete(APP_NAME)  # a failed deploy does not stay on the cluster
            if isinstance(exc, RuntimeError):  # Serve's "Deploying application ... failed: <why>"
                raise RayDeployError(str(exc)) from exc
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
