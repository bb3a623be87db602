"""Dynamic batching: concurrent single-image requests are grouped into one engine call.

A batch takes every image queued while the previous batch ran (up to
``max_batch_size``), optionally waiting ``max_queue_delay`` for more. Inference runs on the model's one worker thread (off the
event loop; ONNX Runtime releases the GIL). The queue is bounded in images: a full queue
refuses at once (``Overloaded``) instead of piling up. A batch that fails fails its own
requests; the loop goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.engine import EngineRun, ModelEngine
from server.errors import Overloaded
from server.policy import ExitResult

BatchObserver = Callable[[str, int, dict[int, float]], None]  # model, images, per-stage ms


@dataclass
class Pending:
    image: np.ndarray  # C x H x W normalized
    thresholds: np.ndarray  # K
    deadline: float  # absolute perf_counter seconds, inf when none
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchOutcome:
    result: ExitResult
    queue_ms: float
    inference_ms: float
    batch_size: int


class DynamicBatcher:
    def __init__(
        self,
        engine: ModelEngine,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_images: int,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000
        self.max_queue_images = max_queue_images
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{engine.name}")
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.pending_images = 0  # queued + running, single images and whole jobs
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.engine.name}")

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _reserve(self, images: int) -> None:
        if self.pending_images + images > self.max_queue_images:
            raise Overloaded(f"{self.pending_images} images are queued for {self.engine.name}")
        self.pending_images += images

    async def submit(self, image: np.ndarray, thresholds: np.ndarray, deadline: float) -> BatchOutcome:
        self._reserve(1)
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Pending(image, thresholds, deadline, future))
        return await future

    async def run_job(self, images: int, fn: Callable[[], EngineRun]) -> list[ExitResult]:
        """Run a whole job (the batch endpoint) on the model's worker thread, in turn."""
        self._reserve(images)
        try:
            run = await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        finally:
            self.pending_images -= images
        self._report(images, run)
        return run.results

    def _report(self, images: int, run: EngineRun) -> None:
        if self.on_batch:
            self.on_batch(self.engine.name, images, run.stage_ms)

    async def _collect(self) -> list[Pending]:
        """Everything already queued, then (if ``max_queue_delay`` > 0) what arrives
        before the first image has waited that long. With delay 0 a lone request runs
        at once, and under load batches form from what queued during the last run."""
        batch = [await self.queue.get()]
        closes = batch[0].enqueued + self.max_delay
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = closes - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.done()]  # the client may have gone
            self.pending_images -= len(batch) - len(live)
            if not live:
                continue
            started = time.perf_counter()
            try:
                images = np.stack([p.image for p in live])
                thresholds = np.stack([p.thresholds for p in live])
                deadlines = np.array([p.deadline for p in live])
                run = await loop.run_in_executor(self.executor, self.engine.run_thresholds, images, thresholds,
                                                 deadlines)
                if len(run.results) != len(live):
                    raise RuntimeError(f"the engine answered {len(run.results)} images of {len(live)}")
            except Exception as exc:  # a failed batch fails its own requests, not the server
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                self._report(len(live), run)
                inference_ms = (time.perf_counter() - started) * 1000
                for p, result in zip(live, run.results):
                    if not p.future.done():
                        p.future.set_result(
                            BatchOutcome(result, (started - p.enqueued) * 1000, inference_ms, len(live))
                        )
            finally:
                self.pending_images -= len(live)
