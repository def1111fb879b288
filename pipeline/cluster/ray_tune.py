"""The sweep on Ray Tune: a `Tuner` over a function trainable (`_tune_trial`) that runs the shared
per-worker training function, in the trial's own actor (one worker) or in a TorchTrainer of
its own (DDP trials); synchronous successive halving (`pipeline.cluster.halving`) reads the
reports, so the sweep's decisions depend on its metrics alone.

A sweep lives in `<storage>/<sweep_name>`, named by its recipe (the sweep section and the base
experiment without their resources, and the training code): run again after a stop, it is
restored with `Tuner.restore` (finished trials kept, unfinished and failed ones resumed from
their last checkpoint); a changed recipe starts a sweep of another name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from pipeline.cluster.halving import SynchronousHalving, load_decisions
from pipeline.cluster.ray_train import RaySession, TrainingError, code_digest, make_trainer
from pipeline.core import logs
from pipeline.core.config import ExperimentConfig, SweepConfig
from pipeline.core.errors import UserError
from pipeline.core.sweep_axes import cell_label, cell_of
from pipeline.core.io import (delete_from_storage, list_storage, read_from_storage, sha256_hex,
                              storage_location, write_to_storage)
from pipeline.training.loop import train_worker
from pipeline.training.sweep_trials import METRIC, TrialOutcome

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
    name: str     # sweep_name: the sweep's recipe
    trials: list  # of pipeline.training.sweep_trials.TrialOutcome
    path: str     # the Tune experiment folder (a path or a URI)
    wall_s: float


# What changes where and how fast a sweep runs, not what it finds: left out of its name, so that
# a sweep restored with other resources continues.
SWEEP_RESOURCES = ("max_concurrent_trials", "cpus_per_worker")
EXPERIMENT_RESOURCES = {"train": ("cpus_per_worker", "max_failures"),
                        "sample": ("num_workers", "cpus_per_worker", "use_gpu"),
                        "evaluate": ("num_workers", "cpus_per_worker", "use_gpu")}


def sweep_recipe(sweep: SweepConfig, base: ExperimentConfig) -> dict[str, Any]:
    """What a sweep finds depends on: the sweep section and the base experiment, without their
    resources (`SWEEP_RESOURCES`, `EXPERIMENT_RESOURCES`) and the cluster and tracking
    sections."""
    recipe = {k: v for k, v in dataclasses.asdict(sweep).items() if k not in SWEEP_RESOURCES}
    experiment = base.to_dict()
    for section in ("cluster", "tracking"):  # where the work runs and is recorded
        experiment.pop(section, None)
    for section, keys in EXPERIMENT_RESOURCES.items():
        experiment[section] = {k: v for k, v in experiment[section].items() if k not in keys}
    return {"sweep": recipe, "base": experiment}


def sweep_name(sweep: SweepConfig, base: ExperimentConfig) -> str:
    """Fixed per (study, sweep recipe, base experiment, training code): `<study>-sweep-<recipe
    digest>-<code digest>`."""
    blob = json.dumps(sweep_recipe(sweep, base), sort_keys=True, default=str)
    return f"{sweep_prefix(base)}{sha256_hex(blob, length=10)}-{code_digest()}"


def sweep_prefix(base: ExperimentConfig) -> str:
    return f"{base.study.name}-sweep-"


def other_sweeps(storage: str, base: ExperimentConfig, name: str) -> list[str]:
    """The study's other sweeps in `storage` (another recipe or other training code)."""
    return [n for n in list_storage(storage, folders=True)
            if n.startswith(sweep_prefix(base)) and n != name and "." not in n]


def _report_callback(defaults: dict[str, Any]):
    """A TuneReportCallback that fills metrics a report lacks (an unstable run's last report
    has no validation NLL), so that Tune's check for the scheduler's metric passes."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _FillingTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**defaults, **m} for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return _FillingTuneReportCallback()


# What a trial's report holds of its own (Ray Tune adds ids, times and hosts to each)
REPORT_KEYS = ("step", "status", "loss", "lr", "grad_norm", "images_per_s", "nll_bpd",
               "nll_bpd_se", "fid", "time_total_s")
# What the sweep keeps beside Ray Tune's experiment folder, in `<storage>/<sweep name>.state/`:
# Tune uploads its driver's copy of the experiment folder over the storage's, so a file that the
# driver writes there itself is replaced by the copy Tune took when it restored the sweep
REPORTS_FOLDER = "reports"  # reports/<trial id>.json: every report of a trial
HALVING_FILE = "halving.json"  # the decisions at the rungs


def state_folder(experiment_path: str) -> str:
    return f"{experiment_path}.state"


def _trial_reports_callback(state: str, live: Optional[Callable] = None,
                            steps: Optional[int] = None):
    """A Ray Tune `Callback` (it runs in the driver: one writer) that keeps every report of
    every trial in `<state>/reports/<trial id>.json`, one entry per step, as the
    report arrives. Ray Tune's own result.json of a paused trial is replaced by the storage's
    older copy when the trial resumes, losing the report it paused at; this file is written
    before Tune goes on, so the history of a paused, stopped or resumed trial is whole (a step
    reported again after a resume from an older checkpoint replaces its entry). `live(trial_id,
    config, report)` is called with each report (the trials' MLflow runs, streamed). Each
    report is also one printed line (`report_line`), in place of Tune's tables."""
    import ray.tune

    class TrialReports(ray.tune.Callback):
        def __init__(self):
            self._reports: dict[str, dict[int, dict[str, Any]]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            report = {k: result[k] for k in REPORT_KEYS if k in result}
            if report.get("step") is None:
                return
            reports = self._reports.get(trial.trial_id)
            if reports is None:
                reports = {int(r["step"]): r for r in load_trial_reports(state,
                                                                         trial.trial_id)}
            reports[int(report["step"])] = report
            self._reports[trial.trial_id] = reports
            save_trial_reports(state, trial.trial_id, list(reports.values()))
            print(report_line(trial.config, report, steps), flush=True)
            if live is not None:
                live(trial.trial_id, trial.config, report)

    return TrialReports()


def report_line(config: dict[str, Any], report: dict[str, Any],
                steps: Optional[int] = None) -> str:
    """`sweep cosine x uniform: step 200/400, loss 0.0412, NLL 3.71 ± 0.05 bits/dim, FID 12.3`:
    one trial's report as the sweep prints it."""
    step = f"step {report['step']}" + (f"/{steps}" if steps else "")
    parts = [f"sweep {cell_label(config)}: {step}"]
    if report.get("status", "ok") != "ok":
        parts.append(str(report["status"]))
    if report.get("loss") is not None:
        parts.append(f"loss {report['loss']:.4g}")
    if report.get("nll_bpd") is not None:
        se = report.get("nll_bpd_se")
        parts.append(f"NLL {report['nll_bpd']:.4g}"
                     + (f" ± {1.96 * se:.2g}" if se is not None else "") + " bits/dim")
    if report.get("fid") is not None:
        parts.append(f"FID {report['fid']:.4g}")
    return ", ".join(parts)


def save_trial_reports(state: str, trial_id: str, reports: list) -> None:
    reports = sorted(reports, key=lambda r: r["step"])
    write_to_storage(f"{state}/{REPORTS_FOLDER}/{trial_id}.json",
                     json.dumps(reports, default=float).encode())


def load_trial_reports(state: str, trial_id: str) -> list[dict[str, Any]]:
    """The reports `save_trial_reports` kept for a trial, by step (none if there are none)."""
    folder = f"{state}/{REPORTS_FOLDER}"
    if f"{trial_id}.json" not in list_storage(folder):
        return []
    return json.loads(read_from_storage(f"{folder}/{trial_id}.json"))


class SweepStateError(UserError, ValueError):
    """A file the sweep keeps to resume (its decisions, its trials' reports) is damaged."""


def check_sweep_state(state: str, experiment_path: str) -> None:
    """Read back every file of a stopped sweep's state folder (the rung decisions and the
    trials' reports) before the sweep resumes from it: a damaged one stops the stage in one
    line naming it and the fix, rather than in the middle of Tune's loop."""
    files = [f"{state}/{name}" for name in list_storage(state) if name == HALVING_FILE]
    files += [f"{state}/{REPORTS_FOLDER}/{name}"
              for name in list_storage(f"{state}/{REPORTS_FOLDER}") if name.endswith(".json")]
    for path in files:
        try:
            json.loads(read_from_storage(path))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SweepStateError(
                f"{path}: damaged ({type(exc).__name__}: {exc}), so the stopped sweep cannot "
                f"resume from it; delete {experiment_path} and {state} to run the sweep from "
                "its start") from None


def _tune_trial(config: dict[str, Any], *, sweep: SweepConfig, base: ExperimentConfig,
                storage: str, probe: Callable, log_level: str = "INFO") -> None:
    """One Tune trial: train `base` with this trial's cell (schedule, weighting) with the shared
    per-worker function and report to Tune. With one worker it trains right here, in the
    trial's actor (reused from trial to trial): no Train controller and worker processes to
    start, which cost about 25 s of a 2-core machine per trial. With several, a TorchTrainer of
    its own runs DDP and its reports are forwarded to Tune."""
    import ray.tune

    logs.quiet_worker(log_level)
    exp = sweep.trial_experiment(base, *cell_of(config, sweep.axes))
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


def search_space(sweep: SweepConfig, pick: Callable[[list], Any]) -> dict[str, Any]:
    """Ray Tune's search space: `pick` (`tune.grid_search`, `tune.choice`) of each axis's values,
    the first axis outermost."""
    return {axis.name: pick(list(getattr(sweep, axis.values))) for axis in sweep.axes}


def concurrent_trials(sweep: SweepConfig) -> int:
    """`sweep.max_concurrent_trials`, or where it is 0 as many trials as the cluster's CPUs (and
    GPUs, with `use_gpu`) can hold at once, so that no trial's Train run waits for workers."""
    import ray

    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 0.0) / (sweep.num_workers * sweep.cpus_per_worker)
    if sweep.use_gpu:
        fits = min(fits, resources.get("GPU", 0.0) / sweep.num_workers)
    return max(1, math.floor(fits + 1e-9))


def run_sweep(sweep: SweepConfig, base: ExperimentConfig, storage: str | Path,
              probe: Callable, seed: int = 0, num_trials: int | None = None,
              live: Optional[Callable] = None) -> SweepRun:
    """Ray Tune over `sweep.cells()` (`num_trials` trials) with synchronous successive halving
    on the validation NLL; returns every trial. Trials train on `probe.train_data`
    (`pipeline.training.sweep_trials.trial_probe`) and report a checkpoint at every report, so that a
    trial paused at a rung, or stopped with the sweep, goes on from where it was.

    The Tune experiment lives in `<storage>/<sweep_name>` (a local or shared path, or a URI;
    a DDP trial's trainer checkpoints under its `trainers/` folder). Where it exists, the sweep
    is restored (`Tuner.restore`: finished trials kept, unfinished and failed ones resumed from
    their last checkpoint); where a sweep of another recipe of the study exists, it says so and
    starts this one beside it. Trials that fail are recorded (`TrialOutcome.error`), not
    retried by Tune (Ray Train retries the workers of a DDP trial). Single-worker trials reuse
    their actors from trial to trial. Every report is kept (`load_trial_reports`) and passed to
    `live(trial_id, config, report)` as it arrives (`pipeline.training.sweep_trials.LiveTrialRuns`; it
    is saved with the sweep and used again when it is restored).
    """
    import ray.tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    name = sweep_name(sweep, base)
    storage = storage_location(storage)
    experiment_path = f"{storage}/{name}"
    state = state_folder(experiment_path)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(  # each to the object store once
        _tune_trial, sweep=sweep, base=base, storage=f"{experiment_path}/trainers",
        probe=probe, log_level=logs.worker_log_level()), trial_resources(sweep))
    if ray.tune.Tuner.can_restore(experiment_path):
        check_sweep_state(state, experiment_path)  # before Tune reads it back, mid-sweep
        print(f"sweep: resuming {experiment_path} (finished trials are kept, the others go on "
              "from their last checkpoint)", flush=True)
        tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
    else:
        others = other_sweeps(storage, base, name)
        if others:
            print(f"sweep: the sweep's recipe or the training code changed since "
                  f"{', '.join(others)}; starting {name}", flush=True)
        pick = ray.tune.grid_search if sweep.search == "grid" else ray.tune.choice
        param_space = search_space(sweep, pick)
        num_trials = num_trials or (len(sweep.cells()) if sweep.search == "grid"
                                    else sweep.num_samples)
        for leftover in (experiment_path, state):  # of a sweep stopped at its start
            delete_from_storage(leftover)
        scheduler = SynchronousHalving(
            time_attr="step", metric=METRIC, mode="min", max_t=sweep.steps,
            rungs=sweep.rung_steps(), reduction_factor=sweep.reduction_factor,
            num_trials=num_trials, max_running=concurrent_trials(sweep),
            state_path=f"{state}/{HALVING_FILE}")
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode="min", num_samples=sweep.num_samples, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=seed),
                reuse_actors=sweep.num_workers == 1),
            run_config=ray.tune.RunConfig(
                name=name, storage_path=storage,
                failure_config=ray.tune.FailureConfig(max_failures=0),
                checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
                callbacks=[_trial_reports_callback(state, live, sweep.steps)],
                verbose=None if logs.verbose() else 0),  # its tables; else a line per report
        )
    start = time.monotonic()
    grid = tuner.fit()
    wall = time.monotonic() - start
    analysis = ray.tune.ExperimentAnalysis(experiment_path)  # (grid's path has no scheme)
    configs = analysis.get_all_configs()
    ids = {str(t.path): t.trial_id for t in analysis.trials}
    trials = []
    for result in grid:
        config = result.config or configs.get(result.path) or {}
        trial_id = str((result.metrics or {}).get("trial_id") or ids[str(result.path)])
        reports = load_trial_reports(state, trial_id)
        trials.append(TrialOutcome(
            trial_id=trial_id,
            cell=cell_of(config, sweep.axes),
            history=pd.DataFrame(reports),
            last=dict(reports[-1]) if reports else {},
            error=_error_text(result.error) if result.error is not None else None,
            path=result.path))
    kept = load_decisions(f"{state}/{HALVING_FILE}")
    unfinished = [t for t in trials if not _ended(t, sweep.steps, kept)]
    if unfinished:  # Tuner.fit() returns after Ctrl-C / SIGTERM: no partial results for DVC
        raise TrainingError(f"the sweep was interrupted with {len(unfinished)} trial(s) "
                            f"unfinished; run the sweep stage again to resume it from "
                            f"{experiment_path}")
    return SweepRun(name=name, trials=trials, path=experiment_path, wall_s=wall)


def _ended(trial, steps: int, kept: dict[int, set[str]]) -> bool:
    """Whether a trial ended: it failed, diverged, trained every step or was stopped at a rung
    (Ray Tune's saved trial states can say "paused" of a trial stopped while paused)."""
    step = trial.last.get("step")
    if trial.error is not None or trial.last.get("status", "ok") != "ok":
        return True
    return step is not None and (step >= steps or (
        step in kept and trial.trial_id not in kept[step]))


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
