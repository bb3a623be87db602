"""Per-stage latency with ONNX Runtime on the provider at hand."""

from __future__ import annotations

import time

import numpy as np

from server.repository import LatencySpec
from server.runtime import StagedModel


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return float(np.median(samples))


def measure_stage_latency(staged: StagedModel, image: np.ndarray, repeats: int = 20) -> list[LatencySpec]:
    """Median milliseconds of every stage at batch 1 and 64 (all images kept).

    ``image``: one normalized C x H x W input, repeated to fill the batch.
    """
    timings: dict[int, list[float]] = {k: [] for k in range(staged.num_stages)}
    for batch in (1, 64):
        carried: list = [np.repeat(image[None], batch, axis=0)]
        for k in range(staged.num_stages):
            inputs = carried
            outputs = []
            ms = _median_ms(lambda: outputs.append(staged.run_stage(k, inputs)), repeats if batch == 1 else max(3, repeats // 4))
            timings[k].append(ms)
            carried = outputs[-1].carried  # the next stage's input, from the last timed run
    return [
        LatencySpec(provider=staged.provider, batch_1_ms=round(t[0], 4), batch_64_ms=round(t[1], 4))
        for _, t in sorted(timings.items())
    ]
