"""How many requests a model takes in at once under a latency objective, and who waits.

The latency objective (``server.slo``) first cuts the budget. When the budget is at its
floor and requests still arrive faster than they can be answered in time, refusing at
once does not help closed-loop clients (wrk, Locust, a client that retries at once): each
refusal comes straight back, costs the loop a request, and the answered requests keep the
same long queue. This line does what RPC servers under overload do (Netflix's adaptive
concurrency limits, Facebook's adaptive LIFO with CoDel):

* **A limit on requests inside the model's data plane, learned from their latency.**
  Every interval the p99 time from entering to being answered, plus the event loop's lag
  (the wait before a request even reaches the line), is compared with ``TARGET`` x the
  objective. Above it, the limit shrinks in proportion (a gradient, at most halved per
  interval). Below 0.9 of it, while requests had to wait, it grows by a tenth.
* **Requests over the limit wait in line, before their body is read, newest first.** A
  newcomer takes a free place at once; when a place frees up, the newest waiter gets it.
  Under a closed loop the clients being served keep their pace, and the requests that got
  stuck wait on instead of making everyone's wait long (LIFO, as adaptive LIFO does under
  congestion).
* **Requests are refused by their sojourn, not by a prediction.** A waiter that has waited
  ``STALE`` x the objective is not let in any more: it would miss the objective anyway. It
  waits for its timer, ``max_wait_ms``, and is then answered 503 with Retry-After. Waiting
  that long before the refusal is deliberate. A client that retries at once comes back no
  sooner than that, so refusals stay a small share of the traffic. A newcomer is also
  refused at once when ``max_waiting`` requests are already in line; that is a memory
  bound, not a policy. A refusal costs the loop one timer, and the engine thread never
  sees it.

The line is engaged only while the objective's budget is at its floor (``engage``,
``release``). Above the floor, cutting the budget is the cheaper remedy and the line lets
everyone in.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from exitserve.server.errors import Overloaded

Clock = Callable[[], float]


@dataclass(frozen=True)
class LineState:
    """What /v1/models and /metrics report."""

    engaged: bool
    limit: float  # inf while not engaged
    inside: int
    waiting: int


class _Waiter:
    __slots__ = ("future", "since", "admitted")

    def __init__(self, future: asyncio.Future, since: float) -> None:
        self.future = future
        self.since = since
        self.admitted = False


class AdmissionLine:
    TARGET = 0.85  # the limit aims the p99 time inside at this x the objective (what is left: the wait, the loop)
    STALE = 0.2  # a waiter whose turn comes after this x the objective is refused: it would miss it anyway
    GROWTH = 1.1  # growth per interval while requests waited and the time was under 0.9 x the target
    MIN_LIMIT = 4

    def __init__(self, objective_ms: float, *, max_wait_ms: float, max_waiting: int, model: str,
                 on_refuse: Callable[[str], None] | None = None, clock: Clock = time.perf_counter) -> None:
        self.objective_ms = objective_ms
        self.on_refuse = on_refuse
        self.max_wait_s = max_wait_ms / 1000
        self.max_waiting = max_waiting
        self.model = model
        self.clock = clock
        self.limit = math.inf
        self.inside = 0
        self.line: deque[_Waiter] = deque()
        self.waited_in_interval = False
        self.times_ms: list[float] = []  # entering -> answered, this interval
        self.refused_waiting = 0  # refused because they waited max_wait_ms
        self.refused_full = 0  # refused because max_waiting were in line
        self.answer_rate: float | None = None  # answers per second, recent intervals
        self.last_adjusted = clock()

    @property
    def engaged(self) -> bool:
        return self.limit != math.inf

    def state(self) -> LineState:
        return LineState(self.engaged, self.limit, self.inside, len(self.line))

    # ------------------------------------------------------------------ the objective's side
    def engage(self) -> None:
        """The budget reached its floor: from now on at most as many as are inside, and no
        more than Little's law says fit the target at the recent answer rate (a burst may
        have let far more in than can be answered in time)."""
        if self.engaged:
            return
        limit = float(self.inside)
        if self.answer_rate:
            limit = min(limit, self.answer_rate * self.TARGET * self.objective_ms / 1000)
        self.limit = max(limit, float(self.MIN_LIMIT))

    def release(self) -> None:
        """The budget left its floor: everyone is let in, the line emptied."""
        self.limit = math.inf
        self._wake()

    def adjust(self, loop_lag_ms: float = 0.0) -> None:
        """Once per interval: the gradient on the p99 time inside plus the event loop's lag
        (engaged only). The lag is what a request waits before it even reaches the line: a
        congested loop is a queue in front of the app, and requests inside congest it."""
        times, self.times_ms = self.times_ms, []
        waited, self.waited_in_interval = self.waited_in_interval or bool(self.line), False
        now = self.clock()
        if now > self.last_adjusted:
            rate = len(times) / (now - self.last_adjusted)
            self.answer_rate = rate if self.answer_rate is None else 0.5 * (self.answer_rate + rate)
        self.last_adjusted = now
        if not self.engaged or not times:
            return
        target = self.TARGET * self.objective_ms
        observed = _p99(times) + loop_lag_ms
        if observed > target:
            self.limit = max(self.MIN_LIMIT, self.limit * max(0.5, target / observed))
        elif waited and observed < 0.9 * target:
            self.limit = self.limit * self.GROWTH + 1
        self._wake()

    @property
    def pressure(self) -> bool:
        """Requests are waiting (or did this interval): the demand does not fit now."""
        return bool(self.line) or self.waited_in_interval

    # ------------------------------------------------------------------ the requests' side
    async def enter(self) -> float:
        """Wait for a place; returns when this request entered (the clock), for ``leave``.
        ``Overloaded`` when the line is full or the wait reached ``max_wait_ms``."""
        now = self.clock()
        if self._has_room():  # newest first: a newcomer never queues behind a free place
            self.inside += 1
            return now
        if len(self.line) >= self.max_waiting:
            self.refused_full += 1
            self._refused()
            raise Overloaded(f"{len(self.line)} requests are already waiting for {self.model}")
        self.waited_in_interval = True
        waiter = _Waiter(asyncio.get_running_loop().create_future(), now)
        self.line.append(waiter)
        try:
            async with asyncio.timeout(self.max_wait_s):
                await waiter.future  # ``_wake`` let it in (counted inside)
        except TimeoutError:
            if waiter.admitted:  # let in as the time ran out: take the place
                return self.clock()
            self._forget(waiter)
            self.refused_waiting += 1
            self._refused()
            raise Overloaded(f"waited {self.max_wait_s * 1000:g} ms for {self.model} and could not be served "
                             f"within its {self.objective_ms:g} ms latency objective") from None
        except BaseException:  # cancelled (the client went): give the place back if it had one
            if waiter.admitted:
                self.leave(now, measured=False)
            else:
                self._forget(waiter)
            raise
        return self.clock()

    def leave(self, entered: float, measured: bool = True) -> None:
        """A request that entered at ``entered`` was answered (or failed)."""
        self.inside -= 1
        if measured:
            self.times_ms.append((self.clock() - entered) * 1000)
        self._wake()

    # ------------------------------------------------------------------ inside
    def _has_room(self) -> bool:
        return not self.engaged or self.inside < math.floor(self.limit + 1e-9)  # a limit of 10.000001: 10 places

    def _refused(self) -> None:
        if self.on_refuse is not None:
            self.on_refuse(self.model)

    def _wake(self) -> None:
        """Let the newest waiters in while there is room. A waiter whose wait already makes
        it too late for the objective stays for its own timer: everyone under it is
        older still. Released, the line lets everyone in."""
        stale_before = self.clock() - self.STALE * self.objective_ms / 1000
        while self.line and self._has_room():
            waiter = self.line[-1]
            if self.engaged and waiter.since < stale_before:
                return
            self.line.pop()
            if waiter.future.done():
                continue
            self.inside += 1
            waiter.admitted = True
            waiter.future.set_result(None)

    def _forget(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the line (if ``_wake`` has not already)."""
        try:
            self.line.remove(waiter)
        except ValueError:
            pass


def default_max_wait_ms(objective_ms: float) -> float:
    """How long a request may wait in line unless configured: 8 x the objective, at least
    200 ms. This sets the pace of a client that retries at once: at C=64 with 5x, 9-10% of
    responses were refusals (target 10%); at 8x, 6-7% (BENCHMARKS.md)."""
    return max(8 * objective_ms, 200.0)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
