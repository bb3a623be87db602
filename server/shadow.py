"""Shadow full depth: a sample of answered images run again to the last exit, off the
request path, to measure how often the early answer agrees with the full network.

Never at an answer's expense:

* an image is queued (a small bounded queue: when full, the oldest goes) after its
  request was answered;
* a thread of its own runs the queue, one stage at a time, and starts each stage only
  while the model's batcher is idle (nothing waiting or running): when work arrives, at
  most the one stage already started overlaps it, and the rest waits;
* that thread keeps the normal priority. At nice 19 it was worse: descheduled while it
  held the GIL, it stalled the event loop and the inference thread until the OS ran it
  again (a C=32 run with 33 shadow runs in it answered 1,388 req/s against 1,652 without;
  measured with wrk on the same 2 cores);
* shadow runs may cost at most ``max_cost_share`` of the compute spent on answers (a
  credit earned per answered image's cost, spent per run); sampled images over it are
  skipped and counted.

Images that already took the last exit agree with full depth by definition: they count
as agreements at no cost.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from exitserve.server.engine import StageRuntime
from exitserve.server.policy import ExitResult

log = logging.getLogger(__name__)

FULL_DEPTH_COST = 1.0  # a shadow run starts from the image: the whole network
CREDIT_CAP = 4.0  # runs an idle spell may save up for
QUEUE_SIZE = 16
IDLE_POLL_S = (0.002, 0.05)  # while the model is busy: first and longest wait before looking again
MIN_AGREEMENT_IMAGES = 20  # shadowed images before the agreement is published

Skipped = Callable[[str], None]  # reason
Shadowed = Callable[[bool, float], None]  # agreed, cost


class ShadowRunner:
    def __init__(self, name: str, runtime: StageRuntime, num_exits: int, *, share: float, max_cost_share: float,
                 window: int, is_idle: Callable[[], bool], on_shadowed: Shadowed | None = None,
                 on_skipped: Skipped | None = None, seed: int | None = None, credit_cap: float = CREDIT_CAP) -> None:
        self.name = name
        self.runtime = runtime
        self.num_exits = num_exits
        self.share = share
        self.max_cost_share = max_cost_share
        self.is_idle = is_idle
        self.on_shadowed = on_shadowed
        self.on_skipped = on_skipped
        self.credit = 0.0  # earned by answers first: shadow cost <= max_cost_share x served cost, always
        self.credit_cap = credit_cap
        self.images = 0
        self.cost = 0.0
        self._random = random.Random(seed)
        self._agreements: deque[bool] = deque(maxlen=window)
        self._queue: deque[tuple[np.ndarray, int]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ on the event loop
    def start(self) -> None:
        if self.share > 0:
            self._thread = threading.Thread(target=self._work, name=f"shadow-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self._queue.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def offer(self, images: np.ndarray, results: Sequence[ExitResult]) -> None:
        """A request's answered images (``images``: their N x C x H x W inputs): earn credit
        for their cost, sample ``share`` of them."""
        if self.share <= 0:
            return
        earned = self.max_cost_share * sum(r.cost_fraction for r in results)
        self.credit = min(self.credit + earned, self.credit_cap)
        for image, result in zip(images, results):
            if self._random.random() >= self.share:
                continue
            if result.exit_index == self.num_exits - 1:
                self._record(True, 0.0)  # already full depth
            elif self.credit < FULL_DEPTH_COST:
                self._skip("cost_cap")
            else:
                self.credit -= FULL_DEPTH_COST
                self._enqueue(image.copy(), int(np.argmax(result.probs)))

    def _enqueue(self, image: np.ndarray, served_class: int) -> None:
        with self._wake:
            if len(self._queue) >= QUEUE_SIZE:
                self._queue.popleft()
                self.credit += FULL_DEPTH_COST  # never ran: nothing spent
                self._skip("queue_full")
            self._queue.append((image, served_class))
            self._wake.notify()

    # ------------------------------------------------------------------ readings
    @property
    def agreement(self) -> float | None:
        with self._lock:
            if len(self._agreements) < MIN_AGREEMENT_IMAGES:
                return None
            return sum(self._agreements) / len(self._agreements)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _record(self, agreed: bool, cost: float) -> None:
        with self._lock:
            self._agreements.append(agreed)
            self.images += 1
            self.cost += cost
        if self.on_shadowed:
            self.on_shadowed(agreed, cost)

    def _skip(self, reason: str) -> None:
        if self.on_skipped:
            self.on_skipped(reason)

    # ------------------------------------------------------------------ the shadow thread
    def _next(self) -> tuple[np.ndarray, int] | None:
        """The next image; None when stopping."""
        with self._wake:
            while not self._queue and not self._stopping:
                self._wake.wait()
            return None if self._stopping else self._queue.popleft()

    def _until_idle(self) -> bool:
        """Wait until the model is idle; False when stopping."""
        wait = IDLE_POLL_S[0]
        while not self._stopping:
            if self.is_idle():
                return True
            time.sleep(wait)
            wait = min(wait * 2, IDLE_POLL_S[1])
        return False

    def _work(self) -> None:
        while (item := self._next()) is not None:
            image, served_class = item
            try:
                full_class = self._full_depth_class(image)
            except Exception:  # a shadow must never take the server down; the request was answered
                log.exception("shadow run of %s failed", self.name)
                continue
            if full_class is not None:
                self._record(full_class == served_class, FULL_DEPTH_COST)

    def _full_depth_class(self, image: np.ndarray) -> int | None:
        """Full depth's class for ``image``, a stage at a time while the model is idle;
        None when stopped on the way."""
        carried: list[Any] = [image[None]]
        probs = None
        for k in range(self.num_exits):
            if not self._until_idle():
                return None
            out = self.runtime.run_stage(k, carried, None)
            carried, probs = out.carried, out.probs
        return int(np.argmax(probs[0]))
