"""Sampling (Algorithm 2, or strided DDIM) from a trained model's EMA weights (Ho et al. 2020
App. B) with a seed per image. The samples' file `samples/<E>-<S>/samples.npz` is written and
read in `pipeline.artifacts.samples` (`save_samples` / `load_samples`), with its figures by the
sample stage's work (`pipeline.jobs.sample_job.sample_run`).

`sample_batch` draws images first .. first + n - 1 of a run: image i's noise, at every step,
comes from a generator seeded by ("sample", run seed, i) alone, so the samples are the same
whether one worker made them or many, in any order. The sample stage cuts its images into
batches of sample.batch_size (`sample_chunks`, `pipeline.jobs.sample_job.sample_job`) and runs them
on Ray workers (`pipeline.cluster.ray_data.run_chunks`); `generate` runs the same batches in
this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pipeline.core.config import ExperimentConfig
from pipeline.core.progress import progress_bar
from pipeline.core.sampler_specs import sampler_options
from pipeline.data.datasets import to_uint8
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.diffusion.samplers import sample
from pipeline.diffusion.seeding import item_generators
from pipeline.model.precision import matmul_precision, with_precision


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
    seeded by ("sample", seed, i) (`pipeline.diffusion.seeding`), so it is the same image in any
    batch
    (given the same kernels). {"images": uint8 count x C x H x W} and, with
    `num_progressive`, the predicted x0 of the first of them at `progressive_steps` times
    ("progressive", "progressive_t": the paper's Fig. 6)."""
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
    with matmul_precision(cfg.precision):
        x = sample(diffusion, net, (count, *image_shape), generators, sampler=cfg.sampler,
                   device=device, callback=callback, **sampler_options(cfg))
    out = {"images": to_uint8(x.clamp(-1, 1), diffusion.data_levels).cpu().numpy()}
    if num_progressive:
        out["progressive"] = torch.stack(snapshots, dim=1).numpy()
        out["progressive_t"] = np.asarray(snapshot_t, dtype=np.int64)
    return out


def sample_chunks(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """(first, count) of each batch of a run's samples: the sample stage's chunks."""
    return [(first, min(batch_size, num_samples - first))
            for first in range(0, num_samples, batch_size)]


def generate(model: torch.nn.Module, diffusion: GaussianDiffusion, exp: ExperimentConfig,
             image_shape: tuple[int, int, int], *, seed: int, device: str | torch.device = "cpu",
             num_samples: Optional[int] = None, progress: bool = True,
             num_progressive: int = 8) -> SampleRun:
    """Draw `num_samples` (default sample.num_samples) images here, batch by batch
    (`sample_batch`): the images the sample stage's workers make."""
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
