"""Every Ray import of the project lives here: the cluster connection, Ray Train's TorchTrainer
around the shared per-worker training function, and (for the sweep) Ray Tune.

- With `RAY_ADDRESS` set (as `ray job submit` does), stages connect to that cluster; otherwise
  they start a local one sized to this machine.
- Training runs under a fixed run name and storage path (`checkpoints/<run name>`), outside every
  DVC output: Ray Train (V2) finds the run's last checkpoint there and resumes from it, whether
  a worker died (`FailureConfig(max_failures)`) or the whole `dvc repro` was killed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pipeline.config import ExperimentConfig
from pipeline.training import STATE_FILE, load_training_state, train_worker


class TrainingError(RuntimeError):
    """Training failed after Ray's retries; the message says why and where the logs are."""


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------


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
    # A private single-machine cluster on loopback, without token auth. The dashboard process
    # serves the state API that Ray Train uses to clean up after its controller.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=True,
             configure_logging=False)
    return f"started a local Ray instance ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)"


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# The worker side of Ray Train
# --------------------------------------------------------------------------------------------


class RaySession:
    """`pipeline.training.Session` backed by Ray Train (runs inside each training worker)."""

    def __init__(self, threads: int):
        import ray.train
        import ray.train.torch

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
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        local = self._scratch / "resume"
        local.mkdir(parents=True, exist_ok=True)
        with checkpoint.as_directory() as folder:
            shutil.copy2(Path(folder) / STATE_FILE, local / STATE_FILE)
        return local

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path] = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) \
            if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted to storage by now

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value


def _ray_train_loop(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: rebuild the config, run the shared worker."""
    exp = ExperimentConfig.from_dict(config["experiment"])
    session = RaySession(threads=config["threads"])
    on_log = config.get("on_log")
    train_worker(exp, config["train_data"], session, checkpoint_root=session._scratch / "out",
                 on_log=on_log)


# --------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------


@dataclass
class FitOutcome:
    status: str
    state: dict[str, Any]
    run_path: Path


def code_digest() -> str:
    """Short hash of the source of every module that shapes a trained model."""
    import hashlib

    from pipeline import data, diffusion, schedules, training, unet

    digest = hashlib.sha256()
    for module in (data, diffusion, schedules, training, unet):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:8]


def run_name(exp: ExperimentConfig) -> str:
    """Fixed per (study, experiment, training config, training code): a rerun finds and resumes
    its checkpoints; a changed config or changed code trains afresh under a new name."""
    return f"{exp.study.name}-{exp.name}-{exp.config_hash()}-{code_digest()}"


def scaling_config(exp: ExperimentConfig):
    import ray.train

    resources = {"CPU": exp.train.cpus_per_worker}
    if exp.train.use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(num_workers=exp.train.num_workers, use_gpu=exp.train.use_gpu,
                                   resources_per_worker=resources)


def make_trainer(exp: ExperimentConfig, train_data: Path, storage_path: Path, name: str,
                 on_log: Optional[Callable] = None, callbacks: Optional[list] = None):
    """A TorchTrainer for experiment `exp` (DDP: gloo on CPU, nccl on GPU)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        _ray_train_loop,
        train_loop_config={"experiment": exp.to_dict(), "train_data": str(train_data),
                           "threads": max(1, int(exp.train.cpus_per_worker)),
                           "on_log": on_log},
        torch_config=TorchConfig(backend="nccl" if exp.train.use_gpu else "gloo"),
        scaling_config=scaling_config(exp),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=exp.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )


def fit(exp: ExperimentConfig, train_data: Path, storage_path: Path) -> FitOutcome:
    """Train `exp` with Ray Train, resuming from its last checkpoint under `storage_path`, and
    return the final training state (read from the last reported checkpoint)."""
    name = run_name(exp)
    trainer = make_trainer(exp, Path(train_data).resolve(), Path(storage_path).resolve(), name)
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        raise TrainingError(
            f"training of '{exp.name}' failed after {exp.train.max_failures} retries: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}; "
            f"checkpoints and logs are under {Path(storage_path).resolve() / name}") from exc
    if result.checkpoint is None:
        raise TrainingError(f"training of '{exp.name}' reported no checkpoint; see the logs "
                            f"under {Path(storage_path).resolve() / name}")
    with result.checkpoint.as_directory() as folder:
        state = load_training_state(Path(folder) / STATE_FILE)
    return FitOutcome(status=state["status"], state=state,
                      run_path=Path(storage_path).resolve() / name)
