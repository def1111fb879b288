"""What the evaluate and reference stages measure.

One run (experiment E, seed S) is scored by `evaluate_run`:
- FID and KID of its N samples against the train split, and their Inception Score, through
  the study's feature extractor (the digits classifier, or inception-v3-compat), each with its
  jackknife standard error over the samples (`pipeline.stats`);
- the NLL bound in bits/dim of the first `evaluate.nll_num_images` test and train images, on
  the data's own levels (its ceiling: log2(levels), a uniform distribution over the levels),
  with the bound of every image kept so that two runs can be compared image by image.

The reference rows (`reference_scores`) are measured the way the runs are:
- real data: `evaluate.reference_draws` draws of N real images (N = sample.num_samples), drawn
  at random from all prepared images (train and test) without regard to their labels, as a
  model's samples are, each scored against the other prepared images; mean and sd over draws.
  This is the FID a perfect model would score with N samples (not 0: FID is biased at small N);
- an untrained model (fresh, seeded weights), sampled and scored like a run;
- the ceiling of the bound: log2(levels) bits/dim.

The files they write, each writer beside its reader, are `pipeline.records`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from pipeline.records import METRICS, nll_path, save_nll_per_image, save_run_metrics
from pipeline.stats import Estimate, FrechetReference, KernelReference, fidelity_scores
from pipeline.status import Status

FIDELITY_KEYS = {"fid": "fid", "is": "is_mean", "kid": "kid_mean"}  # stats -> record names
NLL_SPLITS = {"test": "nll_bpd", "train": "nll_bpd_train"}


def nll_ceiling(levels: int) -> float:
    """Bits/dim of the uniform distribution over `levels` levels: log2(levels)."""
    return math.log2(levels)


# --------------------------------------------------------------------------------------------
# The measuring apparatus of a study
# --------------------------------------------------------------------------------------------


@dataclass
class Apparatus:
    """What measures every run of a study: the prepared splits, the FID / IS feature extractor
    and the train split's features (the reference side of FID and KID)."""

    train: Any  # pipeline.data.Prepared
    test: Any
    extractor: str
    weights: Optional[str]
    device: str
    download: bool
    reference_features: np.ndarray
    frechet: FrechetReference
    kernel: KernelReference

    @classmethod
    def load(cls, exp, data_dir: Path, classifier_path: Path, device: str = "cpu") -> "Apparatus":
        from pipeline import metrics
        from pipeline.data import load_prepared, prepared_path

        train = load_prepared(prepared_path(data_dir, exp.data.dataset, "train"))
        test = load_prepared(prepared_path(data_dir, exp.data.dataset, "test"))
        extractor, weights = metrics.resolve_extractor(exp.data.dataset, exp.evaluate,
                                                       classifier_path, exp.data.download)
        features, _ = metrics.extract_features(train.images, extractor=extractor,
                                               weights_path=weights, device=device,
                                               download=exp.data.download)
        return cls(train=train, test=test, extractor=extractor, weights=weights, device=device,
                   download=exp.data.download, reference_features=features,
                   frechet=FrechetReference(features), kernel=KernelReference(features))

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from pipeline import metrics

        return metrics.extract_features(images, extractor=self.extractor,
                                        weights_path=self.weights, device=self.device,
                                        download=self.download)

    def fidelity(self, images: np.ndarray, is_splits: int, seed: int = 0) -> dict[str, Estimate]:
        """FID, IS and KID of `images` against the train split, with standard errors."""
        features, logits = self.features(images)
        scores = fidelity_scores(features, logits, self.frechet, self.kernel,
                                 is_splits=is_splits, seed=seed)
        return {FIDELITY_KEYS[name]: value for name, value in scores.items()}

    def nll(self, model, diffusion, cfg, seed: int,
            progress: bool = False) -> tuple[dict[str, Estimate], dict[str, np.ndarray]]:
        """The bound of the first `cfg.nll_num_images` test and train images: estimates, and
        the bound of each image."""
        from pipeline import metrics

        estimates, per_image = {}, {}
        for split, key in NLL_SPLITS.items():
            images = (self.test if split == "test" else self.train).images
            nll = metrics.nll_bpd(model, diffusion, images[:cfg.nll_num_images],
                                  method=cfg.nll, num_strata=cfg.nll_strata,
                                  batch_size=cfg.nll_batch_size, seed=seed, device=self.device,
                                  progress=progress)
            estimates[key] = Estimate(nll["nll_bpd"], nll["nll_bpd_se"])
            per_image[split] = nll["per_image"]
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


@dataclass
class RunEvaluation:
    """What `evaluate_run` measured of one run."""

    record: dict[str, Any]  # descriptors, scores with standard errors, counts, timings
    per_image: dict[str, Any]  # {split: bound of each image}; empty lists when not measured
    scores: pd.DataFrame  # scores over training (pipeline.over_training.COLUMNS)


def evaluate_run(exp, data_dir: Path, models_dir: Path, samples_dir: Path,
                 device: str = "cpu") -> RunEvaluation:
    """Score run `exp` (models/<key>/, samples/<key>/): FID / IS / KID of its samples, the NLL
    bound of its EMA model and, with evaluate.checkpoints, a quick FID and the stratified NLL
    of every kept EMA snapshot. An unstable run (or one without samples) gets no scores."""
    import sys
    import time

    from pipeline.diffusion import GaussianDiffusion
    from pipeline.over_training import best_by_fid, final_scores, score_checkpoints
    from pipeline.models import is_ok, kept_ema_snapshots, load_model, read_model_info
    from pipeline.sampling import load_samples

    model_dir = Path(models_dir) / exp.key
    info = read_model_info(model_dir, exp)
    samples, sample_status = load_samples(Path(samples_dir) / exp.key, exp)
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
    if is_ok(info) and sample_status == Status.OK:
        start = time.monotonic()
        apparatus = Apparatus.load(exp, data_dir, Path(models_dir) / "classifier" /
                                   "classifier.pt", device)
        estimates = apparatus.fidelity(samples, exp.evaluate.is_splits, seed=exp.seed)
        model = load_model(exp, model_dir, "ema", device)
        diffusion = GaussianDiffusion.from_config(exp.diffusion,
                                                  data_levels=apparatus.train.levels)
        nll, per_image = apparatus.nll(model, diffusion, exp.evaluate, seed=exp.seed + 2,
                                       progress=True)
        record.update(flatten({**estimates, **nll}))
        record["evaluate_wall_s"] = time.monotonic() - start
        scores = final_scores(record)
        if exp.evaluate.checkpoints is not None:
            kept = list(kept_ema_snapshots(model_dir))
            if not kept:
                print(f"warning: evaluate.checkpoints is set but {model_dir} keeps no EMA "
                      f"snapshots; rerun `dvc repro train@{exp.key}`", file=sys.stderr)
            start = time.monotonic()
            scores = score_checkpoints(
                exp, model_dir, kept, apparatus.train.images, apparatus.test.images,
                extractor=apparatus.extractor, weights=apparatus.weights,
                image_shape=tuple(info["image_shape"]), device=device, seed=exp.seed + 3,
                data_levels=apparatus.train.levels)
            best = best_by_fid(scores) or {}
            record.update({"checkpoint_num_samples": exp.evaluate.checkpoint_num_samples,
                           "best_checkpoint_step": best.get("step"),
                           "best_checkpoint_fid": best.get("fid"),
                           "best_checkpoint_nll_bpd": best.get("nll_bpd"),
                           "checkpoints_wall_s": time.monotonic() - start})
    elif record["status"] == Status.OK:
        record["status"] = sample_status
    return RunEvaluation(record=record, per_image=per_image, scores=scores)


def save_evaluation(result: RunEvaluation, exp, metrics_dir: Path,
                    figures_dir: Path) -> dict[str, Path]:
    """Write the run's files: metrics/<key>.json and _run.json, _nll.csv, _checkpoints.csv and
    the figure of FID and NLL over training; return {"metrics", "run", "nll", "scores",
    "figure"}: their paths."""
    from pipeline.figures import save_scores_over_training
    from pipeline.over_training import write_scores

    record, scores = result.record, result.scores
    paths = dict(zip(("metrics", "run"), save_run_metrics(metrics_dir, exp.key, record)))
    paths["nll"] = nll_path(metrics_dir, exp.key)
    save_nll_per_image(paths["nll"], result.per_image)
    paths["scores"] = Path(metrics_dir) / f"{exp.key}_checkpoints.csv"
    paths["figure"] = Path(figures_dir) / f"{exp.key}.png"
    write_scores(scores, paths["scores"])
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
    """The run's scores, its scores over training (by step) and its files on its MLflow run,
    which evaluate, the run's last stage, marks FINISHED."""
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
                                 if k.startswith(("fid", "is_", "kid_", "nll_bpd"))
                                 and v is not None})
    tracker.set_tags(run_id, {"ddpm.status": record["status"]})
    tracker.log_artifact(run_id, paths["metrics"], "metrics")
    tracker.log_artifact(run_id, paths["run"], "metrics")
    tracker.set_terminated(run_id, "FINISHED")


# --------------------------------------------------------------------------------------------
# The reference rows
# --------------------------------------------------------------------------------------------


def real_data_draws(apparatus: Apparatus, num_images: int, draws: int, is_splits: int,
                    seed: int = 0) -> dict[str, Any]:
    """`draws` draws of `num_images` real images from all prepared images, each scored against
    the rest of them: {fid, fid_sd, is_mean, is_mean_sd, kid_mean, kid_mean_sd, draws,
    num_images, reference_images}."""
    from pipeline.stats import inception_score

    pool = np.concatenate([apparatus.train.images, apparatus.test.images])
    features, logits = apparatus.features(pool)
    num_images = min(num_images, len(pool) - 2)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(draws):
        order = rng.permutation(len(pool))
        chosen, rest = order[:num_images], order[num_images:]
        kernel = KernelReference(features[rest])
        k_xx, sums = kernel.prepare(features[chosen])
        rows.append({"fid": FrechetReference(features[rest]).distance(features[chosen]),
                     "is_mean": inception_score(logits[chosen], is_splits),
                     "kid_mean": kernel.distance(k_xx, sums, np.arange(num_images))})
    frame = pd.DataFrame(rows)
    out: dict[str, Any] = {"draws": draws, "num_images": int(num_images),
                           "reference_images": int(len(pool) - num_images)}
    for key in FIDELITY_KEYS.values():
        out[key] = float(frame[key].mean())
        out[f"{key}_sd"] = float(frame[key].std(ddof=1)) if draws > 1 else math.nan
    return out


def untrained_model(exp, image_shape: tuple[int, int, int]):
    """The experiment's U-Net with fresh weights seeded by `exp.seed`. The DDPM U-Net starts
    with a zero output layer: it is perturbed, so that the untrained row shows what random
    weights do, not a network that predicts exactly zero."""
    import torch

    from pipeline.training import build_model

    torch.manual_seed(exp.seed)
    model = build_model(exp, image_shape).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0.0, 0.02)
    return model


def reference_scores(exp, apparatus: Apparatus) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Table 1's reference rows measured like the runs, for the base experiment `exp`:
    ({"real_data", "untrained", "ceiling"} as `save_reference` writes them, the untrained
    model's samples)."""
    from pipeline.diffusion import GaussianDiffusion
    from pipeline.sampling import generate

    levels = apparatus.train.levels
    cfg = exp.evaluate
    real = real_data_draws(apparatus, exp.sample.num_samples, cfg.reference_draws,
                           cfg.is_splits, seed=exp.data.seed)
    shape = tuple(apparatus.train.images.shape[1:])
    model = untrained_model(exp, shape)
    diffusion = GaussianDiffusion.from_config(exp.diffusion, data_levels=levels)
    run = generate(model, diffusion, exp, shape, seed=exp.seed + 1)
    estimates = apparatus.fidelity(run.images, cfg.is_splits, seed=exp.seed)
    nll, _ = apparatus.nll(model, diffusion, cfg, seed=exp.seed + 2)
    return ({"real_data": real, "untrained": flatten({**estimates, **nll}),
             "ceiling": {"levels": levels, "nll_bpd": nll_ceiling(levels)}}, run.images)
