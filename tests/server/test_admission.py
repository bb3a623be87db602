"""The admission line on its own, with a fake clock for sojourns and latencies: nobody
waits until it is engaged; over the limit the newest waiter gets the freed place; a waiter
that has grown too old for the objective is never let in and is refused by its timer; the
limit follows the p99 time inside; cancelled waiters give their place back."""

from __future__ import annotations

import asyncio

import pytest

from exitserve.server.admission import AdmissionLine, default_max_wait_ms
from exitserve.server.errors import Overloaded
from tests.support.clock import FakeClock

OBJECTIVE = 100.0


def line_for(clock: FakeClock, **kwargs) -> tuple[AdmissionLine, list[str]]:
    refused: list[str] = []
    options = {"max_wait_ms": 10_000, "max_waiting": 100} | kwargs
    return AdmissionLine(OBJECTIVE, model="m", on_refuse=refused.append, clock=clock, **options), refused


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_not_engaged_lets_everyone_in_at_once() -> None:
    async def scenario() -> None:
        line, _ = line_for(FakeClock())
        entered = [await line.enter() for _ in range(1000)]
        assert len(entered) == 1000 and line.inside == 1000 and not line.engaged

    asyncio.run(scenario())


def test_over_the_limit_the_newest_waiter_gets_the_freed_place() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        line, _ = line_for(clock)
        line.engage()
        assert line.limit == AdmissionLine.MIN_LIMIT  # nobody inside yet: the smallest limit
        inside = [await line.enter() for _ in range(AdmissionLine.MIN_LIMIT)]
        order: list[str] = []

        async def wait(name: str) -> None:
            await line.enter()
            order.append(name)

        waiters = [asyncio.ensure_future(wait(name)) for name in ("old", "middle", "new")]
        await settle()
        assert order == [] and line.state().waiting == 3
        line.leave(inside.pop())
        await settle()
        assert order == ["new"]
        line.leave(inside.pop())
        await settle()
        assert order == ["new", "middle"]
        line.release()  # the budget left its floor: everyone in
        await settle()
        assert order == ["new", "middle", "old"] and not line.engaged
        await asyncio.gather(*waiters)

    asyncio.run(scenario())


def test_a_waiter_too_old_for_the_objective_is_refused_by_its_timer_not_let_in() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        line, refused = line_for(clock, max_wait_ms=50)
        line.engage()
        inside = [await line.enter() for _ in range(int(line.limit))]
        stale = asyncio.ensure_future(line.enter())
        await settle()
        clock.advance_ms(AdmissionLine.STALE * OBJECTIVE + 1)  # now too late to meet the objective
        line.leave(inside.pop())
        await settle()
        assert not stale.done() and line.inside == len(inside)  # the place stays free for a newcomer
        await line.enter()  # a newcomer takes it at once
        with pytest.raises(Overloaded, match="waited 50 ms"):
            await stale
        assert refused == ["m"] and line.refused_waiting == 1 and line.state().waiting == 0
        # released (the budget left its floor), the line lets even a stale waiter in
        stale = asyncio.ensure_future(line.enter())
        await settle()
        clock.advance_ms(AdmissionLine.STALE * OBJECTIVE + 1)
        line.release()
        await stale

    asyncio.run(scenario())


def test_a_full_line_refuses_newcomers_at_once() -> None:
    async def scenario() -> None:
        line, refused = line_for(FakeClock(), max_waiting=2)
        line.engage()
        for _ in range(int(line.limit)):
            await line.enter()
        waiting = [asyncio.ensure_future(line.enter()) for _ in range(2)]
        await settle()
        with pytest.raises(Overloaded, match="2 requests are already waiting"):
            await line.enter()
        assert refused == ["m"] and line.refused_full == 1
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert line.state().waiting == 0 and line.inside == line.limit  # cancelled waiters left no trace

    asyncio.run(scenario())


def test_the_limit_follows_the_time_inside() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        line, _ = line_for(clock)
        entered = [await line.enter() for _ in range(40)]
        line.engage()
        assert line.limit == 40  # as many as are inside when the budget reached its floor
        clock.advance_ms(2 * AdmissionLine.TARGET * OBJECTIVE)  # twice the target: halve
        for t in entered:
            line.leave(t)
        line.adjust()
        assert line.limit == pytest.approx(20)
        clock.advance_ms(10)
        entered = [await line.enter() for _ in range(20)]
        line.adjust()  # no answers this interval: no change
        assert line.limit == pytest.approx(20)
        clock.advance_ms(1.5 * AdmissionLine.TARGET * OBJECTIVE)
        for t in entered:
            line.leave(t)
        line.adjust(loop_lag_ms=0.5 * AdmissionLine.TARGET * OBJECTIVE)  # the loop's lag counts too: 2x again
        assert line.limit == pytest.approx(10)
        # well within while requests had to wait: grow by a tenth
        entered = [await line.enter() for _ in range(10)]
        waiter = asyncio.ensure_future(line.enter())
        await settle()
        clock.advance_ms(10)
        for t in entered:
            line.leave(t)
        await settle()
        line.adjust()
        assert line.limit == pytest.approx(10 * AdmissionLine.GROWTH + 1)
        await waiter
        # well within and nobody waited: no evidence it could take more
        before = line.limit
        t = await line.enter()
        clock.advance_ms(10)
        line.leave(t)
        line.adjust()
        line.adjust()
        assert line.limit == before

    asyncio.run(scenario())


def test_a_waiter_cancelled_after_it_was_let_in_gives_the_place_back() -> None:
    async def scenario() -> None:
        line, _ = line_for(FakeClock())
        line.engage()
        inside = [await line.enter() for _ in range(int(line.limit))]
        waiter = asyncio.ensure_future(line.enter())
        await settle()
        line.leave(inside.pop())  # lets the waiter in (counted inside) ...
        waiter.cancel()  # ... but its client went before it ran
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert line.inside == len(inside)

    asyncio.run(scenario())


def test_the_default_wait_is_long_enough_to_keep_refusals_rare() -> None:
    assert default_max_wait_ms(10.0) == 200.0
    assert default_max_wait_ms(100.0) == 800.0


def test_engaging_after_a_burst_limits_by_the_answer_rate() -> None:
    """A burst let 500 requests in; the model answers 1,000 a second: at most what that rate
    answers within the target gets a place, not all 500."""
    async def scenario() -> None:
        clock = FakeClock()
        line, _ = line_for(clock)
        for _ in range(100):
            line.leave(await line.enter())
        clock.advance(0.1)  # 100 answers in 0.1 s
        line.adjust()
        for _ in range(500):
            await line.enter()
        line.engage()
        assert line.limit == pytest.approx(1000 * AdmissionLine.TARGET * OBJECTIVE / 1000)

    asyncio.run(scenario())
