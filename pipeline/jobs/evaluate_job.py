"""What the evaluate and reference stages measure.

One run (experiment E, seed S) is read and checked by `evaluation_inputs` and scored by
`evaluate_run`:
- FID and KID of its N samples against the train split, and their Inception Score, through
  the study's feature extractor (the digits classifier, or inception-v3-compat), each with its
  jackknife standard error over the samples (`pipeline.measure.stats`);
- the NLL bound in bits/dim of the first `evaluate.nll_num_images` test and train images, on
  the data's own levels (its ceiling: log2(levels), a uniform distribution over the levels),
  with the bound of every image kept so that two runs can be compared image by image.

Every network evaluation of it (the features of the samples, the bound in parts of images x
terms, the checkpoints' quick FIDs and bounds) is one `ShardedJob` (`evaluation_job`) that runs
on Ray workers (`pipeline.cluster.ray_data.run_chunks`, evaluate.num_workers of them); what comes
back are sums of features per jackknife group, the features KID needs and the bound of each
image, from which the statistics are computed here. The train split's side of FID and KID is
not extracted again: it is read from the reference statistics file that the `reference_stats`
stage wrote once (`pipeline.jobs.reference_stats_job`), checked against this study first.

The reference rows (`reference_scores`) are measured the way the runs are:
- real data: `evaluate.reference_draws` draws of N real images (N = sample.num_samples), drawn
  at random from all prepared images (train and test) without regard to their labels, as a
  model's samples are, each scored against the other prepared images; mean and sd over draws.
  This is the FID a perfect model would score with N samples (not 0: FID is biased at small N);
- an untrained model (fresh, seeded weights), sampled and scored like a run;
- the ceiling of the bound: log2(levels) bits/dim.

The files they write, each writer beside its reader, are `pipeline.artifacts.records`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from pipeline.artifacts.figures import save_scores_over_training
from pipeline.artifacts.models import is_ok, kept_ema_snapshots, load_weights, read_model_info
from pipeline.artifacts.records import (METRICS, nll_path, over_training_path, save_nll_per_image,
                                        save_over_training, save_run_metrics)
from pipeline.artifacts.samples import load_samples
from pipeline.cluster import ray_data
from pipeline.core.config import WORKER_KEYS
from pipeline.core.io import file_digest, sha256_hex
from pipeline.core.scores import SCORES
from pipeline.core.status import Status
from pipeline.core.tracking import TAG_STATUS
from pipeline.data.datasets import load_prepared, prepared_path
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.jobs.over_training import best_by_fid, checkpoint_rows, final_scores
from pipeline.measure import extractors
from pipeline.measure.chunks import (Chunk, ChunkStore, ShardedJob, Workers, assemble_nll_chunks,
                                     feature_chunks, job_name, merge_feature_parts, nll_chunks,
                                     per_image)
from pipeline.measure.digits_classifier import classifier_path
from pipeline.measure.reference_stats_file import load_reference_stats, provenance
from pipeline.measure.sampling import SAMPLE_SEED_OFFSET, sample_chunks
from pipeline.measure.stats import (JACKKNIFE_GROUPS, KID_MAX_IMAGES, Estimate, FeatureMoments,
                                    KernelReference, fidelity_scores, frechet_distance,
                                    inception_score_of, kid_subset, mean_estimate, precision_recall,
                                    precision_recall_reference)
from pipeline.model.unet import build_model

# The scores of a set of images, also measured on real data (`pipeline.core.scores`)
REAL_DATA_SCORES = tuple(s.name for s in SCORES if s.real_data)
NLL_SPLITS = {"test": "nll_bpd", "train": "nll_bpd_train"}


def nll_ceiling(levels: int) -> float:
    """Bits/dim of the uniform distribution over `levels` levels: log2(levels)."""
    return math.log2(levels)


# --------------------------------------------------------------------------------------------
# The measuring apparatus of a study
# --------------------------------------------------------------------------------------------


NLL_SEED_OFFSET = 2  # a run's bound: stream ("nll", seed + 2)
CHECKPOINT_SAMPLE_OFFSET, CHECKPOINT_NLL_OFFSET = 3, 4  # the checkpoints' quick scores


@dataclass
class Apparatus:
    """What measures every run of a study: the prepared splits and the FID / IS feature
    extractor (its name and weights file, checked)."""

    train: Any  # pipeline.data.datasets.Prepared
    test: Any
    extractor: str
    weights: Optional[str]
    train_path: Path
    test_path: Path
    dataset: str

    @classmethod
    def load(cls, exp, data_dir: Path, classifier_path: Path) -> "Apparatus":
        paths = [prepared_path(data_dir, exp.data.dataset, split) for split in ("train", "test")]
        train, test = (load_prepared(path) for path in paths)
        extractor, weights = extractors.resolve_extractor(exp.data.dataset, exp.evaluate,
                                                       classifier_path, exp.data.download)
        return cls(train=train, test=test, extractor=extractor, weights=weights,
                   train_path=paths[0], test_path=paths[1], dataset=exp.data.dataset)

    def digests(self) -> list[str]:
        """What the scores depend on besides the run: the splits' and the weights' bytes."""
        files = [self.train_path, self.test_path] + ([self.weights] if self.weights else [])
        return [self.extractor, *(file_digest(f) for f in files)]

    def extractor_weights(self) -> Optional[bytes]:
        """The extractor's weights file as bytes, for workers that cannot read this disk."""
        return Path(self.weights).read_bytes() if self.weights else None

    def reference_provenance(self) -> dict[str, Any]:
        """What the train split's reference statistics must have been made from: this study's
        dataset, train split, extractor and its weights (`reference_stats.provenance`)."""
        return provenance(self.dataset, "train", len(self.train.images), self.extractor,
                          self.weights, self.train_path)

    def reference_side(self, path: str | Path) -> tuple[FeatureMoments, KernelReference]:
        """The reference side of FID (the train split's feature sums) and KID, read from the
        reference statistics file `path` and checked against this apparatus."""
        stats = load_reference_stats(path, self.reference_provenance())
        return stats.moments, stats.kernel()


def sample_feature_chunks(images: str, n: int, prefix: str = "features") -> list:
    """Features of a run's n samples, in jackknife groups, with KID's first images."""
    return feature_chunks(images, n, groups=JACKKNIFE_GROUPS, kid=range(min(n, KID_MAX_IMAGES)),
                          prefix=prefix)


def sampled_feature_chunks(model: str, n: int, batch_size: int, steps: int, seed: int,
                           prefix: str, *, groups: int = JACKKNIFE_GROUPS, kid: bool = True,
                           keep_images: bool = False,
                           sampler: Optional[Mapping[str, Any]] = None) -> list:
    """Chunks that sample n images of model `model` (`steps` network evaluations each, the
    per-image seeds of stream `seed`), batch_size at a time, and return their features in
    `groups` jackknife groups, with KID's first images (`kid`), the images (`keep_images`), and
    another sampler than the run's (`sampler`, as `sharding._sample_kind` takes it)."""
    extra = {"keep_images": True} if keep_images else {}
    if sampler:
        extra["sampler"] = dict(sampler)
    return [Chunk(f"{prefix}-{first:06d}", "sample_features", count * (steps + 1),
                  {"model": model, "first": first, "count": count, "seed": seed, "total": n,
                   "groups": groups,
                   "kid": [i for i in range(first, first + count)
                           if kid and i < KID_MAX_IMAGES], **extra})
            for first, count in sample_chunks(n, batch_size)]


def scores_of(chunks, run, reference: FeatureMoments, kernel: KernelReference, is_splits: int,
              seed: int, total: int) -> dict[str, Estimate]:
    """FID, IS and KID with their standard errors, from a run's feature chunks."""
    groups = merge_feature_parts(run.of(chunks), groups=JACKKNIFE_GROUPS, total=total)
    return fidelity_scores(groups, reference, kernel, is_splits=is_splits, seed=seed)


def nll_job_chunks(exp, model: str, seed: int, sizes: Mapping[str, int], prefix: str = "nll",
                   method: Optional[str] = None) -> dict[str, list]:
    """{split: the chunks of the bound of its first evaluate.nll_num_images images (of the
    split's `sizes[split]`)}."""
    cfg = exp.evaluate
    method = method or cfg.nll
    terms = GaussianDiffusion.from_config(exp.diffusion).num_bound_terms(method, cfg.nll_strata)
    return {split: nll_chunks(model, split, min(cfg.nll_num_images, size), terms, method,
                              cfg.nll_strata, cfg.nll_batch_size, seed, prefix=f"{prefix}-{split}")
            for split, size in sizes.items()}


def nll_of(chunks_by_split: Mapping[str, list],
           run) -> tuple[dict[str, Estimate], dict[str, np.ndarray]]:
    """(estimates, {split: bound of each image}) from `nll_job_chunks`' results."""
    estimates, per_image = {}, {}
    for split, chunks in chunks_by_split.items():
        num_images = max(c.args["first"] + c.args["count"] for c in chunks)
        values = assemble_nll_chunks(chunks, run.of(chunks), num_images)
        estimates[NLL_SPLITS[split]] = mean_estimate(values)
        per_image[split] = values
    return estimates, per_image


def flatten(estimates: Mapping[str, Estimate]) -> dict[str, float]:
    """{score: value, score_se: standard error} for a metrics record."""
    out = {}
    for name, estimate in estimates.items():
        out[name], out[f"{name}_se"] = estimate.value, estimate.se
    return out


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def evaluation_job(exp, apparatus: Apparatus, model_dir: Path, samples: np.ndarray,
                   info: Mapping[str, Any], snapshots: Mapping[int, Path]):
    """The evaluate stage's `ShardedJob` and its chunks by purpose: {"samples", "nll" (by
    split), "checkpoints" ({step: (sampling-and-feature chunks, bound chunks)})}. The train
    split's features are not among them: they are the reference statistics' file."""
    cfg = exp.evaluate
    workers = Workers.of(cfg, "evaluate")
    sizes = {"test": len(apparatus.test.images), "train": len(apparatus.train.images)}
    parts: dict[str, Any] = {"samples": sample_feature_chunks("samples", len(samples)),
                             "nll": nll_job_chunks(exp, "ema", exp.seed + NLL_SEED_OFFSET, sizes),
                             "checkpoints": {}}
    models = {"ema": load_weights(exp, model_dir, "ema")}
    n, steps = cfg.checkpoint_num_samples, exp.sample.steps or exp.diffusion.num_timesteps
    for step in snapshots:
        name = f"ema@{step}"
        models[name] = load_weights(exp, model_dir, checkpoint_step=step)
        sampled = sampled_feature_chunks(name, n, exp.sample.batch_size, steps,
                                         exp.seed + CHECKPOINT_SAMPLE_OFFSET,
                                         f"checkpoint{step}-sample", groups=1, kid=False)
        bound = nll_job_chunks(exp, name, exp.seed + CHECKPOINT_NLL_OFFSET, {"test": sizes["test"]},
                               prefix=f"checkpoint{step}-nll", method="stratified")["test"]
        parts["checkpoints"][step] = (sampled, bound)
    chunks = [*parts["samples"], *(c for cs in parts["nll"].values() for c in cs),
              *(c for sampled, bound in parts["checkpoints"].values() for c in (*sampled, *bound))]
    settings = {section: {k: v for k, v in exp.to_dict()[section].items()
                          if k not in WORKER_KEYS} for section in ("evaluate", "sample")}
    name = job_name(exp, "evaluate", workers, *apparatus.digests(),
                    file_digest(Path(model_dir) / "ema.pt"),
                    {s: file_digest(p) for s, p in snapshots.items()},
                    settings, exp.to_dict()["diffusion"], exp.to_dict()["model"],
                    info["data_levels"], _array_digest(samples))
    job = ShardedJob(
        name=name, label=f"evaluate {exp.key}", unit="evaluations", chunks=chunks,
        workers=workers,
        spec={"experiment": exp.to_dict(), "image_shape": info["image_shape"],
              "data_levels": info["data_levels"], "extractor": apparatus.extractor},
        objects={"models": models, "extractor_weights": apparatus.extractor_weights(),
                 "images": {"samples": samples,
                            **{split: getattr(apparatus, split).images[:cfg.nll_num_images]
                               for split in ("train", "test")}}})
    return job, parts


def _array_digest(images: np.ndarray) -> str:
    return sha256_hex(np.ascontiguousarray(images).tobytes())


@dataclass
class RunEvaluation:
    """What `evaluate_run` measured of one run."""

    record: dict[str, Any]  # descriptors, scores with standard errors, counts, timings
    per_image: dict[str, Any]  # {split: bound of each image}; empty lists when not measured
    scores: pd.DataFrame  # scores over training (pipeline.jobs.over_training.COLUMNS)
    chunks: Any = None  # the job's ChunkStore: discard it once the outputs are written


@dataclass
class EvaluationInputs:
    """What `evaluate_run` reads of one run, read and checked before anything is measured (so
    a stage refuses bad input before it marks its MLflow run RUNNING): the model's record, its
    samples, and, where the run is to be scored, the apparatus and the train split's reference
    side (FID's feature sums, KID's features)."""

    exp: Any
    model_dir: Path
    info: dict[str, Any]
    samples: np.ndarray
    sample_status: Status
    apparatus: Optional[Apparatus] = None  # None: the run is not scored (unstable, no samples)
    reference: Optional[FeatureMoments] = None
    kernel: Optional[KernelReference] = None

    @property
    def scored(self) -> bool:
        return self.apparatus is not None


def evaluation_inputs(exp, data_dir: Path, models_dir: Path, samples_dir: Path,
                      reference_stats: str | Path) -> EvaluationInputs:
    """Read run `exp`'s model record (models/<key>/) and samples (samples/<key>/) and, if the
    run is to be scored, the prepared splits, the extractor and the reference statistics file
    `reference_stats`, each checked (a `UserError` naming the file and the fix)."""
    model_dir = Path(models_dir) / exp.key
    info = read_model_info(model_dir, exp)
    samples, sample_status = load_samples(Path(samples_dir) / exp.key, exp)
    inputs = EvaluationInputs(exp, model_dir, info, samples, sample_status)
    if is_ok(info) and sample_status == Status.OK:
        inputs.apparatus = Apparatus.load(exp, data_dir, classifier_path(models_dir))
        inputs.reference, inputs.kernel = inputs.apparatus.reference_side(reference_stats)
    return inputs


def evaluate_run(inputs: EvaluationInputs, storage: str | Path,
                 on_progress=None) -> RunEvaluation:
    """Score the run whose `inputs` were read (`evaluation_inputs`) on Ray workers, finished
    chunks kept in `storage`: FID / IS / KID of its samples, the NLL bound of its EMA model and,
    with evaluate.checkpoints, a quick FID and the stratified NLL of every kept EMA snapshot, all
    against the train split's reference statistics. An unstable run (or one without samples)
    gets no scores. `on_progress(evaluations done, evaluations/s)` is called as each chunk comes
    back."""
    exp, info, samples, model_dir = inputs.exp, inputs.info, inputs.samples, inputs.model_dir
    d = exp.diffusion
    record = {"experiment": exp.name, "seed": exp.seed,
              "status": info.get("status", Status.UNSTABLE.value), "dataset": exp.data.dataset,
              "mean_type": d.mean_type, "var_type": d.var_type, "loss": d.loss,
              "weighting": d.weighting, "schedule": d.schedule,
              "num_timesteps": d.num_timesteps, **{k: None for k in METRICS},
              "nll_method": exp.evaluate.nll,
              "num_samples": int(len(samples)), "data_levels": info["data_levels"],
              "nll_ceiling_bpd": nll_ceiling(info["data_levels"]),
              "train_steps": info.get("step"), "final_loss": info.get("final_loss"),
              "train_wall_s": info.get("train_wall_s"),
              "images_per_s": info.get("images_per_s")}
    per_image = {"test": [], "train": []}
    scores = final_scores(record)  # no scores unless evaluated below
    if not inputs.scored:
        if record["status"] == Status.OK:
            record["status"] = inputs.sample_status
        return RunEvaluation(record=record, per_image=per_image, scores=scores)
    apparatus, reference, kernel = inputs.apparatus, inputs.reference, inputs.kernel
    snapshots = {}
    if exp.evaluate.checkpoints is not None:
        snapshots = kept_ema_snapshots(model_dir)
        if not snapshots:
            print(f"warning: evaluate.checkpoints is set but {model_dir} keeps no EMA "
                  f"snapshots; rerun `dvc repro train@{exp.key}`", file=sys.stderr)
    job, parts = evaluation_job(exp, apparatus, model_dir, samples, info, snapshots)
    run = ray_data.run_chunks(job, storage, on_progress=on_progress)
    estimates = scores_of(parts["samples"], run, reference, kernel, exp.evaluate.is_splits,
                          exp.seed, len(samples))
    nll, per_image = nll_of(parts["nll"], run)
    record.update(flatten({**estimates, **nll}))
    record.update({"evaluate_wall_s": run.wall_s, "evaluate_workers": run.workers,
                   "evaluate_evaluations_per_s": run.units_per_s,
                   "evaluate_chunks": len(job.chunks), "evaluate_chunks_reused": run.reused,
                   "evaluate_chunks_redone": run.redone})
    scores = final_scores(record)
    if exp.evaluate.checkpoints is not None:
        nll_by_step = {step: nll_of({"test": bound}, run)[0]["nll_bpd"]
                       for step, (_, bound) in parts["checkpoints"].items()}
        scores = checkpoint_rows(exp, parts["checkpoints"], run, reference, nll_by_step)
        best = best_by_fid(scores) or {}
        record.update({"checkpoint_num_samples": exp.evaluate.checkpoint_num_samples,
                       "best_checkpoint_step": best.get("step"),
                       "best_checkpoint_fid": best.get("fid"),
                       "best_checkpoint_nll_bpd": best.get("nll_bpd")})
    return RunEvaluation(record=record, per_image=per_image, scores=scores,
                         chunks=ChunkStore(storage, job.name))


def save_evaluation(result: RunEvaluation, exp, metrics_dir: Path,
                    figures_dir: Path) -> dict[str, Path]:
    """Write the run's files: metrics/<key>.json and _run.json, _nll.csv, _over_training.csv
    and the figure of FID and NLL over training; return {"metrics", "run", "nll", "scores",
    "figure"}: their paths."""
    record, scores = result.record, result.scores
    paths = dict(zip(("metrics", "run"), save_run_metrics(metrics_dir, exp.key, record)))
    paths["nll"] = nll_path(metrics_dir, exp.key)
    save_nll_per_image(paths["nll"], result.per_image)
    paths["scores"] = over_training_path(metrics_dir, exp.key)
    paths["figure"] = Path(figures_dir) / f"{exp.key}.png"
    save_over_training(paths["scores"], scores)
    save_scores_over_training(
        scores["step"].tolist(), scores["fid"].tolist(), scores["nll_bpd"].tolist(),
        paths["figure"], f"{exp.key}: FID and NLL over training",
        best_step=record.get("best_checkpoint_step"),
        note=("only the final model: set evaluate.checkpoints for scores over training"
              if exp.evaluate.checkpoints is None else
              f"quick FID of {exp.evaluate.checkpoint_num_samples} samples per step; "
              "stratified NLL"))
    return paths


def log_evaluation(tracker, run_id: str, result: RunEvaluation,
                   paths: Mapping[str, Path]) -> None:
    """The run's scores, its scores over training (by step) and its files on its MLflow run
    (which the stage then marks FINISHED: `Tracker.live_run`)."""
    record, scores = result.record, result.scores
    for row in scores[scores["source"] == "checkpoint"].to_dict("records"):
        tracker.log_metrics(run_id, {"checkpoint_fid": row["fid"],
                                     "checkpoint_nll_bpd": row["nll_bpd"]},
                            step=int(row["step"]))
    if record.get("best_checkpoint_step") is not None:
        tracker.log_metrics(run_id, {"best_checkpoint_step": record["best_checkpoint_step"],
                                     "best_checkpoint_fid": record["best_checkpoint_fid"]})
    tracker.log_artifact(run_id, paths["scores"], "fid_over_training")
    tracker.log_artifact(run_id, paths["figure"], "fid_over_training")
    tracker.log_metrics(run_id, {k: v for k, v in record.items()
                                 if (k in METRICS or k.startswith("evaluate_"))
                                 and v is not None})
    tracker.set_tags(run_id, {TAG_STATUS: record["status"]})
    tracker.log_artifact(run_id, paths["metrics"], "metrics")
    tracker.log_artifact(run_id, paths["run"], "metrics")


# --------------------------------------------------------------------------------------------
# The reference rows
# --------------------------------------------------------------------------------------------


def real_data_draws(features: np.ndarray, logits: np.ndarray, num_images: int, draws: int,
                    is_splits: int, seed: int = 0) -> dict[str, Any]:
    """`draws` draws of `num_images` real images from all prepared images (their `features` and
    `logits`), each scored against the rest of them: {<score>, <score>_sd} for each score of
    REAL_DATA_SCORES, and draws, num_images, reference_images."""
    num_images = min(num_images, len(features) - 2)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(draws):
        order = rng.permutation(len(features))
        chosen, rest = order[:num_images], order[num_images:]
        kernel = KernelReference(features[rest][kid_subset(len(rest))])
        k_xx, sums = kernel.prepare(features[chosen[:KID_MAX_IMAGES]])
        precision, recall = precision_recall(
            features[chosen[:KID_MAX_IMAGES]],
            precision_recall_reference(features[rest], min(len(chosen), KID_MAX_IMAGES)))
        rows.append({"fid": frechet_distance(FeatureMoments.of(features[chosen]),
                                             FeatureMoments.of(features[rest])),
                     "is_mean": inception_score_of(logits[chosen], is_splits),
                     "kid_mean": kernel.distance(k_xx, sums, np.arange(len(k_xx))),
                     "precision": precision, "recall": recall})
    frame = pd.DataFrame(rows)
    out: dict[str, Any] = {"draws": draws, "num_images": int(num_images),
                           "reference_images": int(len(features) - num_images)}
    for key in REAL_DATA_SCORES:
        out[key] = float(frame[key].mean())
        out[f"{key}_sd"] = float(frame[key].std(ddof=1)) if draws > 1 else math.nan
    return out


def untrained_model(exp, image_shape: tuple[int, int, int]):
    """The experiment's U-Net with fresh weights seeded by `exp.seed`. The DDPM U-Net starts
    with a zero output layer: it is perturbed, so that the untrained row shows what random
    weights do, not a network that predicts exactly zero."""
    torch.manual_seed(exp.seed)
    model = build_model(exp, image_shape).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0.0, 0.02)
    return model


def reference_job(exp, apparatus: Apparatus):
    """The reference stage's `ShardedJob` and its chunks by purpose: {"pool" (the features of
    every prepared image, kept per image), "untrained" (its samples, sampled and featurized),
    "nll" (its bound, by split)}."""
    cfg, n = exp.evaluate, exp.sample.num_samples
    workers = Workers.of(cfg, "evaluate")
    shape = tuple(apparatus.train.images.shape[1:])
    pool = np.concatenate([apparatus.train.images, apparatus.test.images])
    steps = exp.sample.steps or exp.diffusion.num_timesteps
    sizes = {"test": len(apparatus.test.images), "train": len(apparatus.train.images)}
    parts = {"pool": feature_chunks("pool", len(pool), groups=1, kid=[], keep=True),
             "untrained": sampled_feature_chunks("untrained", n, exp.sample.batch_size, steps,
                                                 exp.seed + SAMPLE_SEED_OFFSET, "untrained",
                                                 keep_images=True),
             "nll": nll_job_chunks(exp, "untrained", exp.seed + NLL_SEED_OFFSET, sizes)}
    settings = {section: {k: v for k, v in exp.to_dict()[section].items()
                          if k not in WORKER_KEYS} for section in ("evaluate", "sample")}
    name = job_name(exp, "reference", workers, *apparatus.digests(), settings,
                    exp.to_dict()["diffusion"], exp.to_dict()["model"])
    chunks = [*parts["pool"], *parts["untrained"], *(c for cs in parts["nll"].values()
                                                     for c in cs)]
    job = ShardedJob(
        name=name, label="reference", unit="evaluations", chunks=chunks, workers=workers,
        spec={"experiment": exp.to_dict(), "image_shape": list(shape),
              "data_levels": apparatus.train.levels, "extractor": apparatus.extractor},
        objects={"models": {"untrained": untrained_model(exp, shape).state_dict()},
                 "extractor_weights": apparatus.extractor_weights(),
                 "images": {"pool": pool, "train": apparatus.train.images,
                            "test": apparatus.test.images[:cfg.nll_num_images]}})
    return job, parts


def reference_scores(exp, apparatus: Apparatus, storage: str | Path
                     ) -> tuple[dict[str, dict[str, Any]], np.ndarray, Any]:
    """Table 1's reference rows measured like the runs, for the base experiment `exp`, on Ray
    workers (finished chunks kept in `storage`): ({"real_data", "untrained", "ceiling"} as
    `save_reference` writes them, the untrained model's samples, the job's ChunkStore to discard
    once the outputs are written)."""
    levels = apparatus.train.levels
    cfg = exp.evaluate
    job, parts = reference_job(exp, apparatus)
    run = ray_data.run_chunks(job, storage)
    pool = run.of(parts["pool"])
    features, logits = per_image(pool, "features"), per_image(pool, "logits")
    real = real_data_draws(features, logits, exp.sample.num_samples, cfg.reference_draws,
                           cfg.is_splits, seed=exp.data.seed)
    n_train = len(apparatus.train.images)
    train = features[:n_train]
    reference = FeatureMoments.of(train)
    kernel = KernelReference(train[kid_subset(n_train)])
    estimates = scores_of(parts["untrained"], run, reference, kernel, cfg.is_splits, exp.seed,
                          exp.sample.num_samples)
    nll, _ = nll_of(parts["nll"], run)
    images = per_image(run.of(parts["untrained"]), "images")
    return ({"real_data": real, "untrained": flatten({**estimates, **nll}),
             "ceiling": {"levels": levels, "nll_bpd": nll_ceiling(levels)}}, images,
            ChunkStore(storage, job.name))
