"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.routes.deps import Service

router = APIRouter()


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: every stage session loaded and warmed up, not draining")
async def readyz(service: Service) -> JSONResponse:
    if service.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not service.ready:
        body = {"status": "error" if service.load_error else "loading", "detail": service.load_error}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "models": sorted(service.engines)})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
