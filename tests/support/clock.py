"""The one fake clock of the suite: seconds that move only when a test (or a synthetic
stage) says so. The policy, the latency objective and the batcher take it as their clock."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000
