"""Process-wide settings, applied where a process starts serving (the uvicorn runner, each
worker, each Ray Serve replica), never inside an app: tests build many apps in one process."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from exitserve.server.settings import Settings


def configure_process(settings: Settings) -> None:
    # the inference thread needs the GIL back after every stage; by default the event loop
    # may keep it 5 ms, a stall per stage under load (BENCHMARKS.md, "GIL switch interval")
    sys.setswitchinterval(settings.switch_interval_us / 1e6)


@asynccontextmanager
async def freeze_heap_when_ready(app: Any) -> AsyncIterator[None]:
    """What is alive once the models are warm (sessions, manifests, modules) lives as long as
    the process: keep it out of the collector's full scans, which otherwise pause a request
    now and then. For ``create_app(while_ready=...)``."""
    gc.collect()
    gc.freeze()
    yield
