"""Ray Train around the shared per-worker training function: `fit` trains one experiment with a
`TorchTrainer` (DDP: gloo on CPU, nccl on GPU), and `RaySession` is the training loop's view of
Ray Train inside each worker (or of Ray Tune, in a single-worker sweep trial).

- Training runs under a fixed run name (`run_name`) in Ray's storage (`cluster.storage`,
  `ray_storage/<run name>` by default: a local or shared path, or a URI such as
  s3://bucket/prefix), outside every DVC output: Ray Train (V2) finds the run's last checkpoint
  there and resumes from it, whether a worker died (`FailureConfig(max_failures)`) or the whole
  `dvc repro` was killed.
- The driver puts the training data into Ray's object store; workers on any node get it from
  there, and EMA snapshots go to the run's storage, so a multi-node run needs no shared disk.
- What the workers report streams to MLflow from one writer, the Train controller
  (`StreamReports`, a Ray Train `UserCallback` around a `pipeline.core.tracking.MetricStream`).

The cluster connection is `pipeline.cluster.connection`; the sweep's Tuner, whose trials train
through `RaySession` and `make_trainer`, is `pipeline.cluster.ray_tune`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pipeline.core import logs
from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.core.io import fetch_from_storage, storage_location
from pipeline.core.layers import SHAPES_A_MODEL, source_digest
from pipeline.core.status import Status
from pipeline.data.datasets import load_prepared
from pipeline.training import loop
from pipeline.training.loop import STATE_FILE, CheckpointError, load_training_state, train_worker


class TrainingError(UserError, RuntimeError):
    """Training failed after Ray's retries; the message says why and where the logs are."""


# --------------------------------------------------------------------------------------------
# The worker side of Ray Train
# --------------------------------------------------------------------------------------------


class RaySession:
    """`pipeline.training.loop.Session` backed by Ray Train (runs inside each training worker),
    or with `tune=True` by Ray Tune: a single-worker sweep trial that trains in its own Tune actor
    (rank 0 of 1, reports and checkpoints through `ray.tune`). `defaults` fill the metrics a
    report lacks (Tune checks every report for the scheduler's metric).

    A context manager: its scratch folder (checkpoints on their way to storage, a resumed state
    fetched from a URI) is removed when the worker's training ends, however it ends."""

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

    @property
    def checkpoint_root(self) -> Path:
        """Where the training loop writes a checkpoint before `report` hands it to storage."""
        return self._scratch / "out"

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

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

    logs.quiet_worker(config.get("log_level", "INFO"))
    exp = ExperimentConfig.from_dict(config["experiment"])
    train_data = config["train_data"]
    if isinstance(train_data, ray.ObjectRef):
        train_data = ray.get(train_data)
    with RaySession(threads=config["threads"]) as session:
        train_worker(exp, train_data, session, checkpoint_root=session.checkpoint_root,
                     on_log=config.get("on_log"), ema_snapshot_dir=config.get("ema_snapshot_dir"))


# --------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------


@dataclass
class FitOutcome:
    state: dict[str, Any]
    run_path: str  # the run's folder in storage (a path or a URI)
    ema_snapshot_dir: Optional[Path] = None  # EMA weights by step (evaluate.checkpoints set),
    # read back from storage into a local folder


def code_digest() -> str:
    """Short hash of the source of every layer that shapes a trained model, and of the training
    loop: a resumed run must match it."""
    return source_digest(SHAPES_A_MODEL, loop.__file__)


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
                           "on_log": on_log, "ema_snapshot_dir": ema_snapshot_dir,
                           "log_level": logs.worker_log_level()},
        torch_config=TorchConfig(backend="nccl" if exp.train.use_gpu else "gloo"),
        scaling_config=scaling_config(exp),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_location(storage),
            failure_config=ray.train.FailureConfig(max_failures=exp.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level=logs.worker_log_level()),
        ),
    )


def fit(exp: ExperimentConfig, train_data: Path, storage: str | Path,
        callbacks: Optional[list] = None) -> FitOutcome:
    """Train `exp` with Ray Train, resuming from its last checkpoint under `storage` (a local
    or shared path, or a URI such as s3://bucket/prefix), and return the final training state
    (read back from the last reported checkpoint). The training data goes to the workers
    through Ray's object store, so that no worker reads the driver's disk. `callbacks` (Ray
    Train `UserCallback`s, e.g. `stream_reports`) run on the Train controller.

    Ray Train answers a first Ctrl-C by aborting the run, and `trainer.fit` then returns what
    it had: a run that stopped short of `train.steps` without diverging raises
    KeyboardInterrupt here, so that no stage takes it for a trained model."""
    import ray

    name = run_name(exp)
    run_path = f"{storage_location(storage)}/{name}"
    snapshots = f"{run_path}/ema" if exp.evaluate.checkpoints is not None else None
    data = ray.put(load_prepared(train_data))
    trainer = make_trainer(exp, data, storage, name, ema_snapshot_dir=snapshots,
                           callbacks=callbacks)
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        cause = _worker_error(exc)
        if isinstance(cause, CheckpointError):  # retrying cannot help: say which file, and why
            raise CheckpointError(
                f"training of '{exp.key}' cannot resume: {cause.reason}; Ray Train resumes a run "
                f"from its latest checkpoint only, so delete the run folder {run_path} and "
                f"rerun `dvc repro train@{exp.key}` to train from step 0", path=cause.path, reason=cause.reason) from None
        raise TrainingError(
            f"training of '{exp.key}' failed after {exp.train.max_failures} retries: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}; "
            f"checkpoints and logs are under {run_path}") from exc
    if result.checkpoint is None:
        raise TrainingError(f"training of '{exp.key}' reported no checkpoint; see the logs "
                            f"under {run_path}")
    with result.checkpoint.as_directory() as folder:
        state = load_training_state(Path(folder) / STATE_FILE)
    if state["step"] < exp.train.steps and state["status"] == Status.OK:
        raise KeyboardInterrupt(f"training of '{exp.key}' was aborted at step {state['step']} "
                                f"of {exp.train.steps}; a rerun resumes it")
    local_snapshots = None
    if snapshots is not None:
        local_snapshots = fetch_from_storage(snapshots, tempfile.mkdtemp(prefix="ddpm-ema-"))
    return FitOutcome(state=state, run_path=run_path,
                      ema_snapshot_dir=local_snapshots)


def stream_reports(stream, names: dict[str, str]):
    """A Ray Train `UserCallback` that logs rank 0's report of each step to `stream` (a
    `pipeline.core.tracking.MetricStream`) on the Train controller: the report's keys in
    `names`, renamed to their values. Reports without a `loss` (a resumed run's final state)
    are not logged."""
    import ray.train

    class StreamReports(ray.train.UserCallback):
        def __init__(self):
            self.stream, self.names = stream, dict(names)

        def after_report(self, run_context, metrics, checkpoint) -> None:
            report = next((m for m in metrics if m and "loss" in m), None)
            if report is None:
                return
            self.stream.log(report["step"], {self.names[key]: report[key]
                                             for key in self.names if key in report})

    return StreamReports()


def _worker_error(error: BaseException) -> BaseException:
    """The exception raised inside the first failed worker (Ray wraps it), else `error`."""
    for _, failure in sorted((getattr(error, "worker_failures", None) or {}).items()):
        cause = getattr(failure, "cause", None)
        return cause if isinstance(cause, BaseException) else failure
    return error
