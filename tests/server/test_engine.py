"""The engine loop: synthetic runtime for the mechanics, the real exported model for
agreement with the offline (calibration) evaluation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from exitserve.repository.confidence import ALWAYS, NEVER, exits_taken
from exitserve.exporter.exit_table import exit_table
from exitserve.models.data import load_splits
from exitserve.server.engine import ModelEngine
from tests.support.clock import FakeClock
from tests.support.synthetic import SyntheticRuntime, probs_with_confidence, synthetic_engine


def test_each_run_returns_its_own_stage_timings() -> None:
    clock = FakeClock()
    engine = synthetic_engine(SyntheticRuntime(clock, stage_ms=[2.0, 3.0, 5.0]), clock=clock)
    images = probs_with_confidence(np.full((3, 3), 0.7))
    shallow = engine.run_thresholds(images, np.tile([0.5, 0.5, ALWAYS], (3, 1)))
    deep = engine.run_thresholds(images, np.tile([NEVER, NEVER, ALWAYS], (3, 1)))
    assert shallow.stage_ms == pytest.approx({0: 2.0})
    assert deep.stage_ms == pytest.approx({0: 2.0, 1: 3.0, 2: 5.0})


def test_overlapping_runs_do_not_mix_their_timings() -> None:
    """Two threads run the same engine at once (as the batcher and a batch job may): each
    result carries the stages it ran, nothing read back from shared state."""
    engine = synthetic_engine()
    images = probs_with_confidence(np.full((8, 3), 0.7))
    plans = {"shallow": np.tile([0.5, 0.5, ALWAYS], (8, 1)), "deep": np.tile([NEVER, NEVER, ALWAYS], (8, 1))}
    seen: dict[str, list[set[int]]] = {name: [] for name in plans}

    def work(name: str) -> None:
        for _ in range(300):
            seen[name].append(set(engine.run_thresholds(images, plans[name]).stage_ms))

    threads = [threading.Thread(target=work, args=(name,)) for name in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(stages == {0} for stages in seen["shallow"])
    assert all(stages == {0, 1, 2} for stages in seen["deep"])


def test_a_failing_stage_raises_out_of_the_run() -> None:
    runtime = SyntheticRuntime(fail_when=lambda stage, rows: stage == 1)
    engine = synthetic_engine(runtime)
    with pytest.raises(RuntimeError, match="stage 1 failed"):
        engine.run_thresholds(probs_with_confidence(np.full((2, 3), 0.6)), np.tile([NEVER, NEVER, ALWAYS], (2, 1)))


@pytest.mark.parametrize("binding", ["on", "off"])
def test_engine_matches_offline_evaluation(served_repository: Path, binding: str) -> None:
    """The engine's exits for given thresholds are exactly the calibration's offline exits."""
    folder = served_repository / "msdnet_fmnist"
    engine = ModelEngine.load(folder, default_budget=0.5, provider="cpu", io_binding=binding)
    assert engine.runtime.use_binding is (binding == "on")
    assert engine.runtime.provider == "CPUExecutionProvider"
    test = load_splits("fashion-mnist").test.subset(np.arange(300))
    table = exit_table(engine.runtime, engine.manifest, test, "max_softmax")
    images = engine.manifest.input.normalize(test.images)
    for budget in (0.2, 0.5, 1.0):
        thresholds = engine.policy.thresholds_for(budget)
        results = engine.run_thresholds(images, np.tile(thresholds, (300, 1))).results
        assert [r.exit_index for r in results] == exits_taken(table.conf, thresholds).tolist()
        offline_acc, offline_cost, _ = table.evaluate(thresholds)
        online_acc = np.mean([np.argmax(r.probs) == y for r, y in zip(results, test.labels)])
        assert online_acc == pytest.approx(offline_acc)
        assert np.mean([r.cost_fraction for r in results]) == pytest.approx(offline_cost)


def test_budgeted_batch_on_the_real_model_spends_its_budget(served_repository: Path) -> None:
    engine = ModelEngine.load(served_repository / "msdnet_fmnist", default_budget=0.5, provider="cpu")
    images = engine.manifest.input.normalize(load_splits("fashion-mnist").test.images[:200])
    steps = np.diff(engine.policy.costs)
    for budget in np.linspace(engine.policy.min_budget, 1.0, 7):
        results = engine.run_budgeted(images, float(budget)).results
        spent = sum(r.cost_fraction for r in results)
        assert len(results) == 200 and spent <= budget * 200 + 1e-9
        # unspent allowance is only what the calibrated thresholds chose not to use, or less than a step
        wanted_more = [r for r in results if r.exit_index < engine.num_exits - 1
                       and r.confidence < engine.policy.thresholds_for(float(budget))[r.exit_index]]
        if wanted_more:
            assert budget * 200 - spent < steps.max() + 1e-9
