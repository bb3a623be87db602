"""Shadow full depth on chosen numbers: sampled answers run again to the last exit on a
thread of their own, only while the model is idle, within a compute cap, and the
agreement with the early answer is what it should be."""

from __future__ import annotations

import time

import numpy as np
import pytest

from exitserve.server.policy import ExitResult
from exitserve.server.shadow import CREDIT_CAP, MIN_AGREEMENT_IMAGES, QUEUE_SIZE, ShadowRunner
from tests.support.processes import eventually
from tests.support.synthetic import SyntheticRuntime, as_normalized

EXITS = 3
AGREE = np.array([[0.9, 0.1]] * EXITS)  # every exit says class 0
DISAGREE = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])  # the last exit says class 1


def image(rows: np.ndarray) -> np.ndarray:
    return as_normalized(rows[None])[0]  # K x C x C, what the data plane hands over


def early(rows: np.ndarray, exit_index: int = 0, cost: float = 0.2) -> ExitResult:
    probs = rows[exit_index]
    return ExitResult(exit_index, exit_index + 1, probs, float(probs.max()), cost)


class Idle:
    def __init__(self, idle: bool = True) -> None:
        self.idle = idle

    def __call__(self) -> bool:
        return self.idle


def runner(runtime: SyntheticRuntime, idle: Idle, share: float = 1.0, max_cost_share: float = 1.0,
           skipped: list[str] | None = None) -> ShadowRunner:
    shadow = ShadowRunner("synthetic", runtime, EXITS, share=share, max_cost_share=max_cost_share, window=50,
                          is_idle=idle, on_skipped=(skipped.append if skipped is not None else None), seed=0,
                          credit_cap=1000.0)
    shadow.credit = 100.0  # tests of the cap set it themselves
    return shadow


def offer(shadow: ShadowRunner, rows: np.ndarray, count: int, exit_index: int = 0, cost: float = 0.2) -> None:
    images = np.stack([image(rows)] * count)
    shadow.offer(images, [early(rows, exit_index, cost)] * count)


def test_the_agreement_is_the_share_where_full_depth_answers_the_same() -> None:
    runtime = SyntheticRuntime()
    shadow = runner(runtime, Idle())
    shadow.start()
    try:
        offer(shadow, AGREE, 10)
        eventually(lambda: shadow.pending == 0, 10, "the first shadow runs")
        offer(shadow, DISAGREE, 10)
        eventually(lambda: shadow.images == 20, 10, "twenty shadow runs")
    finally:
        shadow.stop()
    assert shadow.agreement == pytest.approx(0.5)
    assert shadow.cost == pytest.approx(20.0)  # each from the image to the last exit
    assert {stage for stage, _ in runtime.calls} == set(range(EXITS))


def test_nothing_runs_while_the_model_is_busy() -> None:
    runtime = SyntheticRuntime()
    idle = Idle(False)
    shadow = runner(runtime, idle)
    shadow.start()
    try:
        offer(shadow, DISAGREE, 3)
        time.sleep(0.3)
        assert runtime.calls == [] and shadow.images == 0 and shadow.pending >= 2  # one may be taken, waiting
        idle.idle = True
        eventually(lambda: shadow.images == 3, 10, "the shadow runs once the model is idle")
    finally:
        shadow.stop()


def test_an_image_that_took_the_last_exit_agrees_at_no_cost() -> None:
    runtime = SyntheticRuntime()
    shadow = runner(runtime, Idle())
    offer(shadow, DISAGREE, MIN_AGREEMENT_IMAGES, exit_index=EXITS - 1, cost=1.0)  # not started: nothing may run
    assert shadow.images == MIN_AGREEMENT_IMAGES and shadow.cost == 0.0 and runtime.calls == []
    assert shadow.agreement == 1.0


def test_shadow_compute_stays_within_its_share_of_the_served_compute() -> None:
    skipped: list[str] = []
    shadow = ShadowRunner("synthetic", SyntheticRuntime(), EXITS, share=1.0, max_cost_share=0.02, window=50,
                          is_idle=Idle(False), on_skipped=skipped.append, seed=0)
    for _ in range(1000):
        offer(shadow, DISAGREE, 1, cost=0.25)  # 250 of served compute earns 5 runs
    queued = shadow.pending
    assert queued == 5
    assert queued * 1.0 <= 0.02 * 250
    assert skipped == ["cost_cap"] * (1000 - queued)


def test_an_idle_spell_saves_up_only_a_few_runs() -> None:
    shadow = ShadowRunner("synthetic", SyntheticRuntime(), EXITS, share=0.0, max_cost_share=1.0, window=50,
                          is_idle=Idle(False))
    shadow.share = 1e-12  # earn credit on a long stream without sampling it
    offer(shadow, AGREE, 1000, cost=1.0)
    assert shadow.credit == CREDIT_CAP


def test_a_full_queue_drops_the_oldest_and_refunds_it() -> None:
    skipped: list[str] = []
    shadow = runner(SyntheticRuntime(), Idle(False), skipped=skipped)
    offer(shadow, DISAGREE, QUEUE_SIZE + 5)
    assert shadow.pending == QUEUE_SIZE
    assert skipped == ["queue_full"] * 5
    assert shadow.credit == pytest.approx(100.0 + 0.2 * (QUEUE_SIZE + 5) - QUEUE_SIZE)


def test_the_share_samples_answers() -> None:
    shadow = runner(SyntheticRuntime(), Idle(False), share=0.1)
    offer(shadow, AGREE, 1000, exit_index=EXITS - 1, cost=1.0)  # free agreements: counted as sampled
    assert 60 <= shadow.images <= 140  # 100 expected; seeded


def test_a_failed_shadow_run_is_logged_and_the_next_one_runs() -> None:
    failures = iter([True])
    runtime = SyntheticRuntime(fail_when=lambda stage, rows: next(failures, False))
    shadow = runner(runtime, Idle())
    shadow.start()
    try:
        offer(shadow, AGREE, 2)
        eventually(lambda: shadow.images == 1 and shadow.pending == 0, 10, "the second shadow run")
    finally:
        shadow.stop()


def test_work_that_arrives_mid_run_waits_only_for_the_stage_under_way() -> None:
    idle = Idle()

    def busy_after_stage_0(stage: int, rows: np.ndarray) -> bool:
        if stage == 0:
            idle.idle = False  # a request arrives while stage 0 runs
        return False

    runtime = SyntheticRuntime(fail_when=busy_after_stage_0)
    shadow = runner(runtime, idle)
    shadow.start()
    try:
        offer(shadow, DISAGREE, 1)
        eventually(lambda: runtime.calls, 10, "stage 0 of the shadow run")
        time.sleep(0.3)
        assert [stage for stage, _ in runtime.calls] == [0] and shadow.images == 0
        idle.idle = True
        eventually(lambda: shadow.images == 1, 10, "the rest of the run once idle")
    finally:
        shadow.stop()
    assert [stage for stage, _ in runtime.calls] == list(range(EXITS)) and shadow.agreement is None
