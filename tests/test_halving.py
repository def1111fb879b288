"""The synchronous successive-halving scheduler (pipeline/cluster/halving.py), driven by a small
simulation of Ray Tune's controller: trials that report (step, metric) pairs, run a few at a
time in a random order, pause, stop and are restored as Tune does. Its decisions must depend on
the metrics alone: the same outcome for every concurrency, every arrival order and every point
at which the sweep is stopped and restored."""

from __future__ import annotations

import math
import random

import pytest

pytest.importorskip("ray.tune")

from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import TrialScheduler  # noqa: E402

from pipeline.cluster.halving import SynchronousHalving  # noqa: E402


class FakeTrial:
    """What the scheduler reads of a Tune trial."""

    def __init__(self, index: int, reports: list[tuple[int, float]]):
        self.trial_id = f"abc_{index:05d}"
        self.reports = reports  # (step, metric) of every report, in order
        self.done = 0  # reports made so far
        self.status = Trial.PENDING
        self.last_result: dict = {}

    def set_status(self, status):
        self.status = status

    def __repr__(self):
        return f"{self.trial_id}({self.status}, {self.done})"


class FakeController:
    """Tune's controller as the scheduler sees it: trials, stop_trial, and a loop that runs
    at most `concurrency` trials at a time, advancing a random running trial by one report."""

    def __init__(self, scheduler: SynchronousHalving, concurrency: int, seed: int):
        self.scheduler, self.concurrency = scheduler, concurrency
        self.rng = random.Random(seed)
        self.trials: list[FakeTrial] = []
        self.most_running = 0

    def get_trials(self):
        return list(self.trials)

    def add(self, trial: FakeTrial) -> None:
        self.trials.append(trial)
        self.scheduler.on_trial_add(self, trial)

    def stop_trial(self, trial: FakeTrial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED

    def step(self, max_events: int | None = None) -> bool:
        """Run until every trial ended (True), or for `max_events` reports (False)."""
        events = 0
        while any(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in self.trials):
            if max_events is not None and events >= max_events:
                return False
            running = [t for t in self.trials if t.status == Trial.RUNNING]
            while len(running) < self.concurrency:
                chosen = self.scheduler.choose_trial_to_run(self)
                if chosen is None:
                    break
                chosen.status = Trial.RUNNING
                running.append(chosen)
            assert running, f"nothing runs, nothing can start: {self.trials}"
            self.most_running = max(self.most_running, len(running))
            trial = self.rng.choice(running)
            step, value = trial.reports[trial.done]
            trial.done += 1
            trial.last_result = {"step": step, "nll": value, "status": "ok"}
            if not math.isfinite(value):
                trial.last_result["status"] = "unstable"
            decision = self.scheduler.on_trial_result(self, trial, dict(trial.last_result))
            events += 1
            finished = trial.done == len(trial.reports) or not math.isfinite(value)
            if decision == TrialScheduler.STOP or (finished and decision != TrialScheduler.PAUSE):
                trial.status = Trial.TERMINATED
                self.scheduler.on_trial_complete(self, trial, trial.last_result)
            elif decision == TrialScheduler.PAUSE:
                trial.status = Trial.PAUSED
        return True


MAX_T, REPORT = 120, 30


def make_trials(values_at: dict[int, list[float]], n: int) -> list[FakeTrial]:
    """n trials reporting every 30 steps up to 120; trial i's metric at step s is
    values_at[s][i]."""
    return [FakeTrial(i, [(s, values_at[s][i]) for s in range(REPORT, MAX_T + 1, REPORT)])
            for i in range(n)]


def outcome(trials) -> dict[str, tuple[str, int]]:
    return {t.trial_id: (t.status, t.last_result.get("step")) for t in trials}


def run(values_at, n, *, concurrency, seed, grace=60, rf=2.0):
    scheduler = SynchronousHalving("step", "nll", "min", MAX_T, [grace], rf, num_trials=n)
    controller = FakeController(scheduler, concurrency, seed)
    trials = make_trials(values_at, n)
    for trial in trials:
        controller.add(trial)
    assert controller.step()
    return outcome(trials), scheduler


def random_values(n: int, seed: int) -> dict[int, list[float]]:
    rng = random.Random(seed)
    return {s: [rng.uniform(2.0, 5.0) for _ in range(n)] for s in range(REPORT, MAX_T + 1, REPORT)}


def test_the_best_half_at_the_rung_goes_on_and_the_rest_stop_there():
    n = 8
    values = random_values(n, seed=1)
    result, scheduler = run(values, n, concurrency=2, seed=0)
    at_rung = values[60]
    best = sorted(range(n), key=lambda i: at_rung[i])[:4]
    for i in range(n):
        status, step = result[f"abc_{i:05d}"]
        assert status == Trial.TERMINATED
        assert step == (MAX_T if i in best else 60), (i, at_rung)
    assert scheduler.decisions() == {60: sorted(f"abc_{i:05d}" for i in best)}


@pytest.mark.parametrize("concurrency", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decisions_do_not_depend_on_concurrency_or_arrival_order(concurrency, seed):
    n = 7  # keep ceil(7 / 2) = 4
    values = random_values(n, seed=5)
    reference, _ = run(values, n, concurrency=8, seed=123)
    result, _ = run(values, n, concurrency=concurrency, seed=seed)
    assert result == reference
    assert sum(step == MAX_T for _, step in result.values()) == 4


def test_several_rungs_halve_again_and_ties_go_to_the_trial_created_first():
    n = 6
    values = {s: [3.0] * n for s in range(10, 91, 10)}  # all tied everywhere
    scheduler = SynchronousHalving("step", "nll", "min", 90, [10, 30], 3.0, num_trials=n)
    controller = FakeController(scheduler, 2, seed=4)
    trials = [FakeTrial(i, [(s, values[s][i]) for s in range(10, 91, 10)]) for i in range(n)]
    for trial in trials:
        controller.add(trial)
    assert controller.step()
    # rung 10: 2 of 6 go on; rung 30: 1 of 2 goes on; the first created wins each tie
    assert scheduler.decisions() == {10: ["abc_00000", "abc_00001"], 30: ["abc_00000"]}
    assert [t.last_result["step"] for t in trials] == [90, 30, 10, 10, 10, 10]


def test_a_trial_that_diverges_before_the_rung_does_not_hold_the_others():
    n = 4
    values = random_values(n, seed=3)
    values[30][2] = math.nan  # trial 2 diverges at its first report
    result, scheduler = run(values, n, concurrency=2, seed=0)
    assert result["abc_00002"] == (Trial.TERMINATED, 30)
    survivors = sorted((i for i in range(n) if i != 2), key=lambda i: values[60][i])[:2]
    assert scheduler.decisions() == {60: sorted(f"abc_{i:05d}" for i in survivors)}


@pytest.mark.parametrize("stale", [False, True])
@pytest.mark.parametrize("stop_after", [1, 3, 5, 8, 10, 13, 15])
def test_a_sweep_stopped_and_restored_takes_the_uninterrupted_decisions(stop_after, stale,
                                                                       tmp_path):
    """Restored as Tune does it: unfinished trials come back pending with their last result
    (a running trial resumes from its checkpoint of that report), newest result first, under a
    new scheduler that reads the decisions kept in storage. With `stale`, the trials a decision
    stopped while they were paused come back as paused ones, as Tune's saved state can have
    them."""
    n = 5
    values = random_values(n, seed=11)
    reference, _ = run(values, n, concurrency=2, seed=0)
    state = str(tmp_path / "halving.json")

    first = SynchronousHalving("step", "nll", "min", MAX_T, [60], 2.0, num_trials=n,
                               state_path=state)
    controller = FakeController(first, 2, seed=0)
    trials = make_trials(values, n)
    for trial in trials:
        controller.add(trial)
    assert not controller.step(max_events=stop_after), "the sweep ended before the stop"
    for trial in trials:
        stopped_at_rung = trial.status == Trial.TERMINATED and trial.done < len(trial.reports)
        if trial.status in (Trial.RUNNING, Trial.PAUSED) or (stale and stopped_at_rung):
            trial.status = Trial.PENDING
    second = SynchronousHalving("step", "nll", "min", MAX_T, [60], 2.0, num_trials=n,
                                state_path=state)
    restored = FakeController(second, 3, seed=9)
    for trial in sorted(trials, key=lambda t: -t.done):
        restored.add(trial)
    assert restored.step()
    assert outcome(trials) == reference


def test_at_most_max_running_trials_run_at_once_and_the_outcome_is_the_same():
    n = 6
    values = random_values(n, seed=8)
    reference, _ = run(values, n, concurrency=6, seed=0)
    scheduler = SynchronousHalving("step", "nll", "min", MAX_T, [60], 2.0, num_trials=n,
                                   max_running=1)
    controller = FakeController(scheduler, 6, seed=3)  # resources for all six at once
    trials = make_trials(values, n)
    for trial in trials:
        controller.add(trial)
    assert controller.step()
    assert controller.most_running == 1
    assert outcome(trials) == reference
