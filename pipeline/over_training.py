"""Scores over training: a quick FID and the stratified NLL at several training checkpoints.

Ho et al. (2020) report each model at the checkpoint with the best FID over training. With
`evaluate.checkpoints` set, the train stage keeps the EMA weights of those steps
(`models/<E>/checkpoints/ema_<step>.pt`); `score_checkpoints` scores each of them with

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

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline.config import ExperimentConfig

COLUMNS = ("step", "fid", "is_mean", "nll_bpd", "nll_bpd_se", "num_samples", "nll_method",
           "source")


def score_checkpoints(exp: ExperimentConfig, model_dir: Path, steps: list[int],
                      train_images: np.ndarray, test_images: np.ndarray, *, extractor: str,
                      weights: Optional[str], image_shape: tuple[int, int, int],
                      device: str = "cpu", seed: int = 0, progress: bool = True,
                      data_levels: int = 256) -> pd.DataFrame:
    """One row per step of `steps` (EMA snapshots in `model_dir/checkpoints/`), `COLUMNS`."""
    from pipeline import metrics
    from pipeline.diffusion import GaussianDiffusion
    from pipeline.models import load_model
    from pipeline.sampling import generate

    cfg = exp.evaluate
    diffusion = GaussianDiffusion.from_config(exp.diffusion, data_levels=data_levels)
    rows = []
    for step in steps:
        model = load_model(exp, model_dir, device=device, checkpoint_step=step)
        run = generate(model, diffusion, exp, image_shape, seed=seed, device=device,
                       num_samples=cfg.checkpoint_num_samples, progress=progress,
                       num_progressive=0, progressive_steps=1)
        scores = metrics.compute_fidelity(
            run.images, train_images, extractor=extractor, weights_path=weights,
            is_splits=cfg.is_splits, kid_subset_size=cfg.kid_subset_size, device=device,
            download=exp.data.download)
        nll = metrics.nll_bpd(model, diffusion, test_images[:cfg.nll_num_images],
                              method="stratified", num_strata=cfg.nll_strata,
                              batch_size=cfg.nll_batch_size, seed=seed + 1, device=device)
        rows.append({"step": step, "fid": scores["fid"], "is_mean": scores["is_mean"],
                     "nll_bpd": nll["nll_bpd"], "nll_bpd_se": nll["nll_bpd_se"],
                     "num_samples": len(run.images), "nll_method": "stratified",
                     "source": "checkpoint"})
        print(f"checkpoint {exp.name}@{step}: FID {scores['fid']:.4g} "
              f"({len(run.images)} samples), NLL {nll['nll_bpd']:.4g} bits/dim", flush=True)
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


def write_scores(scores: pd.DataFrame, path: Path) -> None:
    """The table as csv (DVC plots it: x step, y fid), written atomically."""
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        scores.to_csv(tmp, index=False)
