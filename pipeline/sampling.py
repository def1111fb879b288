"""Trained models in and out of `models/<E>/`, and batched sample generation.

`models/<E>/` (written by the train stage) holds `ema.pt` and `model.pt` (U-Net state dicts),
`optimizer.pt`, `state.json` (step, status, timings, run name) and `config.yaml` (the resolved
experiment config); with `evaluate.checkpoints` set, also `checkpoints/ema_<step>.pt`, the EMA
weights at those training steps. Sampling uses the EMA weights (Ho et al. 2020 App. B).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from pipeline.config import ExperimentConfig
from pipeline.data import to_uint8
from pipeline.diffusion import GaussianDiffusion
from pipeline.errors import UserError
from pipeline.io import atomic_dir
from pipeline.precision import matmul_precision, with_precision
from pipeline.status import Status
from pipeline.training import build_model, ema_snapshot_path, ema_weights

CHECKPOINTS_DIR = "checkpoints"  # models/<E>/checkpoints/ema_<step>.pt: EMA weights over training

def train_command(exp: ExperimentConfig) -> str:
    """The commands that (re)make the trained model of `exp`."""
    return (f"`dvc repro train@{exp.key}` (or `python -m stages.train --experiment {exp.name} "
            f"--seed {exp.seed}`)")


class ModelError(UserError, RuntimeError):
    """A trained model folder that is missing or unreadable: names the file and the fix."""


def write_model_dir(out: Path, state: dict[str, Any], extra: dict[str, Any],
                    ema_snapshots: Optional[dict[int, Path]] = None) -> None:
    """Write `models/<E>/` atomically from a final training state (see `pipeline.training`);
    `ema_snapshots` ({step: file}) are copied to `models/<E>/checkpoints/ema_<step>.pt`."""
    with atomic_dir(out) as tmp:
        torch.save(ema_weights(state["ema"]), tmp / "ema.pt")
        for step, source in (ema_snapshots or {}).items():
            target = Path(ema_snapshot_path(tmp / CHECKPOINTS_DIR, step))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        torch.save(state["model"], tmp / "model.pt")
        torch.save({"optimizer": state["optimizer"], "scheduler": state["scheduler"]},
                   tmp / "optimizer.pt")
        info = {"step": state["step"], "status": state["status"],
                "image_shape": state["image_shape"], "data_levels": state["data_levels"],
                "wall_s": state.get("wall_s"), **extra}
        (tmp / "state.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))


def read_model_info(model_dir: Path, exp: ExperimentConfig) -> dict[str, Any]:
    """models/<E>-<S>/state.json of `exp`: step, status, image shape, data levels, timings."""
    path = Path(model_dir) / "state.json"
    if not path.is_file():
        raise ModelError(f"{path}: trained model not found; make it with {train_command(exp)}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: corrupt ({exc}); rerun {train_command(exp)}") from None


def kept_ema_snapshots(model_dir: Path) -> dict[int, Path]:
    """{step: file} of the EMA snapshots kept in `models/<E>/checkpoints/` (may be empty)."""
    from pipeline.training import ema_snapshot_steps

    return ema_snapshot_steps(Path(model_dir) / CHECKPOINTS_DIR)


def load_model(exp: ExperimentConfig, model_dir: Path, weights: str = "ema",
               device: str | torch.device = "cpu",
               checkpoint_step: Optional[int] = None) -> torch.nn.Module:
    """The experiment's U-Net with the saved `ema` (default) or raw `model` weights, eval mode;
    with `checkpoint_step`, the EMA weights kept at that training step instead."""
    info = read_model_info(model_dir, exp)
    path = Path(model_dir) / f"{weights}.pt"
    if checkpoint_step is not None:
        path = Path(ema_snapshot_path(Path(model_dir) / CHECKPOINTS_DIR, checkpoint_step))
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: weights not found; rerun "
                         + train_command(exp)) from None
    except Exception as exc:
        raise ModelError(f"{path}: corrupt or truncated weights ({type(exc).__name__}); rerun "
                         + train_command(exp)) from None
    model = build_model(exp, tuple(info["image_shape"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit the model of params.yaml "
                         f"({str(exc).splitlines()[0]}); rerun "
                         + train_command(exp)) from None
    return model.to(device).eval()


SAMPLES_FILE = "samples.npz"


def save_samples(folder: Path, images: Optional[np.ndarray], status: str,
                 image_shape: tuple[int, ...]) -> Path:
    """samples/<E>-<S>/samples.npz: `images` (uint8 N x C x H x W; none for an unstable model)
    and the model's `status`."""
    images = np.zeros((0, *image_shape), np.uint8) if images is None else images
    path = Path(folder) / SAMPLES_FILE
    np.savez(path, images=images, status=np.array(status))
    return path


def load_samples(folder: Path, exp: ExperimentConfig) -> tuple[np.ndarray, str]:
    """(images, status) from `save_samples`' file, with an error naming the command that
    remakes it if it is missing, corrupt or not uint8 N x C x H x W."""
    path = Path(folder) / SAMPLES_FILE
    command = (f"`dvc repro sample@{exp.key}` (or `python -m stages.sample --experiment "
               f"{exp.name} --seed {exp.seed}`)")
    if not path.is_file():
        raise ModelError(f"{path}: samples not found; make them with {command}")
    try:
        with np.load(path) as f:
            images, status = f["images"], str(f["status"])
    except Exception as exc:
        raise ModelError(f"{path}: corrupt or truncated samples ({type(exc).__name__}); "
                         f"remake them with {command}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ModelError(f"{path}: expected uint8 N x C x H x W images; remake them with "
                         f"{command}")
    return images, status


def is_ok(info: dict[str, Any]) -> bool:

    return info.get("status") == Status.OK


@dataclass
class SampleRun:
    images: np.ndarray  # uint8 N x C x H x W
    progressive: np.ndarray  # uint8 K x S x C x H x W: predicted x0 of K samples at S times
    progressive_t: list[int]
    wall_s: float

    @property
    def images_per_s(self) -> float:
        return len(self.images) / self.wall_s if self.wall_s > 0 else float("nan")


def generate(model: torch.nn.Module, diffusion: GaussianDiffusion, exp: ExperimentConfig,
             image_shape: tuple[int, int, int], *, seed: int, device: str | torch.device = "cpu",
             num_samples: Optional[int] = None, progress: bool = True,
             num_progressive: int = 8, progressive_steps: int = 10) -> SampleRun:
    """Draw `num_samples` (default sample.num_samples) images with the configured sampler, in
    batches of sample.batch_size, from one seeded generator, the U-Net at sample.precision
    (compiled with sample.compile); keep the predicted x0 of the first `num_progressive`
    samples at `progressive_steps` times (the paper's Fig. 6)."""
    cfg = exp.sample
    total = cfg.num_samples if num_samples is None else num_samples
    generator = torch.Generator(device=device).manual_seed(seed)
    steps = cfg.steps or diffusion.num_timesteps
    kept_steps = set(np.linspace(0, steps - 1, progressive_steps).round().astype(int).tolist())
    snapshots: list[torch.Tensor] = []
    snapshot_t: list[int] = []
    out = []
    net = with_precision(model, cfg.precision)
    if cfg.compile:  # TorchInductor; the first call (and a smaller last batch) compiles
        net = torch.compile(net)
    start = time.monotonic()
    for first in range(0, total, cfg.batch_size):
        n = min(cfg.batch_size, total - first)

        def callback(step, t, x, pred_x0, _first=first):
            if _first == 0 and step in kept_steps:
                snapshots.append(to_uint8(pred_x0[:num_progressive].clamp(-1, 1),
                                          diffusion.data_levels).cpu())
                snapshot_t.append(int(t))

        kwargs = {"steps": cfg.steps, "eta": cfg.eta} if cfg.sampler == "ddim" else {}
        with matmul_precision(cfg.precision):
            x = diffusion.sample(net, (n, *image_shape), generator, sampler=cfg.sampler,
                                 device=device, callback=callback, progress=progress, **kwargs)
        out.append(to_uint8(x.clamp(-1, 1), diffusion.data_levels).cpu())
    wall = time.monotonic() - start
    images = torch.cat(out).numpy()
    prog = torch.stack(snapshots, dim=1).numpy() if snapshots else \
        np.zeros((0, 0, *image_shape), np.uint8)
    return SampleRun(images=images, progressive=prog, progressive_t=snapshot_t, wall_s=wall)
