"""A lean HTTP/1.1 load client that tells answered requests from refused ones.

wrk reports one latency distribution over every response, so a server that refuses a
quarter of its requests quickly looks faster than it is. This client keeps the latency of
each status class apart (2xx, 503, others), on raw asyncio protocols over keep-alive
connections (uvloop when installed), so it costs about as little CPU per request as a
Python client can. It measures its own CPU and reports it.

Two ways to drive a server:

* **closed loop** (``closed_loop``): ``connections`` clients, each sending its next request
  the moment the last is answered, refused or not (as wrk, Locust and retrying clients do);
* **paced** (``paced``): Poisson arrivals at ``rate`` per second, each on a free
  connection of a pool of ``connections``; an arrival finding none free is counted as
  ``not_sent``, so overload does not slow the offered rate.

Bodies are POSTed raw (``image/png`` by default), cycling through ``bodies``. Traffic only
to the host given (the harnesses pass 127.0.0.1), bounded by ``duration_s``.
"""

from __future__ import annotations

import asyncio
import math
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

HEADER_END = b"\r\n\r\n"


@dataclass
class LoadResult:
    """What one run saw: every response's status and latency, in the order answered."""

    duration_s: float
    statuses: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # seconds since the run started
    errors: int = 0  # connections that failed or closed mid-response
    not_sent: int = 0  # paced arrivals that found no free connection
    client_cpu_s: float = 0.0

    def count(self, low: int, high: int) -> int:
        return sum(1 for s in self.statuses if low <= s < high)

    def latencies(self, low: int, high: int, since_s: float = 0.0) -> list[float]:
        return [ms for s, ms, at in zip(self.statuses, self.latencies_ms, self.answered_at)
                if low <= s < high and at >= since_s]

    def summary(self, since_s: float = 0.0) -> dict:
        """Counts per status, rates, and the latency percentiles of answered (2xx) and
        refused (503) responses; ``since_s``: only responses from then on."""
        window = max(self.duration_s - since_s, 1e-9)
        kept = [s for s, at in zip(self.statuses, self.answered_at) if at >= since_s]
        statuses: dict[str, int] = {}
        for status in kept:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        answered = sum(n for code, n in statuses.items() if code.startswith("2"))
        refused = statuses.get("503", 0)
        return {
            "duration_s": round(window, 3),
            "responses": len(kept),
            "status_counts": dict(sorted(statuses.items())),
            "answered_per_s": answered / window,
            "refused_per_s": refused / window,
            "refused_share": refused / len(kept) if kept else 0.0,
            "answered_ms": percentiles(self.latencies(200, 300, since_s)),
            "refused_ms": percentiles(self.latencies(503, 504, since_s)),
            "all_ms": percentiles([ms for ms, at in zip(self.latencies_ms, self.answered_at) if at >= since_s]),
            "errors": self.errors,
            "not_sent": self.not_sent,
            "client_cpu_s": round(self.client_cpu_s, 3),
            "client_cpu_pct": 100 * self.client_cpu_s / max(self.duration_s, 1e-9),
        }


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(math.ceil(q * len(ordered)) - 1, 0))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 3)}


def build_requests(host: str, port: int, path: str, bodies: Sequence[bytes],
                   content_type: str = "image/png") -> list[bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Connection: keep-alive\r\n")
    return [(head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in bodies]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``send`` one request at a time, ``answered`` resolves with
    the status (or an exception when the connection broke)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answered: asyncio.Future | None = None
        self.closes = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future:
        assert self.transport is not None
        self.answered = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.answered

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(HEADER_END)
        if end < 0 or self.answered is None:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value:
                self.closes = True
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buffer[:end + 4 + length]
        answered, self.answered = self.answered, None
        if not answered.done():
            answered.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.answered is not None and not self.answered.done():
            self.answered.set_exception(ConnectionError("the server closed the connection"))


class _Driver:
    def __init__(self, host: str, port: int, requests: list[bytes], result: LoadResult) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.result = result
        self.sent = 0
        self.started = time.perf_counter()

    async def connect(self) -> _Connection:
        _, protocol = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        return protocol  # type: ignore[return-value]

    async def one(self, connection: _Connection | None) -> _Connection | None:
        """Send the next request on ``connection`` (opened when None or closed); record it.
        Returns the connection to reuse, None when it must be reopened."""
        request = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        try:
            if connection is None or connection.lost or connection.closes:
                if connection is not None and connection.transport is not None:
                    connection.transport.close()
                connection = await self.connect()
            sent_at = time.perf_counter()
            status = await connection.send(request)
        except (ConnectionError, OSError):
            self.result.errors += 1
            return None
        now = time.perf_counter()
        self.result.statuses.append(status)
        self.result.latencies_ms.append((now - sent_at) * 1000)
        self.result.answered_at.append(now - self.started)
        return connection


async def _closed_loop(host: str, port: int, requests: list[bytes], connections: int,
                       duration_s: float) -> LoadResult:
    result = LoadResult(duration_s)
    driver = _Driver(host, port, requests, result)
    ends = driver.started + duration_s

    async def client() -> None:
        connection: _Connection | None = None
        while time.perf_counter() < ends:
            connection = await driver.one(connection)
            if connection is None:
                await asyncio.sleep(0.01)  # a refused connection: do not spin
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return result


async def _paced(host: str, port: int, requests: list[bytes], rate: float, connections: int,
                 duration_s: float, seed: int) -> LoadResult:
    result = LoadResult(duration_s)
    driver = _Driver(host, port, requests, result)
    free: list[_Connection | None] = [None] * connections
    in_flight: set[asyncio.Task] = set()
    rng = random.Random(seed)

    async def send(connection: _Connection | None) -> None:
        free.append(await driver.one(connection))

    due = driver.started
    ends = driver.started + duration_s
    while True:
        due += rng.expovariate(rate)
        if due >= ends:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if not free:
            result.not_sent += 1
            continue
        task = asyncio.ensure_future(send(free.pop()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=30)
    for connection in free:
        if connection is not None and connection.transport is not None:
            connection.transport.close()
    return result


def _run(coroutine) -> LoadResult:
    try:
        import uvloop
    except ImportError:  # plain asyncio: correct, a little more CPU per request
        uvloop = None
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    result = uvloop.run(coroutine) if uvloop else asyncio.run(coroutine)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return result


def closed_loop(host: str, port: int, path: str, bodies: Sequence[bytes], connections: int,
                duration_s: float) -> LoadResult:
    """``connections`` clients that each send again as soon as they are answered."""
    return _run(_closed_loop(host, port, build_requests(host, port, path, bodies), connections, duration_s))


def paced(host: str, port: int, path: str, bodies: Sequence[bytes], rate: float, connections: int,
          duration_s: float, seed: int = 0) -> LoadResult:
    """Poisson arrivals at ``rate`` per second, each on a free connection of ``connections``."""
    return _run(_paced(host, port, build_requests(host, port, path, bodies), rate, connections, duration_s, seed))
