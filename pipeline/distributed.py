"""Every Ray import of the project lives here: the cluster connection, Ray Train's TorchTrainer
around the shared per-worker training function, and (for the sweep) Ray Tune.

- With `RAY_ADDRESS` set (as `ray job submit` does), stages connect to that cluster; otherwise
  they start a local one sized to this machine.
- Training runs under a fixed run name in its storage (`cluster.storage`, `checkpoints/<run
  name>` by default: a local or shared path, or a URI such as s3://bucket/prefix), outside
  every DVC output: Ray Train (V2) finds the run's last checkpoint there and resumes from it,
  whether a worker died (`FailureConfig(max_failures)`) or the whole `dvc repro` was killed.
- The driver puts the training data into Ray's object store; workers on any node get it from
  there, and EMA snapshots go to the run's storage, so a multi-node run needs no shared disk.
- The sweep is a Ray Tune `Tuner` over a function trainable (`_tune_trial`) that runs the same
  per-worker function: in the trial's own actor when a trial has one worker (the actor holds
  its CPUs and is reused from trial to trial), or in a TorchTrainer of its own for DDP trials,
  whose reports (rank 0's) `TuneReportCallback` forwards to Tune; ASHA reads them. A DDP
  trial's actor holds no CPU (its Train controller holds none either): its workers do.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pipeline.config import ExperimentConfig, SweepConfig
from pipeline.errors import UserError
from pipeline.io import sha256_hex, storage_location
from pipeline.training import STATE_FILE, CheckpointError, load_training_state, train_worker


class TrainingError(UserError, RuntimeError):
    """Training failed after Ray's retries; the message says why and where the logs are."""


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------


# Ray Train settings of the private single-machine cluster (a user's environment overrides them).
# The Train controller polls its workers every 2 s by default, and each change of state (workers
# placed, started, finished) waits for a poll; its preemption watcher is one more actor to start
# and has nothing to watch on one machine (no node is drained). Measured on the 2-core machine:
# a 20-step `fit` took 25-26 s with Ray's defaults and 19-20 s with these.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                   "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def connect(num_cpus: Optional[int] = None) -> str:
    """Connect to the cluster at RAY_ADDRESS, or start a local one. Returns a description."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        return f"connected to Ray cluster at {address}"
    start_local_cluster(num_cpus)
    return f"started a local Ray instance ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)"


def start_local_cluster(num_cpus: Optional[int] = None, log_to_driver: bool = True) -> str:
    """Start a private single-machine Ray instance (this process its driver) and return its
    address, 127.0.0.1:<GCS port>. Other processes join it with RAY_ADDRESS set to that.

    On loopback, without token auth, with the Train settings of LOCAL_TRAIN_ENV. The dashboard
    process serves the state API that Ray Train uses to clean up after its controller: its
    PlacementGroupCleaner actor finds the cluster through RAY_ADDRESS, or fails when several
    Ray instances run on the machine (and a stopped sweep trial's placement group then holds
    its CPUs until the stage ends). So the GCS gets a port chosen here, and every process of
    the cluster inherits RAY_ADDRESS pointing at it (set while Ray starts, then restored).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    gcs_port = _free_port()
    address = f"127.0.0.1:{gcs_port}"
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update({"RAY_ADDRESS": address, "RAY_GCS_SERVER_PORT": str(gcs_port)})
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                 configure_logging=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return address



def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# The worker side of Ray Train
# --------------------------------------------------------------------------------------------


class RaySession:
    """`pipeline.training.Session` backed by Ray Train (runs inside each training worker), or
    with `tune=True` by Ray Tune: a single-worker sweep trial that trains in its own Tune actor
    (rank 0 of 1, reports and checkpoints through `ray.tune`). `defaults` fill the metrics a
    report lacks (Tune checks every report for the scheduler's metric)."""

    def __init__(self, threads: int, tune: bool = False,
                 defaults: Optional[dict[str, Any]] = None):
        import ray.train
        import ray.train.torch
        import ray.tune

        self._api = ray.tune if tune else ray.train
        self._defaults = dict(defaults or {})
        if tune:
            self.rank, self.world_size = 0, 1
            gpu = ray.get_gpu_ids() and torch.cuda.is_available()
            self.device = torch.device("cuda" if gpu else "cpu")
        else:
            context = ray.train.get_context()
            self.rank = context.get_world_rank()
            self.world_size = context.get_world_size()
            self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        self._scratch = Path(tempfile.mkdtemp(prefix=f"ddpm-rank{self.rank}-"))

    def prepare_model(self, model):
        import ray.train.torch

        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def latest_checkpoint(self) -> Optional[Path]:
        checkpoint = self._api.get_checkpoint()
        if checkpoint is None:
            return None
        if type(checkpoint.filesystem).__name__ == "LocalFileSystem":
            return Path(checkpoint.path)  # read in place: an error names the file in storage
        local = self._scratch / "resume"
        local.mkdir(parents=True, exist_ok=True)
        with checkpoint.as_directory() as folder:
            shutil.copy2(Path(folder) / STATE_FILE, local / STATE_FILE)
        return local

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path] = None) -> None:
        checkpoint = self._api.Checkpoint.from_directory(str(checkpoint_dir)) \
            if checkpoint_dir is not None else None
        self._api.report({**self._defaults, **metrics}, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted to storage by now

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value


def _ray_train_loop(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: rebuild the config, get the training data (from
    Ray's object store, where the driver put it, so no worker reads the driver's disk; or from
    a path), run the shared worker."""
    import ray

    exp = ExperimentConfig.from_dict(config["experiment"])
    session = RaySession(threads=config["threads"])
    on_log = config.get("on_log")
    train_data = config["train_data"]
    if isinstance(train_data, ray.ObjectRef):
        train_data = ray.get(train_data)
    train_worker(exp, train_data, session, checkpoint_root=session._scratch / "out",
                 on_log=on_log, ema_snapshot_dir=config.get("ema_snapshot_dir"))


# --------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------


@dataclass
class FitOutcome:
    status: str
    state: dict[str, Any]
    run_path: str  # the run's folder in storage (a path or a URI)
    ema_snapshot_dir: Optional[Path] = None  # EMA weights by step (evaluate.checkpoints set),
    # read back from storage into a local folder


def code_digest() -> str:
    """Short hash of the source of every module that shapes a trained model."""
    from pipeline import data, diffusion, precision, schedules, training, unet

    return sha256_hex(*(Path(module.__file__).read_bytes()
                        for module in (data, diffusion, precision, schedules, training, unet)),
                      length=8)


def run_name(exp: ExperimentConfig) -> str:
    """Fixed per (study, experiment, training config, training code): a rerun finds and resumes
    its checkpoints; a changed config or changed code trains afresh under a new name. A run
    that keeps EMA snapshots (evaluate.checkpoints set) is named apart ("-ema"): snapshots are
    made while training, so turning them on trains afresh (same seed, same final model)."""
    keep = "-ema" if exp.evaluate.checkpoints is not None else ""
    return f"{exp.study.name}-{exp.key}-{exp.config_hash()}-{code_digest()}{keep}"


# cluster.placement -> the placement strategy of a run's worker group (Ray's bundle strategies:
# SPREAD puts the workers on as many nodes as hold them, best effort, so it never waits for a
# node that is not there)
PLACEMENT = {"pack": "PACK", "spread": "SPREAD"}


def scaling_config(exp: ExperimentConfig):
    """`train.num_workers` workers of `train.cpus_per_worker` CPUs each (and one GPU each with
    `use_gpu`), placed by `cluster.placement`."""
    import ray.train

    resources = {"CPU": exp.train.cpus_per_worker}
    if exp.train.use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(num_workers=exp.train.num_workers, use_gpu=exp.train.use_gpu,
                                   resources_per_worker=resources,
                                   placement_strategy=PLACEMENT[exp.cluster.placement])


def make_trainer(exp: ExperimentConfig, train_data: Any, storage: str, name: str,
                 on_log: Optional[Callable] = None, callbacks: Optional[list] = None,
                 ema_snapshot_dir: Optional[str] = None):
    """A TorchTrainer for experiment `exp` (DDP: gloo on CPU, nccl on GPU) on `train_data` (a
    prepared split's path, the split, or an object-store reference to it), checkpointing to the
    storage location `storage` (a path or a URI); with `ema_snapshot_dir` (the same), rank 0
    keeps the EMA weights of every checkpoint step there."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if isinstance(train_data, os.PathLike):
        train_data = str(train_data)
    return TorchTrainer(
        _ray_train_loop,
        train_loop_config={"experiment": exp.to_dict(), "train_data": train_data,
                           "threads": max(1, int(exp.train.cpus_per_worker)),
                           "on_log": on_log, "ema_snapshot_dir": ema_snapshot_dir},
        torch_config=TorchConfig(backend="nccl" if exp.train.use_gpu else "gloo"),
        scaling_config=scaling_config(exp),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_location(storage),
            failure_config=ray.train.FailureConfig(max_failures=exp.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )


def fit(exp: ExperimentConfig, train_data: Path, storage: str | Path) -> FitOutcome:
    """Train `exp` with Ray Train, resuming from its last checkpoint under `storage` (a local
    or shared path, or a URI such as s3://bucket/prefix), and return the final training state
    (read back from the last reported checkpoint). The training data goes to the workers
    through Ray's object store, so that no worker reads the driver's disk."""
    import ray

    from pipeline.data import load_prepared
    from pipeline.io import fetch_from_storage

    name = run_name(exp)
    run_path = f"{storage_location(storage)}/{name}"
    snapshots = f"{run_path}/ema" if exp.evaluate.checkpoints is not None else None
    data = ray.put(load_prepared(train_data))
    trainer = make_trainer(exp, data, storage, name, ema_snapshot_dir=snapshots)
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        cause = _worker_error(exc)
        if isinstance(cause, CheckpointError):  # retrying cannot help: say which file, and why
            reason = re.split(r" \(|; ", str(cause), maxsplit=1)[0]
            raise CheckpointError(
                f"training of '{exp.key}' cannot resume: {reason}; Ray Train resumes a run "
                f"from its latest checkpoint only, so delete the run folder {run_path} and "
                f"rerun `dvc repro train@{exp.key}` to train from step 0") from None
        raise TrainingError(
            f"training of '{exp.key}' failed after {exp.train.max_failures} retries: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}; "
            f"checkpoints and logs are under {run_path}") from exc
    if result.checkpoint is None:
        raise TrainingError(f"training of '{exp.key}' reported no checkpoint; see the logs "
                            f"under {run_path}")
    with result.checkpoint.as_directory() as folder:
        state = load_training_state(Path(folder) / STATE_FILE)
    local_snapshots = None
    if snapshots is not None:
        local_snapshots = fetch_from_storage(snapshots, tempfile.mkdtemp(prefix="ddpm-ema-"))
    return FitOutcome(status=state["status"], state=state, run_path=run_path,
                      ema_snapshot_dir=local_snapshots)


def _worker_error(error: BaseException) -> BaseException:
    """The exception raised inside the first failed worker (Ray wraps it), else `error`."""
    for _, failure in sorted((getattr(error, "worker_failures", None) or {}).items()):
        cause = getattr(failure, "cause", None)
        return cause if isinstance(cause, BaseException) else failure
    return error


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
    trials: list  # of pipeline.sweep.TrialOutcome
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
        session = RaySession(threads=int(exp.train.cpus_per_worker), tune=True,
                             defaults=NLL_DEFAULTS)
        train_worker(exp, train_data, session, checkpoint_root=session._scratch / "out",
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
    Trials train on `probe.train_data` (`pipeline.sweep.trial_probe`).

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

    from pipeline.sweep import METRIC, TrialOutcome

    from pipeline.io import delete_from_storage

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


# --------------------------------------------------------------------------------------------
# Inference in chunks: sampling, the NLL bound and features on Ray Data's workers
# --------------------------------------------------------------------------------------------


class WorkersError(UserError, RuntimeError):
    """A job's workers cannot run as params.yaml asks (no GPU, no node with enough CPUs), or a
    worker failed; the message says which section's keys to change."""


def check_workers(workers) -> None:
    """Refuse at once what no node of the cluster can hold (Ray would wait for it forever): a
    GPU per worker where no node has one, more CPUs per worker than the largest node has."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    where = f"the Ray cluster ({len(nodes)} node{'s' if len(nodes) != 1 else ''}, " \
            f"{sum(n.get('CPU', 0.0) for n in nodes):.0f} CPUs, " \
            f"{sum(n.get('GPU', 0.0) for n in nodes):.0f} GPUs)"
    section = workers.section
    if workers.use_gpu and gpus < 1:
        raise WorkersError(f"{section}.use_gpu is true but no node of {where} has a GPU, so the "
                           f"work would wait forever and never fall back to a CPU; start GPU "
                           f"nodes, or set {section}.use_gpu: false to run on CPUs")
    if workers.cpus_per_worker > cpus:
        raise WorkersError(f"{section}.cpus_per_worker is {workers.cpus_per_worker:g} but the "
                           f"largest node of {where} has {cpus:g}; lower it (a fraction shares "
                           f"a CPU)")


class _ChunkWorker:
    """A Ray Data actor of one job: builds its `ChunkContext` once (the models, data and feature
    network it gets through the object store), then computes one chunk per call and returns its
    result to the driver, which keeps it in storage."""

    def __init__(self, spec, chunks, objects, workers, store):
        import ray

        from pipeline.sharding import ChunkContext

        if workers.use_gpu and not torch.cuda.is_available():
            raise WorkersError(f"{workers.section}.use_gpu is true but torch on node "
                               f"{ray.util.get_node_ip_address()} sees no CUDA device (torch "
                               f"{torch.__version__}, CUDA {torch.version.cuda}); install a "
                               f"CUDA build of torch there, or set {workers.section}.use_gpu: "
                               "false")
        self.ctx = ChunkContext(spec, ray.get(objects[0]), workers.device,
                                max(1, int(workers.cpus_per_worker)))
        self.chunks, self.store = chunks, store
        self.node = ray.util.get_node_ip_address()

    def __call__(self, batch):
        import numpy as np

        from pipeline.sharding import run_chunk

        index = int(batch["chunk"][0])
        chunk = self.chunks[index]
        self.store.mark_started(chunk.id, self.node)
        start = time.monotonic()
        payload = run_chunk(self.ctx, chunk)
        return {"chunk": np.array([index]), "payload": np.array([payload], dtype=object),
                "wall_s": np.array([time.monotonic() - start]), "node": np.array([self.node])}


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars and per-dataset log lines off: the job prints one line."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "disabled"


def run_chunks(job, storage: str | Path, stream=None, heartbeat_s: float = 60.0):
    """Run `job` (a `pipeline.sharding.ShardedJob`) on Ray workers and return its `ChunkRun`.

    Chunks already finished in `storage` (a path, or a URI every node reaches) are read back,
    not recomputed; the rest go through Ray Data, `map_batches` with a callable class on an
    actor pool of min(num_workers, chunks) workers of `cpus_per_worker` CPUs (and a GPU each
    with `use_gpu`), one chunk per call. Each result is written to storage as it comes back,
    so a stage killed mid-way, or a lost worker node, costs only the chunks in flight (Ray
    Data restarts a lost actor and retries its chunk). One progress line for the whole job.
    """
    import queue
    import threading

    import ray
    import ray.data

    from pipeline.progress import ChunkProgress
    from pipeline.sharding import ChunkRun, ChunkStore, decode

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS") and job.workers.use_gpu and \
                not torch.cuda.is_available():  # a local instance would have no GPU either
            raise WorkersError(f"{job.workers.section}.use_gpu is true but this machine has no "
                               f"GPU torch can use (and RAY_ADDRESS names no cluster); set "
                               f"{job.workers.section}.use_gpu: false to run on CPUs, or "
                               "submit the study to a cluster with GPU nodes")
        print(connect(), flush=True)
    store = ChunkStore(storage, job.name)
    finished = store.finished() & {c.id for c in job.chunks}
    todo = [i for i, c in enumerate(job.chunks) if c.id not in finished]
    workers = min(job.workers.num_workers, len(todo))
    if todo:
        check_workers(job.workers)
    progress = ChunkProgress(job.label, job.total_units, len(job.chunks), job.unit,
                             reused_units=sum(c.units for c in job.chunks if c.id in finished),
                             reused_chunks=len(finished), workers=workers, stream=stream,
                             heartbeat_s=heartbeat_s)
    payloads = {chunk_id: store.read(chunk_id) for chunk_id in finished}
    worker_s = 0.0
    start = time.monotonic()
    if todo:
        w = job.workers
        print(f"{job.label}: {len(todo)} of {len(job.chunks)} chunks to compute on {workers} "
              f"worker{'s' if workers != 1 else ''} ({w.cpus_per_worker:g} "
              f"CPU{'s' if w.cpus_per_worker != 1 else ''}"
              f"{' and a GPU' if w.use_gpu else ''} each)"
              f"{f', {len(finished)} found in storage' if finished else ''}; finished chunks "
              f"go to {store.folder}", file=stream or sys.stdout, flush=True)
        _quiet_ray_data()
        objects = ray.put(job.objects)
        dataset = ray.data.from_items([{"chunk": i} for i in todo],
                                      override_num_blocks=len(todo)).map_batches(
            _ChunkWorker, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"spec": job.spec, "chunks": job.chunks,
                                   "objects": [objects], "workers": job.workers,
                                   "store": store},
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=w.cpus_per_worker, num_gpus=1 if w.use_gpu else 0)
        rows: queue.Queue = queue.Queue()

        def consume():
            try:
                for row in dataset.iter_rows():
                    rows.put(row)
                rows.put(None)
            except BaseException as exc:  # handed to the driver's thread
                rows.put(exc)

        threading.Thread(target=consume, daemon=True).start()
        while True:
            try:
                row = rows.get(timeout=min(5.0, heartbeat_s))
            except queue.Empty:
                progress.idle()
                continue
            if row is None:
                break
            if isinstance(row, BaseException):
                raise _chunk_failure(job, row, store, len(payloads)) from row
            chunk = job.chunks[int(row["chunk"])]
            store.write(chunk.id, bytes(row["payload"]))
            payloads[chunk.id] = bytes(row["payload"])
            worker_s += float(row["wall_s"])
            progress.done(chunk.units)
    wall = time.monotonic() - start
    starts = store.starts() if todo else {}
    return ChunkRun(results={c.id: decode(payloads[c.id]) for c in job.chunks},
                    computed=len(todo), reused=len(finished),
                    redone=sum(1 for n in starts.values() if n > 1), workers=workers,
                    wall_s=wall, units_per_s=progress.rate if todo else math.nan,
                    worker_s=worker_s)


def _chunk_failure(job, error: BaseException, store, kept: int) -> UserError:
    """One line for a failed job: the worker's own user error where there is one (Ray hands it
    back wrapped, or as the text of an ActorDiedError when the worker failed to start)."""
    cause = error
    for _ in range(10):  # Ray wraps a worker's exception (RayTaskError.cause, __cause__)
        if cause is None or isinstance(cause, UserError):
            break
        cause = getattr(cause, "cause", None) or cause.__cause__
    if isinstance(cause, UserError):
        return type(cause)(str(cause))
    named = re.findall(r"pipeline\.\w+\.\w+Error: ([^\n]+)", str(error))
    if named:
        return WorkersError(named[-1].rstrip(")"))
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    kept_text = f"the {kept} finished chunks are kept in {store.folder} and a rerun computes " \
                "only the rest" if kept else "no chunk had finished"
    return WorkersError(f"{job.label}: a worker failed ({type(error).__name__}: "
                        f"{lines[-1] if lines else ''}); {kept_text}")
