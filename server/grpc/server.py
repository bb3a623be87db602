"""The gRPC listener: a ``grpc.aio`` server on the running event loop (uvicorn's), so gRPC
calls reach the same data plane, batchers and metrics as HTTP with no thread hop, started
and stopped by the app's lifespan (``server/http/app.py``).

* Limits: a message over ``max_body_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED),
  as HTTP refuses such a body with 413; images per request and pixels are the data plane's.
* Shutdown: while draining (after SIGTERM) ServerReady answers false and calls are still
  served; when the app stops, new calls are refused and those in flight get until the
  server's shutdown deadline (``EXITSERVE_SHUTDOWN_TIMEOUT_S``) before they are cancelled.
* Several workers (``--workers N``) each bind the port with SO_REUSEPORT and the kernel
  spreads the connections among them; a single process binds it alone, so a port already
  taken fails the start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from exitserve.server.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from exitserve.server.grpc.servicer import InferenceServicer
from exitserve.server.metrics import Metrics
from exitserve.server.service import InferenceService, StartupError
from exitserve.server.settings import Settings

log = logging.getLogger("exitserve")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def grpc_listener(service: InferenceService, settings: Settings, metrics: Metrics,
                        shared_port: bool = False) -> AsyncIterator[grpc.aio.Server]:
    """Serve the Open Inference Protocol over gRPC on ``settings.host``:``settings.grpc_port``
    until the context is left; ``shared_port``: other worker processes bind it too."""
    assert settings.grpc_port is not None
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", 1 if shared_port else 0),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service, settings, metrics), server)
    address = _address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        message = f"cannot serve gRPC on {address}: {exc}"
        log.error("%s", message)
        raise StartupError(message) from None
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    try:
        yield server
    finally:
        deadline = service.state.shutdown_deadline
        grace = settings.shutdown_timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
        await server.stop(grace)
