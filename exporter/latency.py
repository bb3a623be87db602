"""Per-stage latency with ONNX Runtime on the provider at hand."""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from exitserve.repository.format import LatencySpec
from exitserve.repository.runtime import StagedModel


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
        runs = repeats if batch == 1 else max(3, repeats // 4)
        # every stage is timed on the inputs the untimed full-depth pass hands it
        for k, inputs, _ in staged.iter_stages(np.repeat(image[None], batch, axis=0)):
            timings[k].append(_median_ms(partial(staged.run_stage, k, inputs), runs))
    return [
        LatencySpec(provider=staged.provider, batch_1_ms=round(t[0], 4), batch_64_ms=round(t[1], 4))
        for _, t in sorted(timings.items())
    ]
