"""The runs' results as the `tabulate` stage reads them (`pipeline.reporting.tabulate_job`).

The files of the train and evaluate stages; their formats live with their writers in
`pipeline.artifacts.records` and `pipeline.artifacts.loss_curve` (the sweep's trials.csv:
`pipeline.artifacts.trials`), read here:
- runs: metrics/<experiment>-<seed>.json and _run.json, one row per run (`load_runs`), checked
  against the study's dataset (`check_dataset`); then one row per experiment, the mean over
  its seeds (`aggregate`); `estimate` reads one score of such a row as a `pipeline.measure.stats`
  Estimate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from pipeline.artifacts.records import (DESCRIPTORS, METRICS, SCORES, ResultsError,
                                        load_run_metrics, metrics_path, run_info_path)
from pipeline.core.config import LOSSES, MEAN_TYPES, SCHEDULES, VAR_TYPES, WEIGHTINGS, run_key
from pipeline.core.scores import ROW_SCORES
from pipeline.core.status import Status
from pipeline.measure.stats import Estimate, combine_seeds, estimate

# The derived scores of a row (`pipeline.core.scores`): the test - train gap of the bound, log FID
GAP, LOG_FID = "nll_gap", "log_fid"


def run_estimates(run: Mapping[str, Any]) -> dict[str, Estimate]:
    """Every ROW_SCORES `Estimate` of one run (a row of `load_runs`): the test and train bounds
    are of different images, so the gap's standard error is that of independent estimates;
    log FID's is FID's relative standard error (the delta method)."""
    out = {score: estimate(run, score) for score in SCORES}
    out[GAP] = out["nll_bpd"] - out["nll_bpd_train"]
    fid = out["fid"]
    out[LOG_FID] = fid.log() if math.isfinite(fid.value) else Estimate(math.nan, math.nan)
    return out

# --------------------------------------------------------------------------------------------
# Loading: one row per run, then one row per experiment (the mean over its seeds)
# --------------------------------------------------------------------------------------------


def load_runs(metrics_dir: str | Path, runs: Iterable[tuple[str, int]]) -> pd.DataFrame:
    """Read the metrics of each (experiment, seed) (`load_run_metrics`) into one row each.

    Columns: DESCRIPTORS, the float METRICS (NaN where not measured or the run is unstable), then
    whatever else the files hold. Raises ResultsError naming the first missing or corrupt
    file and the command that makes it.
    """
    runs = list(runs)
    if not runs:
        raise ResultsError(f"{metrics_dir}: no experiments to tabulate; define them under "
                          "'experiments' in params.yaml and run `dvc repro`")
    keys = [run_key(e, s) for e, s in runs]
    missing = [k for k in keys if not (metrics_path(metrics_dir, k).is_file()
                                       and run_info_path(metrics_dir, k).is_file())]
    if missing:
        more = (f" ({len(missing) - 1} more missing: {', '.join(missing[1:])})"
                if len(missing) > 1 else "")
        try:
            load_run_metrics(metrics_dir, missing[0], {})
        except ResultsError as exc:
            raise ResultsError(f"{exc}{more}") from None
    allowed = {"mean_type": MEAN_TYPES, "var_type": VAR_TYPES, "loss": LOSSES,
               "weighting": WEIGHTINGS, "schedule": SCHEDULES}
    records = []
    for (experiment, seed), key in zip(runs, keys):
        record = load_run_metrics(metrics_dir, key, allowed)
        record.update(experiment=experiment, seed=seed)
        records.append(record)
    df = pd.DataFrame.from_records(records)
    for key in METRICS:
        df[key] = df[key].astype("float64")
    rest = [c for c in df.columns if c not in DESCRIPTORS and c not in METRICS]
    return df[[*DESCRIPTORS, *METRICS, *rest]].reset_index(drop=True)



def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment (in order of first appearance): its descriptors, `seeds` (how
    many runs), `key` (the run's key where there is one seed), status (unstable if any seed
    diverged), and per score of SCORES the mean over
    seeds with `_se`, `_df` (degrees of freedom: inf for one seed), `_sd` (between seeds, NaN
    for one), `_low` and `_high` (the 95 % interval, `pipeline.measure.stats.combine_seeds`);
    the same for the gap GAP of each seed's test and train bounds."""
    records = []
    for experiment, group in runs.groupby("experiment", sort=False):
        rows = group.to_dict("records")
        record = {key: rows[0][key] for key in DESCRIPTORS if key != "seed"}
        record["seeds"] = len(rows)
        record["key"] = run_key(experiment, rows[0]["seed"]) if len(rows) == 1 else None
        unstable = any(r["status"] == Status.UNSTABLE for r in rows)
        record["status"] = (Status.UNSTABLE if unstable else Status.OK).value
        per_run = [run_estimates(r) for r in rows]
        for score in ROW_SCORES:
            combined = combine_seeds([e[score] for e in per_run])
            low, high = combined.interval() if not unstable else (math.nan, math.nan)
            values = [e[score].value for e in per_run]
            record.update({score: math.nan if unstable else combined.value,
                           f"{score}_se": combined.se, f"{score}_df": combined.df,
                           f"{score}_sd": float(np.std(values, ddof=1)) if len(rows) > 1
                           else math.nan,
                           f"{score}_low": low, f"{score}_high": high})
        records.append(record)
    return pd.DataFrame.from_records(records)


def check_dataset(runs: pd.DataFrame, dataset: str) -> None:
    """Every metrics file must come from the dataset the tables are for (no stale results)."""
    for row in runs.to_dict("records"):
        found = row.get("dataset")
        if isinstance(found, str) and found and found != dataset:
            key = run_key(row["experiment"], row["seed"])
            raise ResultsError(f"{key}.json: the metrics of run '{key}' are for dataset "
                              f"'{found}', but params.yaml names '{dataset}'; rerun "
                              f"`dvc repro evaluate@{key}`")
