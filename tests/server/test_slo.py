"""The latency objective's controller on synthetic latency traces, with a fake clock:
steps down under pressure, back up when it eases, holds still in noise, does not
oscillate against a plant whose latency follows the budget, and holds while the admission
line has requests waiting."""

from __future__ import annotations

import random

import pytest

from exitserve.server.slo import LatencyObjective, ladder_for
from tests.support.clock import FakeClock

LADDER = [0.25, 0.225, 0.2, 0.18, 0.16, 0.14, 0.11]
OBJECTIVE = 50.0


def make(**kwargs) -> tuple[LatencyObjective, FakeClock]:
    clock = FakeClock()
    return LatencyObjective(OBJECTIVE, LADDER, clock=clock, **kwargs), clock


def run(objective: LatencyObjective, clock: FakeClock, latency_of_step, seconds: float, waiting: int = 0,
        per_second: int = 200) -> list[int]:
    """Answer ``per_second`` requests a second for ``seconds``, each with the latency the
    plant gives at the controller's current step; the step after every answer."""
    steps = []
    for _ in range(int(seconds * per_second)):
        clock.now += 1 / per_second
        objective.observe_request(latency_of_step(objective.step), waiting)
        steps.append(objective.step)
    return steps


def changes(steps: list[int]) -> int:
    return sum(a != b for a, b in zip(steps, steps[1:]))


def test_ladder_runs_from_the_configured_budget_down_to_the_floor() -> None:
    curve = [0.114, 0.136, 0.158, 0.181, 0.203, 0.225, 0.247, 0.269, 0.5, 1.0]
    assert ladder_for(curve, 0.25, None) == [0.25, 0.247, 0.225, 0.203, 0.181, 0.158, 0.136, 0.114]
    assert ladder_for(curve, 0.25, 0.15) == [0.25, 0.247, 0.225, 0.203, 0.181, 0.158]
    assert ladder_for(curve, 0.114, None) == [0.114]  # nothing below: the objective can only shed


def test_steps_down_under_pressure_and_back_up_when_it_eases() -> None:
    objective, clock = make()
    assert objective.budget_cap is None
    down = run(objective, clock, lambda step: 80.0, seconds=2)  # the objective is missed
    assert objective.at_floor and objective.budget_cap == LADDER[-1]
    assert down == sorted(down)  # only ever down while it is missed
    first = down.index(next(s for s in down if s > 0))
    assert first <= 200 * objective.interval_s + 1  # within the first interval
    last_down, calm_from = objective.last_step_down, clock.now
    up = run(objective, clock, lambda step: 10.0, seconds=30)  # pressure gone
    assert objective.step == 0 and objective.budget_cap is None
    assert up == sorted(up, reverse=True)  # only ever up once it eased
    # one step per hold period, and the first no sooner than the cool-down after the last step down
    first_up = calm_from + (up.index(next(s for s in up if s < len(LADDER) - 1)) + 1) / 200
    assert first_up - last_down >= objective.cooldown_s
    assert first_up - calm_from >= objective.hold * objective.interval_s


def test_when_answers_stop_the_ticks_alone_bring_it_back() -> None:
    """The burst ends and nothing comes: ticks with an empty queue (the service's ticker)
    must step it back up, whatever the last batch's run time was."""
    objective, clock = make()
    objective.observe_batch(images=32, run_ms=40.0)  # a long last batch: over LOW x the objective by itself
    run(objective, clock, lambda step: 200.0, seconds=2)
    assert objective.at_floor
    for _ in range(int(30 / objective.interval_s)):
        clock.now += objective.interval_s
        objective.tick(waiting_images=0)
    assert objective.step == 0


def test_noise_inside_the_band_moves_nothing() -> None:
    objective, clock = make()
    rng = random.Random(1)
    steps = run(objective, clock, lambda step: rng.uniform(0.55, 0.78) * OBJECTIVE, seconds=60)
    assert changes(steps) == 0 and objective.step == 0


def test_no_oscillation_against_a_plant_that_follows_the_budget() -> None:
    """Latency falls as the budget does: over the objective at the top two steps, inside the
    band from step 2 on, noisy. The controller must settle, not hunt."""
    objective, clock = make()
    rng = random.Random(7)
    plant = {0: 90.0, 1: 60.0}

    def latency(step: int) -> float:
        return plant.get(step, 32.0 - 2 * step) * rng.uniform(0.9, 1.1)

    steps = run(objective, clock, latency, seconds=120)
    settled = steps[len(steps) // 4:]
    assert changes(settled) == 0
    assert 2 <= objective.step <= 3  # as high as holds the objective, not the floor


def test_load_step_down_then_up_tracks_without_overshoot() -> None:
    """A load step (overload for 10 s, then calm): the budget goes down during it, and
    returns to the configured budget after it, never above."""
    objective, clock = make()
    run(objective, clock, lambda step: 40.0, seconds=5)  # in the band: untouched
    assert objective.step == 0
    during = run(objective, clock, lambda step: 120.0 if step < 4 else 35.0, seconds=10)
    assert during[-1] >= 4 and changes(during[len(during) // 2:]) == 0
    low = during[-1]
    after = run(objective, clock, lambda step: 12.0, seconds=30)
    assert after[-1] == 0 and objective.budget_cap is None  # the configured budget, uncapped
    # back up one step at a time and never down again: each of the `low` steps taken once, so
    # it neither stalls below the configured budget nor hunts around it
    path = [low, *after]
    assert all(b - a in (0, -1) for a, b in zip(path, path[1:])) and changes(path) == low
    # no faster than the hold period allows: each step up needs `hold` calm intervals
    reached = [path.index(step) for step in range(low, -1, -1)]
    per_hold = objective.hold * objective.interval_s * 200  # answers in one hold period
    assert all(b - a >= per_hold - 1 for a, b in zip(reached[1:], reached[2:]))


def test_the_queue_prediction_leads_the_observed_latency() -> None:
    """Answers still come back fast, but the queue behind them would miss the objective:
    step down before anyone misses it."""
    objective, clock = make()
    objective.observe_batch(images=32, run_ms=8.0)  # 0.25 ms per image
    run(objective, clock, lambda step: 5.0, seconds=0.5, waiting=400)  # 400 x 0.25 + 8 = 108 ms predicted
    assert objective.step > 0
    assert objective.signal_ms == pytest.approx(108.0)


def test_event_loop_lag_counts_before_the_app_sees_anything() -> None:
    """Answers look fast and nothing waits in the model's queue, but the event loop runs
    its timers 60 ms late: requests wait there, unseen. Step down to the floor."""
    objective, clock = make()
    objective.observe_batch(images=32, run_ms=8.0)
    objective.observe_loop_lag(60.0)
    run(objective, clock, lambda step: 5.0, seconds=3)
    assert objective.at_floor and objective.signal_ms == pytest.approx(60.0)


def test_requests_waiting_in_the_admission_line_hold_the_budget_down() -> None:
    """At the floor the admission line limits who is inside, so the answers look fast; while
    requests still wait in it, the demand the budget was cut for is there: no step up."""
    objective, clock = make()
    run(objective, clock, lambda step: 80.0, seconds=2)
    assert objective.at_floor
    for _ in range(30 * 200):  # 30 s of fast answers, with requests waiting in line
        clock.now += 1 / 200
        objective.observe_request(5.0, 0, pressure=True)
    assert objective.at_floor
    run(objective, clock, lambda step: 5.0, seconds=30)  # the line emptied: back up
    assert objective.step == 0


def test_attainment_counts() -> None:
    objective, clock = make()
    run(objective, clock, lambda step: 10.0, seconds=1)
    run(objective, clock, lambda step: 60.0, seconds=0.5)
    assert (objective.within, objective.missed) == (200, 100)


def test_rejects_a_nonsense_objective() -> None:
    with pytest.raises(ValueError):
        LatencyObjective(0, LADDER)
    with pytest.raises(ValueError):
        LatencyObjective(10, [])


# ---------------------------------------------------------------------------- with the policy


def test_the_objective_caps_the_policy_and_pauses_the_online_controller() -> None:
    import numpy as np

    from exitserve.server.errors import InvalidOptions
    from exitserve.server.policy import ExitPolicy
    from tests.support.synthetic import synthetic_calibration, synthetic_manifest

    policy = ExitPolicy(synthetic_manifest(), synthetic_calibration(), default_budget=0.5)
    objective = policy.attach_objective(50.0)
    assert objective.ladder == [0.5, 0.2]
    assert policy.effective_budget == 0.5  # no pressure: the configured budget
    policy.observe_default_budget_costs([0.4] * 50)  # under target: the online controller raises its budget
    free = policy.controller.effective
    assert free > 0.5 and policy.effective_budget == free

    objective.step = 1  # under pressure
    assert policy.effective_budget == 0.2
    np.testing.assert_array_equal(policy.thresholds_for(None), policy.thresholds_for(0.2))
    policy.observe_default_budget_costs([0.2] * 500)  # capped: the controller must not wind up
    assert policy.controller.effective == free
    assert policy.request_budget(1.0, may_lower=False) == 1.0  # a request's own budget is kept ...
    assert policy.request_budget(1.0, may_lower=True) == 0.2  # ... unless the operator allows lowering it
    assert policy.request_budget(0.1, may_lower=True) == 0.1  # never raised

    objective.step = 0
    assert policy.effective_budget == free

    with pytest.raises(InvalidOptions):
        ExitPolicy(synthetic_manifest(), None, default_budget=0.5).attach_objective(50.0)
    with pytest.raises(InvalidOptions):
        ExitPolicy(synthetic_manifest(), synthetic_calibration(), default_budget=0.5).attach_objective(50.0, floor=0.6)
