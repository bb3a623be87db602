"""Dynamic batching: concurrent single-image requests are grouped into one engine call.

A batch takes every image queued while the previous batch ran (up to
``max_batch_size``), optionally waiting ``max_queue_delay`` for more. Inference runs on
the model's own thread, which takes the next batch itself the moment a run ends: the
event loop only appends work and receives answers, so the engine does not wait for the
loop to hand it the next batch (ONNX Runtime releases the GIL while a stage runs).

The queue is bounded in *waiting* images: images already running do not count, and a
request can be refused before its body is read (``check_admission``), so refusing costs
almost nothing. A batch that fails fails its own requests (``InferenceFailed``), is
logged once with their request ids and counted; the thread goes on. ``stalled_for`` tells
the readiness check when work waits and nothing finishes.

Every time here (enqueued, the delay window, the stall watch) comes from one ``clock``,
``time.perf_counter`` unless a test injects a fake one, as the policy and the objective take.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exitserve.server.engine import EngineRun, ModelEngine
from exitserve.server.errors import InferenceFailed, Overloaded, TooManyImages
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
class Job:
    """A whole request run as one engine call (the batch endpoint), in turn with the batches."""

    images: int
    fn: Callable[[], EngineRun]
    future: asyncio.Future
    request_id: str | None = None


@dataclass
class BatchOutcome:
    result: ExitResult
    queue_ms: float
    inference_ms: float  # from the batch's start until the loop had its answers
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
        self.waiting_images = 0  # admitted, not yet running (single images and whole jobs)
        self.running_images = 0
        self.failures = 0
        self.last_progress = clock()  # a batch or job finished, or work arrived to an idle model
        self._counts = threading.Lock()  # the engine thread moves work along
        self._work: deque[Pending | Job] = deque()  # appended by the loop, taken by the engine thread
        self._wakeup = threading.Condition()  # guards _work and _stopping
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pending_images(self) -> int:
        """Waiting plus running."""
        return self.waiting_images + self.running_images

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name=f"infer-{self.engine.name}", daemon=True)
        self._thread.start()

    async def stop(self, wait: bool = True) -> None:
        """Stop the engine thread; ``wait=False`` abandons a stage still running on it.
        Work that never ran is cancelled."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
            never_ran = list(self._work)
            self._work.clear()
        for item in never_ran:
            item.future.cancel()
        if wait and self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ admission
    def check_admission(self, images: int) -> None:
        """Refuse at once when ``images`` more would not fit among the waiting ones: 503
        (``Overloaded``) when they would fit an emptier queue, 413 (``TooManyImages``) when
        they never can."""
        if images > self.max_queue_images:
            raise TooManyImages(f"{images} images in one request; {self.engine.name} queues at most "
                                f"{self.max_queue_images}: send them in requests of at most that many")
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
        infinite when the engine thread itself has died."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return float("inf")
        if self.pending_images == 0:
            return 0.0
        return self.clock() - self.last_progress

    # ------------------------------------------------------------------ the loop's side
    async def submit(self, image: np.ndarray, thresholds: np.ndarray, deadline: float) -> BatchOutcome:
        self._admit(1)
        future = asyncio.get_running_loop().create_future()
        self._enqueue(Pending(image, thresholds, deadline, future, self.clock(), current_request_id()))
        return await future

    async def run_job(self, images: int, fn: Callable[[], EngineRun]) -> list[ExitResult]:
        """Run a whole job (the batch endpoint) on the engine thread, in turn."""
        self._admit(images)
        future = asyncio.get_running_loop().create_future()
        self._enqueue(Job(images, fn, future, current_request_id()))
        return await future

    def _enqueue(self, item: Pending | Job) -> None:
        with self._wakeup:
            self._work.append(item)
            self._wakeup.notify()

    def _fail(self, futures: list[asyncio.Future], errors: list[InferenceFailed]) -> None:
        for future, error in zip(futures, errors):
            if not future.done():
                future.set_exception(error)

    def _report(self, images: int, stage_ms: dict[int, float]) -> None:
        if self.on_batch:
            self.on_batch(self.engine.name, images, stage_ms)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the event loop (from the engine thread); a closed loop has no one to tell."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def _failed(self, exc: BaseException, request_ids: list[str | None]) -> None:
        """Log once (with the traceback and every request id involved) and count."""
        self.failures += 1
        ids = ", ".join(r for r in request_ids if r) or "none"
        log.error("inference failed for %s on %d images (request ids: %s)", self.engine.name, len(request_ids), ids,
                  exc_info=exc)
        if self.on_failure:
            self._to_loop(self.on_failure, self.engine.name)

    def _failure_detail(self, request_id: str | None) -> str:
        where = f" (request id {request_id})" if request_id else ""
        return f"{self.engine.name} failed on the batch holding this request; the server log has the cause{where}"

    # ------------------------------------------------------------------ the engine thread
    def _serve(self) -> None:
        while True:
            work = self._take()
            if work is None:
                return
            if isinstance(work, Job):
                self._run_job(work)
            else:
                self._run_batch(work)

    def _take(self) -> list[Pending] | Job | None:
        """The next job, or everything already queued (then, if ``max_queue_delay`` > 0,
        what arrives before the first image has waited that long). With delay 0 a lone
        request runs at once, and under load batches form from what queued during the
        last run. None: stopping."""
        with self._wakeup:
            while not self._work and not self._stopping:
                self._wakeup.wait()
            if self._stopping:
                return None
            if isinstance(self._work[0], Job):
                return self._work.popleft()  # type: ignore[return-value]
            batch: list[Pending] = []
            closes = self._work[0].enqueued + self.max_delay
            while True:
                while self._work and isinstance(self._work[0], Pending) and len(batch) < self.max_batch_size:
                    batch.append(self._work.popleft())  # type: ignore[arg-type]
                if len(batch) >= self.max_batch_size or self._work or self._stopping:
                    return batch  # full, or a job waits its turn behind it
                remaining = closes - self.clock()
                if remaining <= 0:
                    return batch
                self._wakeup.wait(remaining)

    def _run_job(self, job: Job) -> None:
        if job.future.done():  # the client went before its turn
            self._finish(job.images, running=False)
            return
        self._move_to_running(job.images)
        try:
            run = job.fn()
        except Exception as exc:
            self._finish(job.images)
            self._failed(exc, [job.request_id])
            error = InferenceFailed(self._failure_detail(job.request_id))
            error.__cause__ = exc
            self._to_loop(self._fail, [job.future], [error])
            return
        self._finish(job.images)  # counted before the answer is out: whoever it wakes sees it done
        self._to_loop(self._job_done, job, run)

    def _job_done(self, job: Job, run: EngineRun) -> None:
        self._report(job.images, run.stage_ms)
        if not job.future.done():
            job.future.set_result(run.results)

    def _run_batch(self, batch: list[Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # the client may have gone
        if len(batch) > len(live):
            self._finish(len(batch) - len(live), running=False)
        if not live:
            return
        self._move_to_running(len(live))
        started = self.clock()
        try:
            images = np.stack([p.image for p in live])
            thresholds = np.stack([p.thresholds for p in live])
            deadlines = np.array([p.deadline for p in live])
            run = self.engine.run_thresholds(images, thresholds, deadlines)
            if len(run.results) != len(live):
                raise RuntimeError(f"the engine answered {len(run.results)} images of {len(live)}")
        except Exception as exc:  # a failed batch fails its own requests, not the server
            self._finish(len(live))
            self._failed(exc, [p.request_id for p in live])
            errors = [InferenceFailed(self._failure_detail(p.request_id)) for p in live]
            self._to_loop(self._fail, [p.future for p in live], errors)
            return
        self._finish(len(live))  # counted before the answers are out: whoever they wake sees the batch done
        self._to_loop(self._finish_batch, live, run, started)

    def _finish_batch(self, live: list[Pending], run: EngineRun, started: float) -> None:
        """On the loop: a batch's answers."""
        self._report(len(live), run.stage_ms)
        finished = self.clock()
        inference_ms = (finished - started) * 1000
        for p, result in zip(live, run.results):
            if not p.future.done():  # the client may have gone
                p.future.set_result(BatchOutcome(result, (started - p.enqueued) * 1000, inference_ms, len(live),
                                                 run.stage_ms, finished))
