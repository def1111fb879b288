"""Scores over training: a quick FID and the stratified NLL at several training checkpoints.

Ho et al. (2020) report each model at the checkpoint with the best FID over training. With
`evaluate.checkpoints` set, the train stage keeps the EMA weights of those steps
(`models/<E>-<S>/ema_snapshots/ema_<step>.pt`); the evaluate stage's workers score each of them
(`checkpoint_rows` makes the table, which
`pipeline.artifacts.records.save_over_training` writes) with

- FID (and IS) of `evaluate.checkpoint_num_samples` samples against the train split, drawn with
  the experiment's sampler from the same seed at every step (common random numbers, so the
  differences between steps are the model's and not the draw's). Fewer samples than the final
  evaluation: FID is biased upwards with few samples, so compare these numbers with each other,
  not with the final FID;
- the NLL bound in bits/dim of the first `evaluate.nll_num_images` test images by the unbiased
  stratified estimator (`evaluate.nll_strata` timesteps per image), with its standard error.

Without checkpoints (the default) the table holds one row, the final model's full evaluation.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from pipeline.core.config import ExperimentConfig
from pipeline.measure.chunks import merge_feature_parts
from pipeline.measure.stats import Estimate, frechet_distance, inception_score, total

COLUMNS = ("step", "fid", "is_mean", "nll_bpd", "nll_bpd_se", "num_samples", "nll_method",
           "source")


def checkpoint_rows(exp: ExperimentConfig, checkpoints: dict[int, tuple[list, list]], run,
                    reference, nll_by_step: Mapping[int, Estimate]) -> pd.DataFrame:
    """One row per kept step (`COLUMNS`), from the evaluate job's chunks of each step
    (`pipeline.jobs.evaluate_job.evaluation_job`: its samples' features, its stratified bound,
    whose estimate per step is `nll_by_step`) and the train split's feature sums `reference`
    (read from the reference statistics file, `pipeline.measure.reference_stats_file`)."""
    cfg = exp.evaluate
    rows = []
    for step, (sampled, _) in sorted(checkpoints.items()):
        groups = merge_feature_parts(run.of(sampled), groups=1, total=cfg.checkpoint_num_samples)
        nll = nll_by_step[step]
        fid = frechet_distance(total(groups.features), reference)
        rows.append({"step": step, "fid": fid,
                     "is_mean": inception_score(groups.logits, cfg.is_splits),
                     "nll_bpd": nll.value, "nll_bpd_se": nll.se,
                     "num_samples": groups.count, "nll_method": "stratified",
                     "source": "checkpoint"})
        print(f"checkpoint {exp.name}@{step}: FID {fid:.4g} ({groups.count} samples), NLL "
              f"{nll.value:.4g} bits/dim", flush=True)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def final_scores(record: dict[str, Any]) -> pd.DataFrame:
    """The one-row table of a study without checkpoints: the final model's full evaluation."""
    if record.get("fid") is None:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.DataFrame([{
        "step": record.get("train_steps"), "fid": record["fid"], "is_mean": record["is_mean"],
        "nll_bpd": record["nll_bpd"], "nll_bpd_se": record["nll_bpd_se"],
        "num_samples": record["num_samples"], "nll_method": record["nll_method"],
        "source": "final"}], columns=list(COLUMNS))


def best_by_fid(scores: pd.DataFrame) -> Optional[dict[str, Any]]:
    """The row with the lowest finite FID (the earliest step on ties), or None."""
    finite = scores[np.isfinite(scores["fid"].astype(float))]
    if finite.empty:
        return None
    row = finite.sort_values(["fid", "step"], kind="stable").iloc[0]
    return {"step": int(row["step"]), "fid": float(row["fid"]),
            "nll_bpd": float(row["nll_bpd"])}
