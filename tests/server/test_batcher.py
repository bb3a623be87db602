"""Dynamic batching on a synthetic engine: grouping, the queue bound, failure isolation,
and its one clock (a fake one where time has to pass: the delay window, the stall watch)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from exitserve.repository.confidence import ALWAYS
from exitserve.server import batcher as batcher_module
from exitserve.server.batcher import DynamicBatcher
from exitserve.server.errors import InferenceFailed, Overloaded, TooManyImages
from exitserve.server.http.errors import status_of
from exitserve.server.request_context import request_id_var
from tests.support.clock import FakeClock
from tests.support.synthetic import SyntheticRuntime, probs_with_confidence, synthetic_engine

THRESHOLDS = np.array([0.9, 0.9, ALWAYS])
POISON = 0.51  # a confidence the failing runtime below refuses to process


def image(conf: float = 0.95) -> np.ndarray:
    return probs_with_confidence(np.full((1, 3), conf))[0]


def batcher_for(runtime: SyntheticRuntime | None = None, **kwargs) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_queue_delay_ms": 50, "max_queue_images": 8} | kwargs
    return DynamicBatcher(synthetic_engine(runtime), **options)


def test_concurrent_requests_share_one_engine_call_and_full_queue_refuses() -> None:
    runtime = SyntheticRuntime()
    reports: list[tuple[str, int, dict]] = []

    async def scenario() -> None:
        batcher = batcher_for(runtime, max_batch_size=4, max_queue_images=2,
                              on_batch=lambda *report: reports.append(report))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf")))
        second = asyncio.ensure_future(batcher.submit(image(0.6), THRESHOLDS, float("inf")))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(image(), THRESHOLDS, float("inf"))
        outcomes = await asyncio.gather(first, second)
        assert [o.batch_size for o in outcomes] == [2, 2]
        assert [o.result.exit_index for o in outcomes] == [0, 2]
        assert batcher.pending_images == 0
        await batcher.stop()

    asyncio.run(scenario())
    assert runtime.calls[0] == (0, 2)  # one engine call for both
    assert [(model, size, sorted(ms)) for model, size, ms in reports] == [("synthetic", 2, [0, 1, 2])]


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    runtime = SyntheticRuntime(fail_when=lambda stage, rows: bool(np.isclose(rows[:, 0, 0], POISON).any()))
    failures: list[str] = []

    async def scenario() -> None:
        batcher = batcher_for(runtime, max_queue_delay_ms=20, on_failure=failures.append)
        batcher.start()

        async def submit(conf: float, request_id: str):
            request_id_var.set(request_id)  # each task runs in its own copy of the context
            return await batcher.submit(image(conf), THRESHOLDS, float("inf"))

        doomed = [asyncio.ensure_future(submit(c, f"req-{i}")) for i, c in enumerate((0.95, POISON))]
        results = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(r, InferenceFailed) for r in results)  # the batch failed as a whole
        assert [r.detail.endswith(f"(request id req-{i})") for i, r in enumerate(results)] == [True, True]
        assert batcher.pending_images == 0 and batcher.failures == 1
        later = await asyncio.wait_for(batcher.submit(image(), THRESHOLDS, float("inf")), 5)
        assert later.result.exit_index == 0  # the loop survived
        await batcher.stop()

    logger = batcher_module.log.name
    with caplog.at_level("ERROR", logger=logger):
        asyncio.run(scenario())
    assert failures == ["synthetic"]
    logged = [r for r in caplog.records if r.name == logger]
    assert len(logged) == 1 and "req-0, req-1" in logged[0].getMessage() and logged[0].exc_info


def test_bad_thresholds_fail_the_batch_not_the_loop() -> None:
    """Threshold rows of different lengths cannot be stacked: those requests fail, the
    loop survives (a broken calibration once killed it silently)."""

    async def scenario() -> None:
        batcher = batcher_for(max_queue_delay_ms=20)
        batcher.start()
        bad = [asyncio.ensure_future(batcher.submit(image(), t, float("inf"))) for t in (THRESHOLDS, THRESHOLDS[:2])]
        results = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)
        good = await asyncio.wait_for(batcher.submit(image(), THRESHOLDS, float("inf")), 5)
        assert good.result.exit_index == 0
        await batcher.stop()

    asyncio.run(scenario())


def test_whole_jobs_count_against_the_queue_bound_until_they_run() -> None:
    engine_images = probs_with_confidence(np.full((5, 3), 0.95))

    async def scenario() -> None:
        batcher = batcher_for(max_queue_images=8)
        batcher.start()
        engine = batcher.engine
        with pytest.raises(TooManyImages):  # never fits: not overload
            await batcher.run_job(9, lambda: engine.run_budgeted(engine_images, 0.5))
        started = asyncio.Event()
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow_job():
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
            return engine.run_budgeted(engine_images, 0.5)

        job = asyncio.ensure_future(batcher.run_job(5, slow_job))
        await started.wait()
        assert (batcher.running_images, batcher.waiting_images) == (5, 0)
        # running images do not count: 8 may wait behind the running job, a 9th may not
        waiting = [asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf"))) for _ in range(8)]
        await asyncio.sleep(0)
        assert batcher.waiting_images == 8
        with pytest.raises(Overloaded):
            batcher.check_admission(1)
        release.set()
        results = await job
        assert len(results) == 5
        assert [o.result.exit_index for o in await asyncio.gather(*waiting)] == [0] * 8
        assert batcher.pending_images == 0
        await batcher.stop()

    asyncio.run(scenario())


def test_stall_watch_sees_work_without_progress() -> None:
    release = threading.Event()
    runtime = SyntheticRuntime(fail_when=lambda stage, rows: not release.wait(10))  # blocks until released
    clock = FakeClock()

    async def scenario() -> None:
        batcher = batcher_for(runtime, max_queue_delay_ms=0, clock=clock)
        batcher.start()
        clock.advance_ms(3_600_000)
        assert batcher.stalled_for() == 0.0  # idle is not stalled, however long
        stuck = asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf")))
        await asyncio.sleep(0)  # admitted: work arrived to an idle model, the watch starts now
        assert batcher.pending_images == 1 and batcher.stalled_for() == 0.0
        clock.advance_ms(300)
        assert batcher.stalled_for() == pytest.approx(0.3)
        clock.advance_ms(700)
        assert batcher.stalled_for() == pytest.approx(1.0)
        release.set()
        await asyncio.wait_for(stuck, 5)
        assert batcher.stalled_for() == 0.0
        await batcher.stop()

    asyncio.run(scenario())


def test_progress_restarts_the_stall_watch() -> None:
    """A finished batch is progress even while more work waits: the watch measures from it."""
    clock = FakeClock()
    gates = [threading.Event(), threading.Event()]  # one per batch: its first stage waits for it

    def held(stage: int, rows: np.ndarray) -> bool:
        if stage == 0:
            gates[1 if runtime.calls else 0].wait(10)
        return False  # never fails

    runtime = SyntheticRuntime(fail_when=held)

    async def scenario() -> None:
        batcher = batcher_for(runtime, max_queue_delay_ms=0, max_batch_size=1, clock=clock)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf")))
        second = asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf")))
        await asyncio.sleep(0)
        clock.advance_ms(2000)
        assert batcher.stalled_for() == pytest.approx(2.0)
        gates[0].set()
        await asyncio.wait_for(first, 5)  # the second now runs, and blocks
        assert batcher.pending_images == 1 and batcher.stalled_for() == 0.0
        clock.advance_ms(500)
        assert batcher.stalled_for() == pytest.approx(0.5)
        gates[1].set()
        await asyncio.wait_for(second, 5)
        await batcher.stop()

    asyncio.run(scenario())


def test_queue_and_inference_times_come_from_the_batchers_clock() -> None:
    """One clock for the whole batch: the stages advance the fake clock, so the outcome's
    times are exactly what it says, with no real time in them."""
    clock = FakeClock()
    runtime = SyntheticRuntime(clock=clock, stage_ms=(2.0, 3.0, 5.0))

    async def scenario() -> None:
        batcher = batcher_for(runtime, max_queue_delay_ms=0, clock=clock)
        waiting = asyncio.ensure_future(batcher.submit(image(0.6), THRESHOLDS, float("inf")))
        await asyncio.sleep(0)  # queued at t = 0, before the loop runs
        clock.advance_ms(7)
        batcher.start()
        outcome = await asyncio.wait_for(waiting, 5)
        assert outcome.result.exit_index == 2  # not confident before the last exit: every stage ran
        assert outcome.queue_ms == pytest.approx(7.0)
        assert outcome.inference_ms == pytest.approx(10.0)
        assert outcome.finished == pytest.approx(0.017) == clock()
        await batcher.stop()

    asyncio.run(scenario())


def test_the_delay_window_is_read_on_the_batchers_clock() -> None:
    """A window that the clock says is over closes the batch at once: with a 10 s delay, a
    lone request whose window ended before the loop saw it runs without waiting."""
    clock = FakeClock()

    async def scenario() -> None:
        batcher = batcher_for(max_queue_delay_ms=10_000, clock=clock)
        waiting = asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf")))
        await asyncio.sleep(0)  # queued at t = 0
        clock.advance_ms(10_001)
        batcher.start()
        outcome = await asyncio.wait_for(waiting, 5)  # not 10 s: the window was over
        assert outcome.batch_size == 1 and outcome.queue_ms == pytest.approx(10_001)
        await batcher.stop()

    asyncio.run(scenario())


def test_the_engine_takes_the_next_batch_without_waiting_for_the_loop() -> None:
    """The engine thread starts the next batch the moment a run ends, even while the event
    loop is busy elsewhere: the loop only queues work and receives answers."""
    first_running, release_first, second_started = threading.Event(), threading.Event(), threading.Event()

    def held(stage: int, rows: np.ndarray) -> bool:
        if stage == 0 and not first_running.is_set():
            first_running.set()
            release_first.wait(10)
        elif stage == 0:
            second_started.set()
        return False

    runtime = SyntheticRuntime(fail_when=held)

    async def scenario() -> None:
        batcher = batcher_for(runtime, max_queue_delay_ms=0, max_batch_size=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf")))
        second = asyncio.ensure_future(batcher.submit(image(), THRESHOLDS, float("inf")))
        await asyncio.sleep(0)
        assert await asyncio.to_thread(first_running.wait, 10)
        release_first.set()
        # the loop is blocked here, not awaiting: only the engine thread can start the second batch
        assert second_started.wait(10)
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        await batcher.stop()

    asyncio.run(scenario())
    assert [stage for stage, _ in runtime.calls].count(0) == 2


def test_a_request_the_queue_can_never_hold_is_not_overload() -> None:
    """More images than the queue holds: 413 (``TooManyImages``), not a 503 to retry
    forever; one that fits an emptier queue is overload (503)."""
    batcher = batcher_for(max_queue_images=8)
    with pytest.raises(TooManyImages, match="9 images in one request; synthetic queues at most 8"):
        batcher.check_admission(9)
    batcher.waiting_images = 4
    with pytest.raises(Overloaded):
        batcher.check_admission(5)
    batcher.check_admission(4)
    assert status_of(TooManyImages("x")) == 413
