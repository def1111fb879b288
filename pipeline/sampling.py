"""Sampling (Algorithm 2, or strided DDIM) from a trained model's EMA weights (Ho et al. 2020
App. B) with a seed per image, and the samples' file `samples/<E>-<S>/samples.npz`
(`save_samples` / `load_samples`) with its figures (`sample_run`).

`sample_batch` draws images first .. first + n - 1 of a run: image i's noise, at every step,
comes from a generator seeded by ("sample", run seed, i) alone, so the samples are the same
whether one worker made them or many, in any order. The sample stage cuts its images into
batches of sample.batch_size (`sample_job`) and runs them on Ray workers
(`pipeline.distributed.run_chunks`); `generate` runs the same batches in this process.
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
from pipeline.models import ModelError, is_ok, read_model_info

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
    workers: int = 1
    computed: int = 0  # chunks computed (the rest were found in storage)
    reused: int = 0
    redone: int = 0  # chunks begun twice: a worker was lost

    @property
    def images_per_s(self) -> float:
        return len(self.images) / self.wall_s if self.wall_s > 0 else float("nan")


def sampling_network(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """`model` evaluated at sample.precision, compiled with sample.compile (TorchInductor: the
    first call, and a batch of another size, compile)."""
    net = with_precision(model, cfg.precision)
    return torch.compile(net) if cfg.compile else net


def sample_batch(net: torch.nn.Module, diffusion: GaussianDiffusion, cfg,
                 image_shape: tuple[int, int, int], first: int, count: int, *, seed: int,
                 device: str | torch.device = "cpu", num_progressive: int = 0,
                 progressive_steps: int = 10) -> dict[str, np.ndarray]:
    """Images first .. first + count - 1 of a run's samples, in one batch, with the sampler of
    `cfg` (a SampleConfig): image i draws x_T and every step's noise from its own generator,
    seeded by ("sample", seed, i) (`pipeline.seeding`), so it is the same image in any batch
    (given the same kernels). {"images": uint8 count x C x H x W} and, with
    `num_progressive`, the predicted x0 of the first of them at `progressive_steps` times
    ("progressive", "progressive_t": the paper's Fig. 6)."""
    from pipeline.seeding import item_generators

    steps = cfg.steps or diffusion.num_timesteps
    kept = set(np.linspace(0, steps - 1, progressive_steps).round().astype(int).tolist())
    snapshots: list[torch.Tensor] = []
    snapshot_t: list[int] = []

    def callback(step, t, x, pred_x0):
        if num_progressive and step in kept:
            snapshots.append(to_uint8(pred_x0[:num_progressive].clamp(-1, 1),
                                      diffusion.data_levels).cpu())
            snapshot_t.append(int(t))

    generators = item_generators("sample", seed, range(first, first + count), device)
    kwargs = {"steps": cfg.steps, "eta": cfg.eta} if cfg.sampler == "ddim" else {}
    with matmul_precision(cfg.precision):
        x = diffusion.sample(net, (count, *image_shape), generators, sampler=cfg.sampler,
                             device=device, callback=callback, **kwargs)
    out = {"images": to_uint8(x.clamp(-1, 1), diffusion.data_levels).cpu().numpy()}
    if num_progressive:
        out["progressive"] = torch.stack(snapshots, dim=1).numpy()
        out["progressive_t"] = np.asarray(snapshot_t, dtype=np.int64)
    return out


def generate(model: torch.nn.Module, diffusion: GaussianDiffusion, exp: ExperimentConfig,
             image_shape: tuple[int, int, int], *, seed: int, device: str | torch.device = "cpu",
             num_samples: Optional[int] = None, progress: bool = True,
             num_progressive: int = 8) -> SampleRun:
    """Draw `num_samples` (default sample.num_samples) images here, batch by batch
    (`sample_batch`): the images the sample stage's workers make."""
    from pipeline.progress import progress_bar
    from pipeline.sharding import sample_chunks

    cfg = exp.sample
    total = cfg.num_samples if num_samples is None else num_samples
    net = sampling_network(model, cfg)
    start = time.monotonic()
    parts = [sample_batch(net, diffusion, cfg, image_shape, first, count, seed=seed,
                          device=device, num_progressive=num_progressive if first == 0 else 0)
             for first, count in progress_bar(sample_chunks(total, cfg.batch_size),
                                              desc="sampling", enabled=progress)]
    return SampleRun(images=np.concatenate([p["images"] for p in parts]),
                     progressive=parts[0].get("progressive", np.zeros((0, 0, *image_shape),
                                                                      np.uint8)),
                     progressive_t=parts[0].get("progressive_t", np.zeros(0)).tolist(),
                     wall_s=time.monotonic() - start, computed=len(parts))


SAMPLE_SEED_OFFSET = 1  # a run's samples: stream ("sample", seed + 1)
NUM_PROGRESSIVE = 8  # samples shown over time in progressive.png


def sample_job(exp: ExperimentConfig, model_dir: Path, info: dict, *, model_name: str = "ema",
               weights: Optional[dict] = None, stage: str = "sample"):
    """The sample stage's `ShardedJob`: sample.num_samples images of the run's EMA model (or of
    `weights`) in chunks of sample.batch_size, on sample.num_workers workers (its units:
    images)."""
    from pipeline.models import load_weights
    from pipeline.sharding import Chunk, ShardedJob, Workers, file_digest, job_name, sample_chunks

    cfg = exp.sample
    workers = Workers.of(cfg, "sample")
    seed = exp.seed + SAMPLE_SEED_OFFSET
    state = weights if weights is not None else load_weights(exp, model_dir, "ema")
    source = file_digest(Path(model_dir) / "ema.pt") if weights is None else "untrained"
    chunks = [Chunk(f"sample-{first:06d}", "sample", count,
                    {"model": model_name, "first": first, "count": count, "seed": seed,
                     "progressive": NUM_PROGRESSIVE if first == 0 else 0})
              for first, count in sample_chunks(cfg.num_samples, cfg.batch_size)]
    settings = {k: v for k, v in exp.to_dict()["sample"].items()
                if k not in ("num_workers", "cpus_per_worker")}
    name = job_name(exp, stage, workers, source, settings, exp.to_dict()["diffusion"],
                    exp.to_dict()["model"], info["image_shape"], info["data_levels"], seed)
    return ShardedJob(name=name, label=f"{stage} {exp.key}", unit="images", chunks=chunks,
                      workers=workers,
                      spec={"experiment": exp.to_dict(), "image_shape": info["image_shape"],
                            "data_levels": info["data_levels"], "extractor": None},
                      objects={"models": {model_name: state}, "images": {}})


def sample_run(exp: ExperimentConfig, models_dir: Path, out_dir: Path,
               storage: str | Path) -> Optional[SampleRun]:
    """Sample run `exp` (models/<key>/, its EMA weights) into `out_dir`/<key>/ on Ray workers
    (`pipeline.distributed.run_chunks`, finished chunks kept in `storage` until the output is
    written): samples.npz, grid.png and progressive.png (predicted x0 over time), written
    together. A model recorded as unstable gets an empty samples.npz and figures that say so
    (returns None)."""
    from pipeline import distributed
    from pipeline.figures import save_placeholder, save_progressive, save_sample_grid
    from pipeline.sharding import ChunkStore

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
    job = sample_job(exp, model_dir, info)
    run = distributed.run_chunks(job, storage)
    parts = run.of(job.chunks)
    result = SampleRun(images=np.concatenate([p["images"] for p in parts]),
                       progressive=parts[0]["progressive"],
                       progressive_t=parts[0]["progressive_t"].tolist(), wall_s=run.wall_s,
                       workers=run.workers, computed=run.computed, reused=run.reused,
                       redone=run.redone)
    n = exp.sample.grid_size
    with atomic_dir(out) as tmp:
        save_samples(tmp, result.images, Status.OK.value, shape)
        save_sample_grid(result.images[: n * n], tmp / "grid.png", nrow=n)
        save_progressive(result.progressive, result.progressive_t, tmp / "progressive.png",
                         f"{exp.key}: predicted x0 over time")
    ChunkStore(storage, job.name).discard()
    return result
