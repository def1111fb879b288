"""Synchronous successive halving, a Ray Tune `TrialScheduler` whose decisions depend on step
counts and metric values alone.

Successive halving (Jamieson & Talwalkar 2016; one bracket of Li et al. 2018's Hyperband): every
trial trains to the first rung, the best 1/rf of them go on to the next rung, and so on up to
`max_t`. Ray Tune's `ASHAScheduler` decides asynchronously (a trial that reaches a rung is compared
with the trials that reached it before), so which trials it stops depends on timing, on the
cluster's size and load; its `HyperBandScheduler` is synchronous but splits the trials into
brackets of its own sizes, so that a sweep's cells are not all compared at one rung. Here a
trial that reaches a rung waits there, paused (its checkpoint of that step kept), until every
trial of the sweep has reached it or ended; then the best ceil(n / rf) of the n trials at the
rung go on and the others stop. Ties go to the trial created first. The same metrics give the
same decisions however many trials run at once and in whatever order they arrive.

Every trial waits, paused, until the scheduler starts it (`choose_trial_to_run`), so that it
alone decides how many run at once (`max_running`): Tune would start every pending trial that
the resources hold.

A stopped sweep restored with `Tuner.restore` gives Tune's trials back with their last results,
but Ray Tune keeps no scheduler state, and the trial states it saved can be older than the
decisions (a trial stopped while paused is saved as paused). So each decision is written, as it
is taken, to `state_path` (the trials that go on from each rung), and a restored sweep reads it:
a trial waiting at a decided rung goes on or stops as decided, an undecided rung is decided
from the trials' results once every trial has reached it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from pipeline.core.io import list_storage, read_from_storage, write_to_storage
from pipeline.core.sweep_axes import cell_label


class SynchronousHalving(FIFOScheduler):
    """Successive halving over the `num_trials` trials of a sweep (see the module's docstring).

    `time_attr` is the reported progress (training steps), `rungs` the steps where trials are
    compared (each one a step that trials report at: `SweepConfig.rung_steps`), `metric` /
    `mode` what ranks them there, `max_t` where trials end by themselves; at most `max_running`
    trials run at once (None: as many as the resources hold). A trial that reports a non-finite
    metric at a rung is stopped. Ties go to the lower trial id (Tune numbers a sweep's trials in
    the order it creates them). `state_path` (a storage path or URI) keeps the decisions."""

    def __init__(self, time_attr: str, metric: str, mode: str, max_t: int,
                 rungs: Sequence[int], reduction_factor: float, num_trials: int,
                 max_running: Optional[int] = None, state_path: Optional[str] = None):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._max_t, self._num_trials = max_t, num_trials
        self._rungs = sorted(r for r in rungs if r < max_t)
        self._rf = reduction_factor
        self._max_running = max_running
        self._state_path = state_path
        self._loaded = False
        self._trials: list[Trial] = []
        self._at_rung: dict[Trial, dict[int, float]] = {}  # trial -> {rung: metric there}
        self._kept: dict[int, set[str]] = {}  # decided rungs -> ids of the trials that go on
        self._ready: set[Trial] = set()  # paused trials free to start or go on
        self._to_stop: set[Trial] = set()  # restored trials a decision had stopped

    def decisions(self) -> dict[int, list[str]]:
        """The decided rungs and the ids of the trials that went on from each."""
        return {r: sorted(kept) for r, kept in sorted(self._kept.items())}

    def set_search_properties(self, metric: Optional[str], mode: Optional[str],
                              **spec) -> bool:
        return True  # metric and mode are this scheduler's own (TuneConfig's are the same)

    # ---------------------------------------------------------------------------------------
    # Tune's notifications
    # ---------------------------------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        """Every live trial waits, paused. A restored one whose last report is at a rung stays
        there until that rung is decided; one a decision had stopped is stopped."""
        if trial in self._at_rung:
            return
        self._load()
        self._trials.append(trial)
        self._at_rung[trial] = {}
        if trial.status == Trial.PENDING:
            trial.set_status(Trial.PAUSED)
            self._ready.add(trial)
        last = trial.last_result or {}
        step = last.get(self._time_attr)
        if step is None:
            return
        for rung in self._rungs:
            if step < rung:
                break
            self._at_rung[trial][rung] = self._value(last) if step == rung else math.nan
            kept = self._kept.get(rung)
            if kept is None and step == rung:
                self._ready.discard(trial)  # waits for the decision
            elif kept is not None and trial.trial_id not in kept:
                if trial.status == Trial.PAUSED:
                    self._ready.discard(trial)
                    self._to_stop.add(trial)
                break

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        step = result.get(self._time_attr)
        if step is None or step >= self._max_t:
            return TrialScheduler.CONTINUE
        for rung in self._rungs:
            if rung > step:
                break
            if rung in self._at_rung[trial]:
                continue
            self._at_rung[trial][rung] = self._value(result)
            self._decide(tune_controller, rung, current=trial)
            if rung not in self._kept:
                return TrialScheduler.PAUSE  # until every trial has reached this rung
            if trial.trial_id not in self._kept[rung]:
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._ready.discard(trial)
        self._to_stop.discard(trial)
        self._decide_all(tune_controller)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict[str, Any]) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        """The first paused trial free to start or go on, while fewer than `max_running` run."""
        self._decide_all(tune_controller)
        trials = tune_controller.get_trials()
        if self._max_running is not None and sum(
                t.status in (Trial.PENDING, Trial.RUNNING) for t in trials) >= self._max_running:
            return None
        for trial in trials:
            if trial.status == Trial.PAUSED and trial in self._ready:
                self._ready.discard(trial)
                return trial
        return None

    def debug_string(self) -> str:
        decided = ", ".join(f"{r}: {len(k)} go on" for r, k in sorted(self._kept.items()))
        return (f"Using synchronous successive halving: rungs {self._rungs} (max_t "
                f"{self._max_t}, rf {self._rf}); decided: {decided or 'none yet'}")

    # ---------------------------------------------------------------------------------------
    # The decision at a rung
    # ---------------------------------------------------------------------------------------

    def _value(self, result: dict[str, Any]) -> float:
        try:
            return float(result.get(self._metric))
        except (TypeError, ValueError):
            return math.nan

    def _ended(self, trial: Trial, current: Optional[Trial] = None) -> bool:
        return trial is not current and (trial in self._to_stop or trial.status in (
            Trial.TERMINATED, Trial.ERROR))

    def _decide_all(self, tune_controller) -> None:
        """Stop the restored trials a decision had stopped, decide the rungs that can be, and
        let a trial waiting at a decided rung go on if it was kept there."""
        for trial in list(self._to_stop):
            self._to_stop.discard(trial)
            tune_controller.stop_trial(trial)
        for rung in self._rungs:
            self._decide(tune_controller, rung)
            if rung not in self._kept:
                continue
            for trial in self._trials:
                if (trial.status == Trial.PAUSED and trial not in self._ready
                        and trial.trial_id in self._kept[rung]
                        and self._at_rung[trial] and max(self._at_rung[trial]) == rung):
                    self._ready.add(trial)

    def _decide(self, tune_controller, rung: int, current: Optional[Trial] = None) -> None:
        """Decide `rung` once every trial of the sweep exists and every live one reached it."""
        if rung in self._kept or len(self._trials) < self._num_trials:
            return
        if any(rung not in self._at_rung[t] and not self._ended(t, current)
               for t in self._trials):
            return
        sign = 1.0 if self._mode == "min" else -1.0
        ranked = sorted(
            (t for t in self._trials if rung in self._at_rung[t] and not self._ended(t, current)
             and math.isfinite(self._at_rung[t][rung])),
            key=lambda t: (sign * self._at_rung[t][rung], t.trial_id))
        self._kept[rung] = {t.trial_id for t in ranked[:math.ceil(len(ranked) / self._rf)]}
        self._save()
        configs = [getattr(t, "config", {}) for t in ranked]
        kept = len(self._kept[rung])
        print(decision_line(rung, configs[:kept], configs[kept:]), flush=True)
        for trial in self._trials:
            if trial is current or self._ended(trial, current) or rung not in self._at_rung[trial]:
                continue
            if trial.trial_id in self._kept[rung]:
                self._ready.add(trial)  # paused, or still saving its checkpoint
            else:
                tune_controller.stop_trial(trial)

    # ---------------------------------------------------------------------------------------
    # The decisions kept in storage
    # ---------------------------------------------------------------------------------------

    def _save(self) -> None:
        if self._state_path is not None:
            write_to_storage(self._state_path, json.dumps(
                {"kept": {str(r): sorted(k) for r, k in sorted(self._kept.items())}},
                indent=1).encode())

    def _load(self) -> None:
        if not self._loaded and self._state_path is not None:
            self._kept = load_decisions(self._state_path)
        self._loaded = True


def decision_line(rung: int, kept: list[dict], stopped: list[dict]) -> str:
    """`sweep: at step 200, 2 of 4 trials go on (cosine x uniform, linear x uniform); stopped:
    ...`: a rung's decision as the sweep prints it, best first."""
    def names(configs: list[dict]) -> str:
        return ", ".join(cell_label(c) for c in configs)

    total = len(kept) + len(stopped)
    return (f"sweep: at step {rung}, {len(kept)} of {total} trials go on ({names(kept)})"
            + (f"; stopped: {names(stopped)}" if stopped else ""))


def load_decisions(path: str) -> dict[int, set[str]]:
    """{rung: ids of the trials that went on from it} as `SynchronousHalving` kept them in
    `path` (none where the file is absent)."""
    folder, name = path.rsplit("/", 1)
    if name not in list_storage(folder):
        return {}
    state = json.loads(read_from_storage(path))
    return {int(r): set(k) for r, k in state["kept"].items()}
