"""The sample stage's work: a run's images cut into chunks of sample.batch_size (`sample_job`),
run on Ray workers, written as samples.npz with its figures (`sample_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.artifacts.figures import save_placeholder, save_progressive, save_sample_grid
from pipeline.artifacts.models import is_ok, load_weights, read_model_info
from pipeline.artifacts.samples import save_samples
from pipeline.cluster import ray_data
from pipeline.core.config import WORKER_KEYS, ExperimentConfig
from pipeline.core.io import atomic_dir, file_digest
from pipeline.core.status import Status
from pipeline.measure.chunks import Chunk, ChunkStore, ShardedJob, Workers, job_name
from pipeline.measure.sampling import SAMPLE_SEED_OFFSET, SampleRun, sample_chunks

NUM_PROGRESSIVE = 8  # samples shown over time in progressive.png


def sample_job(exp: ExperimentConfig, model_dir: Path, info: dict, *, model_name: str = "ema",
               weights: Optional[dict] = None, stage: str = "sample"):
    """The sample stage's `ShardedJob`: sample.num_samples images of the run's EMA model (or of
    `weights`) in chunks of sample.batch_size, on sample.num_workers workers (its units:
    images)."""
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
                if k not in WORKER_KEYS}
    name = job_name(exp, stage, workers, source, settings, exp.to_dict()["diffusion"],
                    exp.to_dict()["model"], info["image_shape"], info["data_levels"], seed)
    return ShardedJob(name=name, label=f"{stage} {exp.key}", unit="images", chunks=chunks,
                      workers=workers,
                      spec={"experiment": exp.to_dict(), "image_shape": info["image_shape"],
                            "data_levels": info["data_levels"], "extractor": None},
                      objects={"models": {model_name: state}, "images": {}})


def sample_run(exp: ExperimentConfig, models_dir: Path, out_dir: Path,
               storage: str | Path, on_progress=None) -> Optional[SampleRun]:
    """Sample run `exp` (models/<key>/, its EMA weights) into `out_dir`/<key>/ on Ray workers
    (`pipeline.cluster.ray_data.run_chunks`, finished chunks kept in `storage` until the output is
    written): samples.npz, grid.png and progressive.png (predicted x0 over time), written
    together. A model recorded as unstable gets an empty samples.npz and figures that say so
    (returns None). `on_progress(images done, images/s)` is called as each chunk comes back."""
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
    run = ray_data.run_chunks(job, storage, on_progress=on_progress)
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
