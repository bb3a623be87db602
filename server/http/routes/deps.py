"""FastAPI dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from exitserve.server.service import InferenceService
from exitserve.server.settings import Settings


# async: FastAPI runs plain ``def`` dependencies in its thread pool, a thread hop per request


async def get_service(request: Request) -> InferenceService:
    return request.app.state.service


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


Service = Annotated[InferenceService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]
