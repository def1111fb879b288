"""The train stage's work: fit one run with Ray Train (`pipeline.cluster.ray_train.fit`), then keep
what the study reads of it, models/<E>-<S>/ and the loss curve (`train_run`), and its MLflow
record: opened with its params before training starts (`open_training`), the loss, learning
rate, images/s and gradient norm streamed while it trains (`STREAMED`, from the Ray Train
controller), the whole record at the end (`log_training`), the EMA model among it as the run's
logged model `ema` (`pipeline.artifacts.logged_model.log_ema_model`; a diverged run logs none).

The folder's state.json gets the run's bookkeeping beside the training state: the Ray run name,
the config hash, the training loop's wall time and images/s, the final loss and the run's folder
in Ray's storage (`run_path`, where its checkpoints are). With evaluate.checkpoints set, the EMA
snapshots asked for are copied in, and a local copy of snapshots fetched from a URI storage is
removed once copied.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.artifacts.logged_model import log_ema_model
from pipeline.artifacts.loss_curve import loss_curve_path, save_loss_curve
from pipeline.artifacts.models import wanted_ema_snapshots, write_model_dir
from pipeline.cluster import connection, ray_train
from pipeline.core.config import ExperimentConfig
from pipeline.core.io import is_uri
from pipeline.core.status import Status
from pipeline.core.tracking import TAG_RAY_RUN_NAME, TAG_STATUS, MetricStream, Tracker

# What a training report holds (pipeline.training.loop.train_worker) -> its MLflow metric,
# streamed every train.log_every steps: the loss and the gradient norm averaged over those
# steps, the learning rate and the throughput of the last of them.
STREAMED = {"loss": "train_loss", "lr": "lr", "images_per_s": "images_per_s",
            "grad_norm": "grad_norm"}


@dataclass(frozen=True)
class TrainedRun:
    """What `train_run` kept: the training state read back, its folder models/<E>-<S>/, and
    figures of the run."""

    exp: ExperimentConfig
    model_dir: Path
    state: dict[str, Any]
    run_name: str
    images_per_s: Optional[float]
    wall_s: float  # of the whole fit, Ray's start-up included
    snapshots: dict[int, Path]  # the EMA snapshots copied into the model folder, by step

    @property
    def steps(self) -> int:
        return self.state["step"]

    @property
    def status(self) -> str:
        return self.state["status"]

    @property
    def history(self) -> list[tuple[int, float]]:
        return self.state["loss_history"]


def train_run(exp: ExperimentConfig, train_path: Path, storage: str, models_dir: Path,
              plots_dir: Path, stream: Optional[MetricStream] = None) -> TrainedRun:
    """Fit `exp` on the prepared split at `train_path` (Ray Train storage `storage`; a killed
    run resumes there), then write models_dir/<E>-<S>/ and the loss curve in `plots_dir`.
    With `stream`, every report's `STREAMED` metrics go to it as training goes."""
    print(connection.connect(), flush=True)
    start = time.monotonic()
    try:
        callbacks = [ray_train.stream_reports(stream, STREAMED)] if stream is not None else None
        outcome = ray_train.fit(exp, train_path, storage, callbacks=callbacks)
    finally:
        connection.shutdown()
    wall = time.monotonic() - start
    state = outcome.state
    history = state["loss_history"]
    images_per_s = state["step"] * exp.train.batch_size / state["wall_s"] \
        if state.get("wall_s") else None
    run_name = ray_train.run_name(exp)
    extra = {"run_name": run_name, "config_hash": exp.config_hash(),
             "train_wall_s": state.get("wall_s"), "images_per_s": images_per_s,
             "final_loss": history[-1][1] if history else None,
             "run_path": str(outcome.run_path)}
    snapshots = wanted_ema_snapshots(exp, outcome.ema_snapshot_dir, state["step"])
    model_dir = Path(models_dir) / exp.key
    write_model_dir(model_dir, state, extra, ema_snapshots=snapshots)
    if outcome.ema_snapshot_dir is not None and is_uri(storage):  # a local copy: done
        shutil.rmtree(outcome.ema_snapshot_dir, ignore_errors=True)
    save_loss_curve(loss_curve_path(plots_dir, exp.key), history)
    return TrainedRun(exp=exp, model_dir=model_dir, state=state, run_name=run_name,
                      images_per_s=images_per_s, wall_s=wall, snapshots=snapshots)


def open_training(tracker: Tracker, exp: ExperimentConfig) -> tuple[str, MetricStream]:
    """The run's MLflow record before training starts: the run (found again by its tags when a
    killed stage is rerun), its params, and the stream of its metrics, which skips the steps
    the run already holds (a resumed training repeats those since its last checkpoint)."""
    run_id = tracker.run_of(exp)
    tracker.log_params(run_id, exp.to_dict())
    return run_id, tracker.metric_stream(run_id, resume_key=STREAMED["loss"])


def log_training(tracker: Tracker, run_id: str, run: TrainedRun) -> None:
    """The run's MLflow record at the end: the whole loss curve (the points the stream logged
    are not logged again), the loop's figures, its status, and the EMA model of its folder as
    the logged model `ema` unless the training diverged."""
    tracker.log_metric_history(run_id, STREAMED["loss"], [s for s, _ in run.history],
                               [v for _, v in run.history])
    tracker.log_metrics(run_id, {"train_wall_s": run.state.get("wall_s"),
                                 "train_images_per_s": run.images_per_s,
                                 "train_steps": run.steps})
    tracker.set_tags(run_id, {TAG_STATUS: run.status, TAG_RAY_RUN_NAME: run.run_name})
    if run.status == Status.OK:
        log_ema_model(tracker, run_id, run.exp, run.model_dir)
