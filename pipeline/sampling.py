"""Batched sample generation (Algorithm 2, or strided DDIM) from a trained model's EMA weights
(Ho et al. 2020 App. B), and the samples' file `samples/<E>-<S>/samples.npz`
(`save_samples` / `load_samples`) with its figures (`sample_run`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.config import ExperimentConfig
from pipeline.data import to_uint8
from pipeline.diffusion import GaussianDiffusion
from pipeline.io import atomic_dir
from pipeline.precision import matmul_precision, with_precision
from pipeline.status import Status
from pipeline.models import ModelError, is_ok, load_model, read_model_info

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


def sample_run(exp: ExperimentConfig, models_dir: Path, out_dir: Path,
               device: str = "cpu") -> Optional[SampleRun]:
    """Sample run `exp` (models/<key>/, its EMA weights) into `out_dir`/<key>/: samples.npz,
    grid.png and progressive.png (predicted x0 over time), written together. A model recorded
    as unstable gets an empty samples.npz and figures that say so (returns None)."""
    from pipeline.figures import save_placeholder, save_progressive, save_sample_grid

    model_dir = Path(models_dir) / exp.key
    info = read_model_info(model_dir, exp)
    shape = tuple(info["image_shape"])
    out = Path(out_dir) / exp.key
    if not is_ok(info):
        with atomic_dir(out) as tmp:
            save_samples(tmp, None, info.get("status", Status.UNSTABLE.value), shape)
            for name in ("grid.png", "progressive.png"):
                save_placeholder(tmp / name, f"{exp.key}: training diverged (unstable)")
        return None
    model = load_model(exp, model_dir, "ema", device)
    diffusion = GaussianDiffusion.from_config(exp.diffusion, data_levels=info["data_levels"])
    result = generate(model, diffusion, exp, shape, seed=exp.seed + 1, device=device)
    n = exp.sample.grid_size
    with atomic_dir(out) as tmp:
        save_samples(tmp, result.images, Status.OK.value, shape)
        save_sample_grid(result.images[: n * n], tmp / "grid.png", nrow=n)
        save_progressive(result.progressive, result.progressive_t, tmp / "progressive.png",
                         f"{exp.key}: predicted x0 over time")
    return result
