"""What the `sampling_steps` stage measures: one run's FID, IS, KID and precision / recall
against the number of sampling steps, the question users of DDPM code ask most after FID
itself.

The run's trained EMA model draws sample.num_samples images with DDIM at each count of
`sampling_steps.ddim_steps` (noise scale `sampling_steps.eta`) and with ancestral sampling at
all T steps, every image from the per-image seeds of the run's own samples (stream ("sample",
seed + 1)): the ancestral setting redraws the sample stage's images, and each setting differs
from the others by its sampler alone. Each setting is one set of `sample_features` chunks on
Ray workers (sample.num_workers of them, `pipeline.cluster.ray_data.run_chunks`); its scores
come from the features as the evaluate stage's do (`evaluation.scores_of`), against the train
split's reference statistics. The result is metrics/<E>-<S>_sampling_steps.csv
(`pipeline.artifacts.records.save_sampling_steps`), which tabulate turns into
results/sampling_steps.{md,csv,png}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd

from pipeline.artifacts.models import is_ok, load_weights, read_model_info
from pipeline.artifacts.records import SAMPLING_STEPS_COLUMNS
from pipeline.cluster import ray_data  # Ray: imported when work is run
from pipeline.core.config import WORKER_KEYS, SamplingStepsConfig
from pipeline.core.io import file_digest
from pipeline.core.status import Status
from pipeline.jobs.evaluate_job import Apparatus, flatten, sampled_feature_chunks, scores_of
from pipeline.measure.chunks import ChunkStore, ShardedJob, Workers, job_name
from pipeline.measure.digits_classifier import classifier_path
from pipeline.measure.sampling import SAMPLE_SEED_OFFSET
from pipeline.measure.stats import FeatureMoments, KernelReference


def settings(cfg: SamplingStepsConfig) -> list[dict[str, Any]]:
    """The samplers measured, as the `sample` keys each one replaces: DDIM at each count of
    `cfg.ddim_steps`, then ancestral sampling at all T steps (steps None)."""
    return [*({"sampler": "ddim", "steps": steps, "eta": cfg.eta} for steps in cfg.ddim_steps),
            {"sampler": "ancestral", "steps": None, "eta": 0.0}]


@dataclass
class StepsInputs:
    """What one run's measurement reads, checked before any work: its model record and, for a
    run that trained, the apparatus of its study and the reference side of FID and KID."""

    exp: Any
    model_dir: Path
    info: dict[str, Any]
    apparatus: Optional[Apparatus] = None  # None: the run diverged, nothing to measure
    reference: Optional[FeatureMoments] = None
    kernel: Optional[KernelReference] = None


def steps_inputs(exp, data_dir: Path, models_dir: Path,
                 reference_stats: str | Path) -> StepsInputs:
    """Read run `exp`'s model record (models/<key>/) and, if it trained, the prepared splits,
    the extractor and the reference statistics file, each checked (a `UserError` naming the
    file and the fix)."""
    model_dir = Path(models_dir) / exp.key
    inputs = StepsInputs(exp, model_dir, read_model_info(model_dir, exp))
    if is_ok(inputs.info):
        inputs.apparatus = Apparatus.load(exp, data_dir, classifier_path(models_dir))
        inputs.reference, inputs.kernel = inputs.apparatus.reference_side(reference_stats)
    return inputs


def steps_job(inputs: StepsInputs, cfg: SamplingStepsConfig
              ) -> tuple[ShardedJob, list[tuple[dict[str, Any], int, list]]]:
    """The stage's `ShardedJob` and, per setting of `settings`, its number of steps (all T
    for ancestral sampling) and its chunks."""
    exp, apparatus, info = inputs.exp, inputs.apparatus, inputs.info
    n, batch = exp.sample.num_samples, exp.sample.batch_size
    seed = exp.seed + SAMPLE_SEED_OFFSET
    parts = []
    for setting in settings(cfg):
        steps = setting["steps"] or exp.diffusion.num_timesteps
        prefix = f"{setting['sampler']}{steps}"
        parts.append((setting, steps, sampled_feature_chunks("ema", n, batch, steps, seed,
                                                             prefix, sampler=setting)))
    workers = Workers.of(exp.sample, "sample")
    sample_settings = {k: v for k, v in exp.to_dict()["sample"].items() if k not in WORKER_KEYS}
    name = job_name(exp, "sampling_steps", workers, *apparatus.digests(),
                    file_digest(inputs.model_dir / "ema.pt"), sample_settings,
                    exp.to_dict()["evaluate"]["is_splits"], [p[0] for p in parts],
                    exp.to_dict()["diffusion"], exp.to_dict()["model"], info["data_levels"])
    job = ShardedJob(
        name=name, label=f"sampling_steps {exp.key}", unit="evaluations",
        chunks=[c for _, _, chunks in parts for c in chunks], workers=workers,
        spec={"experiment": exp.to_dict(), "image_shape": info["image_shape"],
              "data_levels": info["data_levels"], "extractor": apparatus.extractor},
        objects={"models": {"ema": load_weights(exp, inputs.model_dir, "ema")},
                 "extractor_weights": apparatus.extractor_weights(), "images": {}})
    return job, parts


@dataclass
class StepsResult:
    scores: pd.DataFrame        # SAMPLING_STEPS_COLUMNS, one row per setting (none: diverged)
    status: str
    wall_s: float = 0.0
    workers: int = 0
    chunks: Optional[ChunkStore] = None  # the job's stored chunks, to discard once written


def sampling_steps_run(inputs: StepsInputs, cfg: SamplingStepsConfig, storage: str | Path,
                       on_progress=None) -> StepsResult:
    """Measure every setting of run `inputs.exp` on Ray workers, finished chunks kept in
    `storage`. A diverged run gets an empty table."""
    exp = inputs.exp
    if inputs.apparatus is None:
        return StepsResult(pd.DataFrame(columns=list(SAMPLING_STEPS_COLUMNS)),
                           inputs.info.get("status", Status.UNSTABLE.value))
    job, parts = steps_job(inputs, cfg)
    run = ray_data.run_chunks(job, storage, on_progress=on_progress)
    rows = []
    for setting, steps, chunks in parts:
        estimates = scores_of(chunks, run, inputs.reference, inputs.kernel,
                              exp.evaluate.is_splits, exp.seed, exp.sample.num_samples)
        rows.append({"sampler": setting["sampler"],
                     "steps": steps,
                     "eta": setting["eta"], "num_samples": exp.sample.num_samples,
                     **flatten(estimates)})
    return StepsResult(pd.DataFrame(rows, columns=list(SAMPLING_STEPS_COLUMNS)),
                       Status.OK.value, run.wall_s, run.workers, ChunkStore(storage, job.name))


def log_sampling_steps(tracker, run_id: str, result: StepsResult, path: Path) -> None:
    """The run's scores against sampling steps on its MLflow run: `<sampler>_<score>` at step
    = the number of sampling steps (MLflow's chart of it is the table's plot), and the file."""
    for row in result.scores.to_dict("records"):
        tracker.log_metrics(run_id, {f"{row['sampler']}_{name}": value
                                     for name, value in row.items()
                                     if name not in ("sampler", "steps", "eta", "num_samples")
                                     and not name.endswith("_se")},
                            step=int(row["steps"]))
    tracker.log_artifact(run_id, path, "sampling_steps")


def summary(scores: pd.DataFrame) -> Mapping[str, str]:
    """{"ddim 10": "FID 12.3", ...}: one entry per setting, for the stage's last line."""
    return {f"{row['sampler']} {row['steps']}": f"FID {row['fid']:.4g}"
            for row in scores.to_dict("records")}
