"""The staged early-exit engine: run stage by stage while a schedule says who goes on.

The engine executes and the policy (``server.policy``) decides. After each stage the
schedule sees the stage's probabilities and says who continues; the next stage runs only
on those, compacted inside the graph (``keep`` indices), so carried tensors never come
back to the host. The runtime is injected: anything with ``run_stage`` (the ONNX Runtime
``StagedModel`` in production). No HTTP and no PyTorch in this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from exitserve.repository.confidence import NEVER
from exitserve.repository.format import Calibration, Manifest, load_calibration, load_manifest
from exitserve.server.policy import Clock, ExitPolicy, ExitResult, Schedule



class StageOutputLike(Protocol):
    carried: list[Any]
    probs: np.ndarray


class StageRuntime(Protocol):
    """What the engine needs of a runtime: run stage ``index`` on the carried tensors,
    keeping the rows ``keep`` (None: all); and say where it runs."""

    provider: str  # e.g. "CPUExecutionProvider"
    use_binding: bool  # carried tensors stay on the device between stages

    def run_stage(self, index: int, carried: list[Any], keep: np.ndarray | None = None) -> StageOutputLike: ...


@dataclass
class EngineRun:
    """One run's answers, in input order, and the wall time of each stage it ran."""

    results: list[ExitResult]
    stage_ms: dict[int, float]


class ModelEngine:
    """One model: its runtime, manifest, calibration and exit policy."""

    def __init__(self, runtime: StageRuntime, manifest: Manifest, calibration: Calibration | None, *,
                 default_budget: float, online_budget: bool = True, clock: Clock = time.perf_counter) -> None:
        self.runtime = runtime
        self.manifest = manifest
        self.calibration = calibration
        self.name = manifest.name
        self.policy = ExitPolicy(manifest, calibration, default_budget=default_budget, online_budget=online_budget,
                                 clock=clock)

    @classmethod
    def load(cls, folder: Path, *, default_budget: float, provider: str = "auto", io_binding: str = "auto",
             intra_op_threads: int | None = None, online_budget: bool = True) -> ModelEngine:
        """A model folder on ONNX Runtime (imported here: the policy and the loop need none)."""
        from exitserve.repository.runtime import StagedModel

        manifest = load_manifest(folder)
        calibration = load_calibration(folder, manifest)
        runtime = StagedModel(folder, manifest, provider, io_binding, intra_op_threads)  # type: ignore[arg-type]
        return cls(runtime, manifest, calibration, default_budget=default_budget, online_budget=online_budget)

    @property
    def num_exits(self) -> int:
        return self.policy.num_exits

    def run(self, images: np.ndarray, schedule: Schedule) -> EngineRun:
        """``images``: N x C x H x W normalized, in the order ``schedule`` was made for."""
        clock = self.policy.clock  # the clock deadlines are checked with times the stages too
        carried: list[Any] = [images]
        stage_ms: dict[int, float] = {}
        for k in range(self.num_exits):
            keep = schedule.keep(k)
            if keep is not None and len(keep) == 0:
                break
            started = clock()
            out = self.runtime.run_stage(k, carried, keep)
            elapsed = (clock() - started) * 1000
            self.policy.latency[k].observe(len(out.probs), elapsed)
            stage_ms[k] = elapsed
            schedule.observe(k, out.probs)
            carried = out.carried
        return EngineRun(schedule.results(), stage_ms)

    def run_thresholds(self, images: np.ndarray, thresholds: np.ndarray,
                       deadlines: np.ndarray | None = None) -> EngineRun:
        """Threshold policy: ``thresholds`` N x K; ``deadlines`` N absolute
        ``time.perf_counter()`` seconds (inf: none)."""
        return self.run(images, self.policy.threshold_schedule(thresholds, deadlines))

    def run_budgeted(self, images: np.ndarray, budget: float) -> EngineRun:
        """Budgeted batch: at most ``budget`` x N x full cost for the whole batch."""
        return self.run(images, self.policy.budgeted_schedule(len(images), budget))

    def warm_up(self, batches: int = 2) -> None:
        """Run every stage a few times so the first request does not pay for lazy init."""
        spec = self.manifest.input
        images = np.zeros((4, spec.channels, spec.size, spec.size), dtype=spec.dtype)
        never = np.full((4, self.num_exits), NEVER)
        for _ in range(max(batches, 1)):
            self.run_thresholds(images, never)
