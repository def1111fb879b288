"""The sweep on Ray Tune: a `Tuner` over a function trainable (`_tune_trial`) that runs the shared
per-worker training function, in the trial's own actor (one worker) or in a TorchTrainer of
its own (DDP trials); ASHA reads the reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.cluster.train import RaySession, TrainingError, code_digest, make_trainer
from pipeline.cluster.training import train_worker
from pipeline.core.config import ExperimentConfig, SweepConfig
from pipeline.core.io import storage_location

# --------------------------------------------------------------------------------------------
# The sweep: Ray Tune; a single-worker trial trains in its own actor, a DDP trial through a
# TorchTrainer of its own
# --------------------------------------------------------------------------------------------


# A DDP trial's own actor only drives its TorchTrainer (whose controller holds no CPU either):
# it asks for no CPU and a sliver of the head node's marker resource, as Ray Train's own state
# actor does. Trial drivers so run on the head node (the "safe node" Ray's docs advise for Train
# drivers), and the trial's workers hold every CPU / GPU. Tune refuses an all-zero request.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "node:__internal_head__": 0.001}
NLL_DEFAULTS = {"nll_bpd": float("nan")}  # an unstable run's last report has no NLL


def trial_resources(sweep: SweepConfig) -> dict[str, float]:
    """What a trial's Tune actor asks for: a single-worker trial trains there, so it holds the
    worker's CPUs (and GPU); a DDP trial's actor holds next to nothing (its workers do)."""
    if sweep.num_workers > 1:
        return TRIAL_DRIVER_RESOURCES
    return {"cpu": sweep.cpus_per_worker, "gpu": 1 if sweep.use_gpu else 0}


@dataclass
class SweepRun:
    table: Any  # pandas.DataFrame: ResultGrid.get_dataframe(), one row per trial
    trials: list  # of pipeline.cluster.sweep.TrialOutcome
    path: str     # the Tune experiment folder (a path or a URI)
    wall_s: float


def sweep_name(sweep: SweepConfig, base: ExperimentConfig) -> str:
    """Fixed per (study, sweep section, base experiment, training code)."""
    import dataclasses
    import hashlib
    import json

    blob = json.dumps([dataclasses.asdict(sweep), base.to_dict()], sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{base.study.name}-sweep-{digest}-{code_digest()}"


def _report_callback(defaults: dict[str, Any]):
    """A TuneReportCallback that fills metrics a report lacks (an unstable run's last report
    has no validation NLL), so that Tune's check for the scheduler's metric passes."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _FillingTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**defaults, **m} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return _FillingTuneReportCallback()


def _tune_trial(config: dict[str, Any], *, sweep: SweepConfig, base: ExperimentConfig,
                storage: str, probe: Callable) -> None:
    """One Tune trial: train `base` with this trial's schedule and weighting with the shared
    per-worker function and report to Tune. With one worker it trains right here, in the
    trial's actor (reused from trial to trial): no Train controller and worker processes to
    start, which cost about 25 s of a 2-core machine per trial. With several, a TorchTrainer of
    its own runs DDP and its reports are forwarded to Tune."""
    import ray.tune

    exp = sweep.trial_experiment(base, config["schedule"], config["weighting"])
    train_data = probe.train_data  # the prepared split itself (trial_probe), or its path
    if exp.train.num_workers == 1:
        with RaySession(threads=int(exp.train.cpus_per_worker), tune=True,
                        defaults=NLL_DEFAULTS) as session:
            train_worker(exp, train_data, session, checkpoint_root=session.checkpoint_root,
                         on_log=probe)
        return
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = make_trainer(exp, train_data, storage, name=trial_id, on_log=probe,
                           callbacks=[_report_callback(NLL_DEFAULTS)])
    trainer.fit()


def concurrent_trials(sweep: SweepConfig) -> int:
    """`sweep.max_concurrent_trials`, or where it is 0 as many trials as the cluster's CPUs (and
    GPUs, with `use_gpu`) can hold at once, so that no trial's Train run waits for workers."""
    import math

    import ray

    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 0.0) / (sweep.num_workers * sweep.cpus_per_worker)
    if sweep.use_gpu:
        fits = min(fits, resources.get("GPU", 0.0) / sweep.num_workers)
    return max(1, math.floor(fits + 1e-9))


def run_sweep(sweep: SweepConfig, base: ExperimentConfig, storage: str | Path,
              probe: Callable, seed: int = 0) -> SweepRun:
    """Ray Tune over `sweep.cells()` with ASHA on the validation NLL; returns every trial.
    Trials train on `probe.train_data` (`pipeline.cluster.sweep.trial_probe`).

    The Tune experiment lives in `<storage>/<sweep_name>` (a local or shared path, or a URI;
    a DDP trial's trainer checkpoints under its `trainers/` folder); an earlier run of the same
    name is replaced. Trials that
    fail are recorded (`TrialOutcome.error`), not retried by Tune (Ray Train retries the
    workers of a DDP trial). Single-worker trials reuse their actors from trial to trial.
    """
    import time

    import pandas as pd
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.cluster.sweep import METRIC, TrialOutcome
    from pipeline.core.io import delete_from_storage

    name = sweep_name(sweep, base)
    storage = storage_location(storage)
    experiment_path = f"{storage}/{name}"
    delete_from_storage(experiment_path)
    pick = ray.tune.grid_search if sweep.search == "grid" else ray.tune.choice
    param_space = {"schedule": pick(list(sweep.schedules)),
                   "weighting": pick(list(sweep.weightings))}
    trainable = ray.tune.with_parameters(  # each parameter goes to the object store once
        _tune_trial, sweep=sweep, base=base, storage=f"{experiment_path}/trainers",
        probe=probe)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, trial_resources(sweep)),
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=sweep.num_samples,
            scheduler=ASHAScheduler(time_attr="step", max_t=sweep.steps,
                                    grace_period=sweep.asha_grace_period,
                                    reduction_factor=sweep.asha_reduction_factor,
                                    stop_last_trials=False),
            search_alg=BasicVariantGenerator(max_concurrent=concurrent_trials(sweep),
                                             random_state=seed),
            reuse_actors=sweep.num_workers == 1),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )
    start = time.monotonic()
    grid = tuner.fit()
    wall = time.monotonic() - start
    analysis = ray.tune.ExperimentAnalysis(experiment_path)  # (grid's path has no scheme)
    unfinished = [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:  # Tuner.fit() returns after Ctrl-C / SIGTERM: no partial results for DVC
        raise TrainingError(f"the sweep was interrupted with {len(unfinished)} trial(s) "
                            f"unfinished; its trials are under {experiment_path}")
    configs = analysis.get_all_configs()
    trials = []
    for result in grid:
        config = result.config or configs.get(result.path) or {}
        history = result.metrics_dataframe
        trials.append(TrialOutcome(
            trial_id=str(result.metrics["trial_id"]),
            schedule=str(config.get("schedule")), weighting=str(config.get("weighting")),
            history=history if history is not None else pd.DataFrame(),
            last=dict(result.metrics or {}),
            error=_error_text(result.error) if result.error is not None else None,
            path=result.path))
    return SweepRun(table=grid.get_dataframe(), trials=trials, path=experiment_path,
                    wall_s=wall)


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
