"""A synthetic stage runtime and model description: the engine, policy and batcher
tested on chosen probabilities, without ONNX Runtime or a trained model.

Each "image" is a K x C array: row k is the probability vector exit k reports for it.
Stage k gathers the kept rows and reads row k, exactly as a real stage gathers its
carried tensors with ``keep`` and computes its exit's softmax. Through the data plane an
image travels as the model's normalized input, K x C x C (``as_normalized``: the manifest
says K channels of C x C), and stage k reads the first row of channel k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exitserve.repository.confidence import ALWAYS, NEVER
from exitserve.repository.format import (
    BudgetPoint,
    Calibration,
    InputSpec,
    LatencySpec,
    Manifest,
    ServingConfig,
    SourceSpec,
    StageSpec,
)
from exitserve.server.catalog import ServedModel
from exitserve.server.engine import ModelEngine
from tests.support.clock import FakeClock

COSTS = (0.2, 0.5, 1.0)


@dataclass
class StageOut:
    carried: list[Any]
    probs: np.ndarray


class SyntheticRuntime:
    """Implements ``run_stage`` like ``StagedModel``; records (stage, rows) of every call."""

    provider = "SyntheticProvider"
    use_binding = False

    def __init__(self, clock: FakeClock | None = None, stage_ms: Sequence[float] = (), fail_when=None) -> None:
        self.clock = clock
        self.stage_ms = stage_ms
        self.fail_when = fail_when  # (stage, rows) -> bool: raise instead of answering
        self.calls: list[tuple[int, int]] = []

    def run_stage(self, index: int, carried: list[Any], keep: np.ndarray | None = None) -> StageOut:
        rows = carried[0] if keep is None else carried[0][keep]
        if self.fail_when is not None and self.fail_when(index, rows):
            raise RuntimeError(f"stage {index} failed")
        if self.clock is not None and self.stage_ms:
            self.clock.advance_ms(self.stage_ms[index])
        self.calls.append((index, len(rows)))
        return StageOut([rows], rows[:, index, 0, :] if rows.ndim == 4 else rows[:, index, :])


def probs_with_confidence(conf: np.ndarray, classes: int = 2) -> np.ndarray:
    """N x K confidences (each >= 1/classes) -> N x K x classes probabilities whose top
    probability (class 0) is that confidence."""
    conf = np.asarray(conf, dtype=np.float64)
    rest = (1 - conf) / (classes - 1)
    probs = np.repeat(rest[..., None], classes, axis=-1)
    probs[..., 0] = conf
    return probs


def synthetic_manifest(costs: Sequence[float] = COSTS, latency_ms: tuple[float, float] = (1.0, 1.0),
                       name: str = "synthetic") -> Manifest:
    stages = [
        StageSpec(index=k, file=f"stage_{k:02d}.onnx", carried_inputs=["image"] if k == 0 else ["carried_in_0"],
                  keep_input=None if k == 0 else "keep", carried_outputs=[] if k == len(costs) - 1 else ["carried_out_0"],
                  exit_name=f"exit{k}", flops=1, cumulative_flops=k + 1, params=1, cost_fraction=cost,
                  latency=LatencySpec(provider="synthetic", batch_1_ms=latency_ms[0], batch_64_ms=latency_ms[1]))
        for k, cost in enumerate(costs)
    ]
    return Manifest(name=name, exporter_version="test", opset=17,
                    input=InputSpec(channels=len(costs), size=2, mean=[0.5] * len(costs), std=[0.5] * len(costs)),
                    labels=["a", "b"], stages=stages,
                    source=SourceSpec(checkpoint="-", sha256="-", model="synthetic", config={}, dataset="synthetic"))


def synthetic_calibration(costs: Sequence[float] = COSTS) -> Calibration:
    """Three points: exit 0 only (its cost), a middle point with thresholds 0.8, and 1.0
    (full depth)."""
    k = len(costs)

    def point(budget: float, thresholds: list[float], accuracy: float) -> BudgetPoint:
        return BudgetPoint(budget=budget, thresholds=thresholds, method="reference", expected_accuracy=accuracy,
                           expected_cost=budget, exit_fractions=[1.0 / k] * k)

    cheapest = [ALWAYS] * k
    middle = [0.8] * (k - 1) + [ALWAYS]
    full = [NEVER] * (k - 1) + [ALWAYS]
    return Calibration(rule="max_softmax", heldout={"dataset": "synthetic", "split": "holdout", "images": 0},
                       exit_accuracy=[0.8] * k, cost_fractions=list(costs),
                       curve=[point(costs[0], cheapest, 0.8), point(0.5, middle, 0.9), point(1.0, full, 0.95)])


def synthetic_engine(runtime: SyntheticRuntime | None = None, *, clock: FakeClock | None = None,
                     default_budget: float = 0.5, online_budget: bool = False, costs: Sequence[float] = COSTS,
                     calibrated: bool = True, name: str = "synthetic") -> ModelEngine:
    runtime = runtime or SyntheticRuntime(clock)
    extra = {"clock": clock} if clock is not None else {}
    return ModelEngine(runtime, synthetic_manifest(costs, name=name),
                       synthetic_calibration(costs) if calibrated else None,
                       default_budget=default_budget, online_budget=online_budget, **extra)


def as_normalized(images: np.ndarray) -> np.ndarray:
    """N x K x C synthetic images -> N x K x C x C, the normalized input the manifest declares."""
    return np.repeat(images[:, :, None, :], images.shape[-1], axis=2)


def served(engine: ModelEngine) -> ServedModel:
    """A synthetic engine as the catalog serves it (no serving.json)."""
    return ServedModel(engine, ServingConfig(), max_pixels=10**6)
