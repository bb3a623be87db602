"""The exit policy on synthetic probabilities: no ONNX Runtime, no trained model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from exitserve.repository.confidence import ALWAYS, NEVER
from exitserve.server.errors import InvalidOptions
from exitserve.server.policy import BudgetController, BudgetedSchedule, StageLatency, ThresholdSchedule, point_for_budget
from tests.support.synthetic import (
    COSTS,
    FakeClock,
    SyntheticRuntime,
    probs_with_confidence,
    synthetic_calibration,
    synthetic_engine,
)

RNG = np.random.default_rng(0)


def run_budgeted(conf: np.ndarray, budget: float, thresholds: np.ndarray, costs=COSTS):
    runtime = SyntheticRuntime()
    engine = synthetic_engine(runtime, costs=costs)
    schedule = BudgetedSchedule(len(conf), budget, thresholds, np.asarray(costs), "max_softmax")
    return engine.run(probs_with_confidence(conf), schedule).results, runtime


def test_policy_imports_without_onnxruntime_or_fastapi() -> None:
    blocked = "import sys\nfor name in ('onnxruntime', 'fastapi', 'starlette', 'uvicorn'):\n    sys.modules[name] = None\n"
    code = blocked + "import exitserve.server.policy\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------- thresholds


def test_threshold_schedule_exits_at_the_first_confident_exit() -> None:
    conf = np.array([[0.95, 0.6, 0.6], [0.7, 0.92, 0.6], [0.6, 0.7, 0.55], [0.9, 0.99, 0.99]])
    thresholds = np.tile([0.9, 0.9, ALWAYS], (4, 1))
    runtime = SyntheticRuntime()
    engine = synthetic_engine(runtime)
    results = engine.run_thresholds(probs_with_confidence(conf), thresholds).results
    assert [r.exit_index for r in results] == [0, 1, 2, 0]  # 0.9 >= 0.9 leaves: the rule is >=
    assert [r.stages_run for r in results] == [1, 2, 3, 1]
    assert [r.cost_fraction for r in results] == [0.2, 0.5, 1.0, 0.2]
    assert [r.confidence for r in results] == pytest.approx([0.95, 0.92, 0.55, 0.9])
    assert runtime.calls == [(0, 4), (1, 2), (2, 1)]  # only the images still running run a stage


def test_per_image_thresholds_mix_in_one_batch() -> None:
    conf = np.full((3, 3), 0.7)
    thresholds = np.array([[0.5, 0.5, ALWAYS], [NEVER, 0.5, ALWAYS], [NEVER, NEVER, ALWAYS]])
    results = synthetic_engine().run_thresholds(probs_with_confidence(conf), thresholds).results
    assert [r.exit_index for r in results] == [0, 1, 2]


# ---------------------------------------------------------------------------- budgeted batch


@pytest.mark.parametrize("budget", [0.2, 0.27, 0.35, 0.5, 0.61, 0.8, 0.93])
def test_budgeted_batch_spends_its_budget_and_never_more(budget: float) -> None:
    """Everyone wants to go on (thresholds never met): the batch must use its allowance
    down to less than one image's next step, and never exceed it."""
    n = 50
    results, _ = run_budgeted(RNG.uniform(0.5, 1.0, (n, 3)), budget, np.array([NEVER, NEVER, ALWAYS]))
    spent = sum(r.cost_fraction for r in results)
    allowance = budget * n
    largest_step = max(np.diff(COSTS))
    assert spent <= allowance + 1e-9
    assert allowance - spent < largest_step + 1e-9, f"left {allowance - spent:.3f} of {allowance:.1f} unspent"


def test_budgeted_batch_continues_the_least_confident_first() -> None:
    n = 40
    conf = np.column_stack([RNG.permutation(np.linspace(0.5, 0.99, n)), np.full(n, 0.6), np.full(n, 0.6)])
    budget = 0.2 + 0.3 * 10 / n  # pays for exactly 10 images to run stage 1
    results, runtime = run_budgeted(conf, budget, np.array([NEVER, 0.0, ALWAYS]))
    went_on = {i for i, r in enumerate(results) if r.exit_index > 0}
    least_confident = set(np.argsort(conf[:, 0])[:10].tolist())
    assert went_on == least_confident
    assert runtime.calls == [(0, n), (1, 10)]


def test_budgeted_batch_lets_confident_images_leave_and_spends_on_the_rest() -> None:
    conf = np.array([[0.99, 0.6, 0.6]] * 5 + [[0.6, 0.6, 0.6]] * 5)
    results, _ = run_budgeted(conf, 0.6, np.array([0.9, NEVER, ALWAYS]))
    assert [r.exit_index for r in results[:5]] == [0] * 5  # confident: leave even though money is left
    assert all(r.exit_index > 0 for r in results[5:])


def test_budget_one_is_exactly_full_depth() -> None:
    engine = synthetic_engine()
    conf = RNG.uniform(0.5, 1.0, (30, 3))
    results = engine.run_budgeted(probs_with_confidence(conf), 1.0).results
    assert [r.exit_index for r in results] == [2] * 30
    assert all(r.cost_fraction == 1.0 for r in results)


def test_budgeted_batch_refuses_a_budget_below_the_first_exit() -> None:
    engine = synthetic_engine()
    with pytest.raises(InvalidOptions, match="below the cost of the first exit") as caught:
        engine.run_budgeted(probs_with_confidence(np.full((2, 3), 0.7)), 0.1)
    assert caught.value.code == "invalid_budget"


# ---------------------------------------------------------------------------- deadlines


def deadline_run(conf: np.ndarray, deadlines_ms: list[float]):
    clock = FakeClock()
    runtime = SyntheticRuntime(clock, stage_ms=[1.0, 1.0, 1.0])
    engine = synthetic_engine(runtime, clock=clock)
    thresholds = np.tile([NEVER, NEVER, ALWAYS], (len(conf), 1))
    deadlines = np.array([d / 1000 for d in deadlines_ms])
    return engine.run_thresholds(probs_with_confidence(conf), thresholds, deadlines).results, runtime


def test_deadline_in_the_middle_answers_with_the_best_exit_so_far() -> None:
    """Stages take 1 ms each and the predictor says so: with 2.5 ms, stage 2 (ending at
    3 ms) would be late. Exit 0 was surer than exit 1, so exit 0 answers, at the cost of
    the two stages run."""
    conf = np.array([[0.9, 0.7, 0.99]])
    (result,), runtime = deadline_run(conf, [2.5])
    assert result.deadline_hit and result.stages_run == 2
    assert result.exit_index == 0 and result.confidence == pytest.approx(0.9)
    assert result.cost_fraction == 0.5
    np.testing.assert_allclose(result.probs, [0.9, 0.1], rtol=1e-6)
    assert runtime.calls == [(0, 1), (1, 1)]


def test_mixed_deadlines_in_one_batch() -> None:
    conf = np.array([[0.6, 0.7, 0.8]] * 4)
    results, runtime = deadline_run(conf, [float("inf"), 2.5, 1.5, 60_000])
    assert [r.stages_run for r in results] == [3, 2, 1, 3]
    assert [r.deadline_hit for r in results] == [False, True, True, False]
    assert [r.exit_index for r in results] == [2, 1, 0, 2]  # confidence rises with depth here
    assert [r.cost_fraction for r in results] == [1.0, 0.5, 0.2, 1.0]
    assert runtime.calls == [(0, 4), (1, 3), (2, 2)]


def test_latency_predictor_interpolates_learns_and_caps() -> None:
    latency = StageLatency(batch_1_ms=1.0, batch_64_ms=64.0)
    assert latency.predict_ms(1) == 1.0 and latency.predict_ms(64) == 64.0 and latency.predict_ms(0) == 1.0
    assert latency.predict_ms(32) == pytest.approx(32.0)
    latency.observe(1, 3.0)  # three times slower than predicted
    assert latency.ratio == pytest.approx(1.2)
    assert latency.predict_ms(64) == pytest.approx(64 * 1.2)
    latency.observe(1, 10_000.0)  # one pathological stall moves the ratio toward the cap, not to 10,000
    assert latency.ratio == pytest.approx(1.2 + 0.1 * (StageLatency.MAX_RATIO - 1.2))


def test_engine_feeds_the_latency_predictor_with_measured_stage_times() -> None:
    clock = FakeClock()
    engine = synthetic_engine(SyntheticRuntime(clock, stage_ms=[3.0, 3.0, 3.0]), clock=clock)
    run = engine.run_thresholds(probs_with_confidence(np.full((1, 3), 0.6)), np.array([[NEVER, NEVER, ALWAYS]]))
    assert run.stage_ms == pytest.approx({0: 3.0, 1: 3.0, 2: 3.0})
    assert [lat.ratio for lat in engine.policy.latency] == pytest.approx([1.2, 1.2, 1.2])


# ---------------------------------------------------------------------------- budgets and the controller


def test_budget_lookup_never_overspends() -> None:
    calibration = synthetic_calibration()
    assert point_for_budget(calibration, 0.49).budget == 0.2
    assert point_for_budget(calibration, 0.5).budget == 0.5
    assert point_for_budget(calibration, 0.99).budget == 0.5
    assert point_for_budget(calibration, 1.0).budget == 1.0
    assert point_for_budget(calibration, 0.01).budget == 0.2  # below the curve: the cheapest point


def test_uncalibrated_model_runs_full_depth() -> None:
    engine = synthetic_engine(calibrated=False)
    np.testing.assert_array_equal(engine.policy.thresholds_for(0.3), [NEVER, NEVER, ALWAYS])
    assert engine.policy.expected_accuracy(0.3) is None


def test_explicit_thresholds() -> None:
    policy = synthetic_engine().policy
    np.testing.assert_array_equal(policy.explicit_thresholds([0.5, 0.6]), [0.5, 0.6, ALWAYS])
    for wrong in ([0.5], [0.5, 0.6, 0.9]):  # one too few, one too many: refused, never cut
        with pytest.raises(InvalidOptions, match="give exactly 2 thresholds") as caught:
            policy.explicit_thresholds(wrong)
        assert caught.value.code == "invalid_thresholds"


def test_controller_moves_both_ways_and_stays_in_bounds() -> None:
    controller = BudgetController(target=0.4, floor=0.2)
    controller.observe([0.7] * 20)  # traffic costs more than the target: spend less per image
    assert controller.effective < 0.4
    lowered = controller.effective
    controller.observe([0.21] * 200)  # now cheaper than the target: allowed to spend more again
    assert controller.effective > lowered
    for _ in range(100):
        controller.observe([1.0] * 50)
    assert controller.effective == 0.2  # never below the first exit's cost
    for _ in range(200):
        controller.observe([0.2] * 50)
    assert controller.effective == 1.0  # never above full depth


def test_controller_holds_still_on_target() -> None:
    controller = BudgetController(target=0.4, floor=0.2)
    controller.observe([0.4] * 100)
    assert controller.effective == pytest.approx(0.4) and controller.measured == pytest.approx(0.4)


def test_default_budget_thresholds_follow_the_controller() -> None:
    engine = synthetic_engine(default_budget=0.5, online_budget=True)
    np.testing.assert_array_equal(engine.policy.thresholds_for(None), [0.8, 0.8, ALWAYS])
    engine.policy.observe_default_budget_costs([1.0] * 100)
    assert engine.policy.effective_budget < 0.5
    np.testing.assert_array_equal(engine.policy.thresholds_for(None), [ALWAYS, ALWAYS, ALWAYS])
    np.testing.assert_array_equal(engine.policy.thresholds_for(0.5), [0.8, 0.8, ALWAYS])  # named budgets unmoved


def test_threshold_schedule_needs_predictors_for_deadlines() -> None:
    with pytest.raises(ValueError, match="latency predictor"):
        ThresholdSchedule(np.zeros((1, 3)), np.asarray(COSTS), "max_softmax", deadlines=np.array([1.0]))
