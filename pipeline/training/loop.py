"""The per-worker training function (Algorithm 1), shared by Ray Train and Ray Tune.

`train_worker` runs on every data-parallel worker. It knows nothing about Ray: a `Session`
(implemented with Ray Train in `pipeline.cluster`, and in-process by `LocalSession` here)
gives it its rank, device, DDP wrapping, the checkpoint to resume from, and a `report` call.

Training state (model, EMA, Adam, LR schedule, timestep sampler, data order, random generators,
the loss curve so far) is saved as one checkpoint folder every `checkpoint_every` steps and at the
end; a restarted worker resumes from it with the step counter, optimizer and EMA continuous.
A non-finite loss stops training and is reported as status `unstable`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch.optim.swa_utils import AveragedModel

from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.core.io import torch_load
from pipeline.core.progress import StepProgress
from pipeline.core.status import Status
from pipeline.data.datasets import (ImageBatches, Prepared, default_hflip, load_prepared,
                                    to_model_range)
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.diffusion.timesteps import timestep_sampler
from pipeline.model.ema import ema_snapshot_path, make_ema, save_ema_snapshot
from pipeline.model.precision import matmul_precision, with_precision
from pipeline.model.unet import build_model

STATE_FILE = "state.pt"


class Session(Protocol):
    """What a training worker needs from its runtime (Ray Train, or a plain process)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def latest_checkpoint(self) -> Optional[Path]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path] = None) -> None: ...

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str = "constant",
              final: float = 0.0) -> float:
    """The learning rate of step `step` (0-based) as a fraction of `train.lr`: a linear warm-up
    over `warmup_steps` (Ho et al. App. B), then constant, or a cosine from 1 down to `final`
    at the last step (Loshchilov & Hutter 2017)."""
    warmup = max(warmup_steps, 1)
    factor = min(1.0, (step + 1) / warmup)
    if schedule == "constant" or step + 1 <= warmup:
        return factor
    progress = min(1.0, (step + 1 - warmup) / max(steps - warmup, 1))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, exp: ExperimentConfig):
    """Adam (Ho et al. App. B) with the learning-rate schedule of `lr_factor`."""
    cfg = exp.train
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule,
                                          cfg.lr_final))
    return optimizer, scheduler


def seed_generators(seed: int, rank: int, device: torch.device) -> dict[str, torch.Generator]:
    """Independent generators: `data` (same on every rank: the global batch order and flips),
    `noise` and `timesteps` (per rank)."""
    data = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    noise = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 1000 + rank)
    steps = torch.Generator().manual_seed(seed * 1_000_003 + 2000 + rank)
    return {"data": data, "noise": noise, "timesteps": steps}


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------


def train_worker(exp: ExperimentConfig, train_data: str | Path | Prepared, session: Session,
                 checkpoint_root: str | Path,
                 on_log: Optional[Callable[[int, dict[str, Any]], dict[str, Any]]] = None,
                 ema_snapshot_dir: Optional[str | Path] = None) -> None:
    """Train experiment `exp` on the prepared train split `train_data` (its file, or the split
    itself, as a Ray worker gets it from the object store) (Algorithm 1).

    Reports `{"step", "loss", "lr", "images_per_s", "grad_norm", "status"}` every `log_every`
    steps (loss and gradient norm averaged over those steps; the norm is that of the gradients
    before clipping, `clip_grad_norm_`'s own, the same on every rank after DDP) through
    `session.report`, with a checkpoint folder every `checkpoint_every` steps and at the end.
    `on_log(step, metrics)` may add metrics (e.g. a validation NLL for Ray Tune) on rank 0.
    With `ema_snapshot_dir` (a local folder or a storage URI), rank 0 also keeps the EMA weights
    of every checkpoint step there as `ema_<step>.pt` (`ema_snapshot_path`), for scores over
    training (FID by checkpoint).
    The U-Net runs at `train.precision` (pipeline/model/precision.py); everything else in float32.
    """
    with matmul_precision(exp.train.precision):
        _train_worker(exp, train_data, session, checkpoint_root, on_log, ema_snapshot_dir)


def _train_worker(exp: ExperimentConfig, train_data: str | Path | Prepared, session: Session,
                  checkpoint_root: str | Path, on_log, ema_snapshot_dir) -> None:
    torch.manual_seed(exp.seed)
    device = session.device
    # a path, or the split itself (a `Prepared`, which Ray may hand over as a plain tuple)
    images, _, levels = load_prepared(train_data) \
        if isinstance(train_data, (str, os.PathLike)) else train_data
    images_t = torch.tensor(images, device=device)  # a copy: Ray hands the split over read-only
    diffusion = GaussianDiffusion.from_config(exp.diffusion, data_levels=levels)
    model = build_model(exp, tuple(images.shape[1:])).to(device)
    if device.type == "cuda":  # on CPU channels_last measured slower for these U-Nets
        model = model.to(memory_format=torch.channels_last)
    ema = make_ema(model, exp.train.ema_decay, exp.train.ema_warmup)
    optimizer, scheduler = make_optimizer(model, exp)
    gens = seed_generators(exp.seed, session.rank, device)
    batches = ImageBatches(images_t, exp.train.batch_size, gens["data"],
                           hflip=default_hflip(exp.data), rank=session.rank,
                           world_size=session.world_size)
    t_sampler = timestep_sampler(exp.diffusion, diffusion.num_timesteps)
    training = TrainingState(exp=exp, model=model, ema=ema, optimizer=optimizer,
                             scheduler=scheduler, t_sampler=t_sampler, batches=batches,
                             gens=gens, image_shape=tuple(images.shape[1:]), data_levels=levels)
    step, loss_history, wall_before = 0, [], 0.0

    resume = session.latest_checkpoint()
    if resume is not None:
        state = load_training_state(resume / STATE_FILE, map_location=device)
        training.restore(state, session)
        step, loss_history = state["step"], [tuple(x) for x in state["loss_history"]]
        wall_before = state.get("wall_s", 0.0)
        if state.get("status") == Status.UNSTABLE:
            session.report({"step": step, "status": Status.UNSTABLE.value}, None)
            return

    train_model = with_precision(session.prepare_model(model), exp.train.precision)
    train_model.train()
    if exp.train.compile:  # the forward and backward through TorchInductor; same weights
        train_model = torch.compile(train_model)
    start = time.monotonic()
    window_loss = torch.zeros((), device=device, dtype=torch.float64)
    window_grad_norm = torch.zeros((), device=device, dtype=torch.float64)
    window_count = 0
    window_start = time.monotonic()
    status = Status.OK.value
    log_every, ckpt_every, total = exp.train.log_every, exp.train.checkpoint_every, exp.train.steps
    last_checkpoint_step = step
    # rank 0's progress: a line per log step (Ray job logs, CI) or a tqdm bar on a terminal
    progress = StepProgress(total, desc=f"train {exp.key}", start_step=step, stream=sys.stdout,
                            enabled=session.rank == 0 and step < total)

    while step < total:
        x0 = to_model_range(next(batches), levels)
        if device.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss, grad_norm = train_step(train_model, model, diffusion, x0, t_sampler, gens,
                                     optimizer, scheduler, ema, exp.train.grad_clip)
        window_loss += loss.double()
        window_grad_norm += grad_norm.double()
        window_count += 1
        step += 1

        if step % log_every == 0 or step == total:
            mean_loss = float(session.all_reduce_mean(window_loss / window_count))
            elapsed = time.monotonic() - window_start
            metrics = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                       "images_per_s": window_count * exp.train.batch_size / max(elapsed, 1e-9),
                       "grad_norm": float(window_grad_norm / window_count),
                       "status": Status.OK.value}
            window_loss.zero_()
            window_grad_norm.zero_()
            window_count, window_start = 0, time.monotonic()
            if not math.isfinite(mean_loss):
                status = Status.UNSTABLE.value
                metrics["status"] = status
            loss_history.append((step, mean_loss))
            progress.update(step, loss=mean_loss, images_per_s=metrics["images_per_s"])
            if on_log is not None and status == Status.OK and session.rank == 0:
                metrics.update(on_log(step, {"ema": ema.module, "model": model,
                                             "diffusion": diffusion}))
            checkpoint = None
            if status != Status.OK or step % ckpt_every == 0 or step == total:
                checkpoint = _save_checkpoint(session, checkpoint_root, training, step, status,
                                              loss_history,
                                              wall_before + time.monotonic() - start)
                last_checkpoint_step = step
                if ema_snapshot_dir is not None and status == Status.OK and session.rank == 0:
                    save_ema_snapshot(ema, ema_snapshot_path(ema_snapshot_dir, step))
            session.report(metrics, checkpoint)
            if status != Status.OK:
                break
    progress.close()
    if last_checkpoint_step != step:  # resumed at the end: report the final state once more
        checkpoint = _save_checkpoint(session, checkpoint_root, training, step, status,
                                      loss_history, wall_before)
        session.report({"step": step, "status": status}, checkpoint)


def train_step(train_model: torch.nn.Module, model: torch.nn.Module,
               diffusion: GaussianDiffusion, x0: torch.Tensor, t_sampler, gens: dict,
               optimizer, scheduler, ema: AveragedModel,
               grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Algorithm 1 on the batch `x0` (model range): timesteps and noise from
    `gens`, the experiment's loss through `train_model` (`model`, possibly DDP-wrapped,
    autocast or compiled), then `apply_gradients`. Returns the detached mean loss and the
    gradient norm before clipping."""
    t, weights = t_sampler.sample(x0.shape[0], gens["timesteps"], x0.device)
    noise = torch.randn(x0.shape, generator=gens["noise"], device=x0.device)
    terms = diffusion.training_losses(train_model, x0, t, noise)
    loss = (terms["loss"] * weights).mean()
    grad_norm = apply_gradients(loss, model, optimizer, scheduler, ema, grad_clip)
    t_sampler.update(t, terms["loss"])
    return loss.detach(), grad_norm


def apply_gradients(loss: torch.Tensor, model: torch.nn.Module, optimizer, scheduler,
                    ema: AveragedModel, grad_clip: float) -> torch.Tensor:
    """Backward, gradient clipping to `grad_clip`, an Adam step, the LR schedule, the EMA.
    Returns the total gradient norm before clipping (what `clip_grad_norm_` measured)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    ema.update_parameters(model)
    return grad_norm.detach()


@dataclass
class TrainingState:
    """The live objects of a training run that a checkpoint saves and a resume restores."""

    exp: ExperimentConfig
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    t_sampler: Any
    batches: ImageBatches
    gens: dict[str, torch.Generator]
    image_shape: tuple[int, int, int]
    data_levels: int

    def state_dict(self, step: int, status: str, loss_history: list,
                   wall_s: float) -> dict[str, Any]:
        """The checkpoint's content (`STATE_FILE`, read back by `load_training_state`)."""
        return {
            "format": "ddpm-train-state/1",
            "step": step,
            "status": status,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "timestep_sampler": self.t_sampler.state_dict(),
            "batches": self.batches.state_dict(),
            "generators": {name: gen.get_state() for name, gen in self.gens.items()},
            "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "loss_history": list(loss_history),
            "wall_s": wall_s,
            "config": self.exp.to_dict(),
            "image_shape": list(self.image_shape),
            "data_levels": int(self.data_levels),
        }

    def restore(self, state: dict[str, Any], session: "Session") -> None:
        """Load a checkpoint's state into the live objects (step, history and time are the
        caller's)."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.t_sampler.load_state_dict(state["timestep_sampler"])
        self.batches.load_state_dict(state["batches"])
        for name, gen in self.gens.items():
            if name in state["generators"]:
                gen.set_state(state["generators"][name])
        device = session.device
        if session.world_size == 1:  # rank 0's global generator; other ranks reseed
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        else:
            torch.manual_seed(self.exp.seed + 7919 * (session.rank + 1) + state["step"])


def _save_checkpoint(session: Session, root: str | Path, training: TrainingState, step: int,
                     status: str, loss_history: list, wall_s: float) -> Optional[Path]:
    """Rank 0 writes the full training state into a fresh folder; other ranks write nothing."""
    if session.rank != 0:
        return None
    folder = Path(root) / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(training.state_dict(step, status, loss_history, wall_s), tmp)
    tmp.replace(folder / STATE_FILE)
    return folder


class CheckpointError(UserError, RuntimeError):
    """A training checkpoint that cannot be read: names the file and what to do. `path` and
    `reason` (what is wrong with it, without the fix) are kept as fields, through pickling too
    (the error crosses from a Ray worker to the driver)."""

    def __init__(self, message: str, *, path: str | Path | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.reason = reason or message

    def __reduce__(self):
        return (_checkpoint_error, (self.args[0], self.path, self.reason))


def _checkpoint_error(message: str, path: str | None, reason: str | None) -> CheckpointError:
    return CheckpointError(message, path=path, reason=reason)


def load_training_state(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Read a `state.pt` written by `train_worker`, with a clear error if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run the train stage first "
                              "(`dvc repro train@<experiment>`)", path=path,
                              reason=f"{path}: checkpoint not found")
    try:
        state = torch_load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, unpickling error, ...
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc}); delete it "
            "and rerun the train stage to retrain (or resume from an earlier checkpoint)",
            path=path, reason=f"{path}: corrupt or truncated checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != "ddpm-train-state/1":
        raise CheckpointError(f"{path}: not a training checkpoint of this project; delete it and "
                              "rerun the train stage", path=path,
                              reason=f"{path}: not a training checkpoint of this project")
    return state


# --------------------------------------------------------------------------------------------
# Running without Ray (tests, debugging)
# --------------------------------------------------------------------------------------------


class LocalSession:
    """A single-process Session: rank 0 of 1, checkpoints kept in `checkpoint_root`."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_root: str | Path, device: str = "cpu"):
        self.device = torch.device(device)
        self.checkpoint_root = Path(checkpoint_root)
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def prepare_model(self, model):
        return model

    def latest_checkpoint(self) -> Optional[Path]:
        found = sorted(self.checkpoint_root.glob("step_*/" + STATE_FILE))
        return found[-1].parent if found else None

    def report(self, metrics, checkpoint_dir=None):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            self.checkpoints.append(Path(checkpoint_dir))

    def all_reduce_mean(self, value):
        return value
