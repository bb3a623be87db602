"""Dynamic batching: concurrent single-image requests are grouped into one engine call.

A batch takes every image queued while the previous batch ran (up to
``max_batch_size``), optionally waiting ``max_queue_delay`` for more. Inference runs on
the model's one worker thread (off the event loop; ONNX Runtime releases the GIL).

The queue is bounded in *waiting* images: images already running do not count, and a
request can be refused before its body is read (``check_admission``), so refusing costs
almost nothing. A batch that fails fails its own requests (``InferenceFailed``), is
logged once with their request ids and counted; the loop goes on. ``stalled_for`` tells
the readiness check when work waits and nothing finishes.

Every time here (enqueued, the delay window, the stall watch) comes from one ``clock``,
``time.perf_counter`` unless a test injects a fake one, as the policy and the objective take.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from exitserve.server.engine import EngineRun, ModelEngine
from exitserve.server.errors import InferenceFailed, Overloaded
from exitserve.server.policy import ExitResult
from exitserve.server.request_context import current_request_id

log = logging.getLogger(__name__)

BatchObserver = Callable[[str, int, dict[int, float]], None]  # model, images, per-stage ms
ModelObserver = Callable[[str], None]  # model
Clock = Callable[[], float]  # seconds


@dataclass
class Pending:
    image: np.ndarray  # C x H x W normalized
    thresholds: np.ndarray  # K
    deadline: float  # absolute perf_counter seconds, inf when none
    future: asyncio.Future
    enqueued: float  # the batcher's clock, seconds
    request_id: str | None = None


@dataclass
class BatchOutcome:
    result: ExitResult
    queue_ms: float
    inference_ms: float  # the batch's run, from the loop's side: the stages and both thread hops
    batch_size: int
    stage_ms: dict[int, float] = field(default_factory=dict)  # each stage's wall time in that batch
    finished: float = 0.0  # the batcher's clock when the loop had the batch's answers


class DynamicBatcher:
    def __init__(
        self,
        engine: ModelEngine,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_images: int,
        on_batch: BatchObserver | None = None,
        on_failure: ModelObserver | None = None,
        on_reject: ModelObserver | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000
        self.max_queue_images = max_queue_images
        self.on_batch = on_batch
        self.on_failure = on_failure
        self.on_reject = on_reject
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{engine.name}")
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.waiting_images = 0  # admitted, not yet running (single images and whole jobs)
        self.running_images = 0
        self.failures = 0
        self.last_progress = clock()  # a batch or job finished, or work arrived to an idle model
        self._counts = threading.Lock()  # jobs start on the worker thread
        self._worker: asyncio.Task | None = None

    @property
    def pending_images(self) -> int:
        """Waiting plus running."""
        return self.waiting_images + self.running_images

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.engine.name}")

    async def stop(self, wait: bool = True) -> None:
        """Stop the loop; ``wait=False`` abandons a stage still running on the worker."""
        if self._worker:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=wait, cancel_futures=True)

    # ------------------------------------------------------------------ admission
    def check_admission(self, images: int) -> None:
        """Refuse at once when ``images`` more would not fit among the waiting ones."""
        if self.waiting_images + images > self.max_queue_images:
            if self.on_reject:
                self.on_reject(self.engine.name)
            raise Overloaded(f"{self.waiting_images} images are waiting for {self.engine.name} "
                             f"(at most {self.max_queue_images})")

    def _admit(self, images: int) -> None:
        self.check_admission(images)
        with self._counts:
            if self.pending_images == 0:
                self.last_progress = self.clock()  # idle until now: not a stall
            self.waiting_images += images

    def _move_to_running(self, images: int) -> None:
        with self._counts:
            self.waiting_images -= images
            self.running_images += images

    def _finish(self, images: int, running: bool = True) -> None:
        with self._counts:
            if running:
                self.running_images -= images
            else:
                self.waiting_images -= images
            self.last_progress = self.clock()

    def stalled_for(self) -> float:
        """Seconds the model has had work without finishing any (0 when idle or moving);
        infinite when the loop itself has died."""
        if self._worker is not None and self._worker.done():
            return float("inf")
        if self.pending_images == 0:
            return 0.0
        return self.clock() - self.last_progress

    # ------------------------------------------------------------------ work
    async def submit(self, image: np.ndarray, thresholds: np.ndarray, deadline: float) -> BatchOutcome:
        self._admit(1)
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Pending(image, thresholds, deadline, future, self.clock(), current_request_id()))
        return await future

    async def run_job(self, images: int, fn: Callable[[], EngineRun]) -> list[ExitResult]:
        """Run a whole job (the batch endpoint) on the model's worker thread, in turn."""
        self._admit(images)
        started = False

        def job() -> EngineRun:
            nonlocal started
            started = True
            self._move_to_running(images)
            return fn()

        request_id = current_request_id()
        try:
            run = await asyncio.get_running_loop().run_in_executor(self.executor, job)
        except Exception as exc:
            self._failed(exc, [request_id])
            raise InferenceFailed(self._failure_detail(request_id)) from exc
        finally:
            self._finish(images, running=started)
        self._report(images, run)
        return run.results

    def _report(self, images: int, run: EngineRun) -> None:
        if self.on_batch:
            self.on_batch(self.engine.name, images, run.stage_ms)

    def _failed(self, exc: BaseException, request_ids: list[str | None]) -> None:
        """Log once (with the traceback and every request id involved) and count."""
        self.failures += 1
        ids = ", ".join(r for r in request_ids if r) or "none"
        log.error("inference failed for %s on %d images (request ids: %s)", self.engine.name, len(request_ids), ids,
                  exc_info=exc)
        if self.on_failure:
            self.on_failure(self.engine.name)

    def _failure_detail(self, request_id: str | None) -> str:
        where = f" (request id {request_id})" if request_id else ""
        return f"{self.engine.name} failed on the batch holding this request; the server log has the cause{where}"

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
            remaining = closes - self.clock()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.done()]  # the client may have gone
            if len(batch) > len(live):
                self._finish(len(batch) - len(live), running=False)
            if not live:
                continue
            self._move_to_running(len(live))
            try:
                await self._run(live)
            except Exception as exc:  # a failed batch fails its own requests, not the server
                self._failed(exc, [p.request_id for p in live])
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(InferenceFailed(self._failure_detail(p.request_id)))
            finally:
                self._finish(len(live))

    async def _run(self, live: list[Pending]) -> None:
        started = self.clock()
        images = np.stack([p.image for p in live])
        thresholds = np.stack([p.thresholds for p in live])
        deadlines = np.array([p.deadline for p in live])
        run = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.engine.run_thresholds, images, thresholds, deadlines)
        if len(run.results) != len(live):
            raise RuntimeError(f"the engine answered {len(run.results)} images of {len(live)}")
        finished = self.clock()
        self._report(len(live), run)
        inference_ms = (finished - started) * 1000
        for p, result in zip(live, run.results):
            if not p.future.done():
                p.future.set_result(BatchOutcome(result, (started - p.enqueued) * 1000, inference_ms, len(live),
                                                 run.stage_ms, finished))
