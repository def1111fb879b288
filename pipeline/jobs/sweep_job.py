"""The sweep stage's work: every trial of the schedule x weighting sweep on Ray Tune
(`pipeline.cluster.ray_tune.run_sweep`), then what the study keeps of it: the trials table and the
best trial in results/sweep/ (`pipeline.artifacts.trials`), and the sweep's MLflow runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from pipeline.artifacts.trials import save_sweep
from pipeline.cluster import connection, ray_tune
from pipeline.core.config import ExperimentConfig, SweepConfig
from pipeline.core.tracking import Tracker
from pipeline.training.sweep_trials import (LiveTrialRuns, best_record, best_trial, log_sweep,
                                            trials_table)


@dataclass(frozen=True)
class SweepResult:
    """What `sweep_run` kept: the trials table, the best trial's record (None without a finished
    trial), the files written, and where Ray Tune left the trials' logs."""

    table: pd.DataFrame
    best: Optional[dict[str, Any]]
    record: dict[str, Any]
    paths: list[Path]
    tune_path: str  # a path or a URI
    tune_wall_s: float  # Tuner.fit
    wall_s: float  # the whole sweep, Ray's start-up included


def describe(cfg: SweepConfig, base: ExperimentConfig, num_trials: int) -> str:
    """One line on what the sweep will run."""
    grid = " x ".join(f"{len(getattr(cfg, axis.values))} {axis.values}" for axis in cfg.axes)
    return (f"sweep: {num_trials} trials of {base.name} ({cfg.search} search over {grid}), "
            f"{cfg.steps} steps each, {ray_tune.concurrent_trials(cfg)} at a time; the best "
            f"1/{cfg.reduction_factor:g} on the validation nll_bpd go on at steps "
            f"{', '.join(map(str, cfg.rung_steps())) or '(no rung)'}")


def sweep_run(cfg: SweepConfig, base: ExperimentConfig, num_trials: int, probe, storage: str,
              tracker: Tracker, out_dir: Path) -> SweepResult:
    """Run the sweep's trials (`probe`: what each trial measures with, `trial_probe`) with Ray
    Tune storage `storage`; write trials.csv and best.yaml in `out_dir` and log the sweep's
    parent run, a nested run per trial and the two files."""
    print(connection.connect(), flush=True)
    print(describe(cfg, base, num_trials), flush=True)
    start = time.monotonic()
    try:
        live = LiveTrialRuns(tracker, ray_tune.sweep_name(cfg, base), cfg.base_experiment,
                             cfg.axes)
        run = ray_tune.run_sweep(cfg, base, storage, probe, seed=base.seed, num_trials=num_trials,
                             live=live)
    finally:
        connection.shutdown()
    table = trials_table(run.trials, cfg)
    parent, _ = log_sweep(tracker, run.name, cfg, base, run.trials, table, run.wall_s)
    best = best_trial(table)
    record = {**best_record(best, table, cfg, base), "sweep": run.name}
    paths = save_sweep(out_dir, table, record)
    for path in paths:
        tracker.log_artifact(parent, path, "sweep")
    return SweepResult(table=table, best=best, record=record, paths=paths,
                       tune_path=run.path, tune_wall_s=run.wall_s,
                       wall_s=time.monotonic() - start)
