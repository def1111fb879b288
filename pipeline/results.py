"""The study's results as the `tabulate` stage reads them, and what it makes of them.

Loading (the files the train, evaluate and sweep stages write; their formats live with their
writers in `pipeline.records`, `pipeline.loss_curve` and `pipeline.sweep`):
- runs: metrics/<experiment>-<seed>.json and _run.json, one row per run (`load_runs`), checked
  against the study's dataset (`check_dataset`); then one row per experiment, the mean over
  its seeds (`aggregate`); `estimate` reads one score of such a row as a `pipeline.stats`
  Estimate;
- the sweep's trials csv (`load_sweep_trials`), a Ray Tune results table.

Tabulating (`run_tabulate`, the `tabulate` stage's one call): the paper's Tables 1 and 2
(`pipeline.tables`), the sweep report (`pipeline.sweep_report`), the findings
(`pipeline.findings`) and the figures (every run's loss curve, `loss_figure`; the sweep's heat
map), written to results/.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import pandas as pd

from pipeline.config import LOSSES, MEAN_TYPES, SCHEDULES, VAR_TYPES, WEIGHTINGS, run_key
from pipeline.records import (DESCRIPTORS, METRICS, SCORES, ResultsError, load_run_metrics,
                              metrics_path, run_info_path)
from pipeline.stats import Estimate, combine_seeds
from pipeline.status import Status

if TYPE_CHECKING:
    from pipeline.config import Params


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


def estimate(row: Mapping[str, Any], score: str) -> Estimate:
    """The `Estimate` of `score` in a row of `aggregate` (or of `load_runs`)."""
    return Estimate(float(row[score]), float(row[f"{score}_se"]),
                    float(row.get(f"{score}_df", math.inf)))


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment (in order of first appearance): its descriptors, `seeds` (how
    many runs), `key` (the run's key where there is one seed), status
 (unstable if any seed diverged), and per score of SCORES the mean over
    seeds with `_se`, `_df` (degrees of freedom: inf for one seed), `_sd` (between seeds, NaN
    for one), `_low` and `_high` (the 95 % interval, `pipeline.stats.combine_seeds`)."""
    records = []
    for experiment, group in runs.groupby("experiment", sort=False):
        rows = group.to_dict("records")
        record = {key: rows[0][key] for key in DESCRIPTORS if key != "seed"}
        record["seeds"] = len(rows)
        record["key"] = run_key(experiment, rows[0]["seed"]) if len(rows) == 1 else None
        unstable = any(r["status"] == Status.UNSTABLE for r in rows)
        record["status"] = (Status.UNSTABLE if unstable else Status.OK).value
        for score in SCORES:
            combined = combine_seeds([estimate(r, score) for r in rows])
            low, high = combined.interval() if not unstable else (math.nan, math.nan)
            values = [r[score] for r in rows]
            record.update({score: math.nan if unstable else combined.value,
                           f"{score}_se": combined.se, f"{score}_df": combined.df,
                           f"{score}_sd": float(np.std(values, ddof=1)) if len(rows) > 1
                           else math.nan,
                           f"{score}_low": low, f"{score}_high": high})
        records.append(record)
    return pd.DataFrame.from_records(records)


def load_sweep_trials(path: str | Path) -> pd.DataFrame:
    """Read the sweep's trials csv (a Ray Tune results table) with plain column names.

    `config/schedule` and `config/weighting` (Ray Tune's spelling) become `schedule` and
    `weighting`; the table needs schedule, weighting, fid and nll_bpd (status optional).
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: sweep trials not found; make them with `dvc repro sweep`")
    try:
        trials = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: not a readable csv ({str(exc).strip()}); "
                          "rerun `dvc repro sweep`") from None
    renames = {}
    for key in ("schedule", "weighting"):
        if key not in trials.columns:
            nested = [c for c in trials.columns if str(c).split("/")[-1] == key]
            if nested:
                renames[nested[0]] = key
    trials = trials.rename(columns=renames)
    missing = [c for c in ("schedule", "weighting", "fid", "nll_bpd") if c not in trials.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}; "
                          f"found: {', '.join(map(str, trials.columns))}")
    return trials


def check_dataset(runs: pd.DataFrame, dataset: str) -> None:
    """Every metrics file must come from the dataset the tables are for (no stale results)."""
    for row in runs.to_dict("records"):
        found = row.get("dataset")
        if isinstance(found, str) and found and found != dataset:
            key = run_key(row["experiment"], row["seed"])
            raise ResultsError(f"{key}.json: the metrics of run '{key}' are for dataset "
                              f"'{found}', but params.yaml names '{dataset}'; rerun "
                              f"`dvc repro evaluate@{key}`")


# --------------------------------------------------------------------------------------------
# Tabulating: the tables, the sweep report, the findings and the figures
# --------------------------------------------------------------------------------------------


def run_tabulate(params: Params, metrics_dir: str | Path, results_dir: str | Path,
                 sweep_csv: str | Path | None = None,
                 plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Build and write the tables, the findings and the figures for the runs of `params`;
    return what was made.

    Writes <results_dir>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}; with a
    sweep csv that exists, sweep.{md,csv} and sweep_heatmap.png; with `plots_dir` (the loss
    curves <experiment>-<seed>.csv), loss_curves.png.

    Keys: dataset; runs (one row per run, as loaded); metrics (one row per experiment: the mean
    over its seeds); reference (dict or None); table1, table2, sweep (formatted frames; sweep
    None without a trials csv); *_tex (the LaTeX-formatted frames); table1_raw, table2_raw,
    sweep_raw (numbers); findings (one row per claim of the paper); paths (the files written).
    """
    from pipeline import findings as paper_findings
    from pipeline.records import load_nll_per_image, load_reference, nll_path
    from pipeline.figures import save_sweep_heatmap
    from pipeline.io import write_text
    from pipeline.sweep_report import build_sweep, write_sweep
    from pipeline.tables import build_tables, write_csv, write_tables

    results_dir = Path(results_dir)
    dataset = params.data.dataset
    runs = load_runs(metrics_dir, [(r.name, r.seed) for r in params.runs()])
    check_dataset(runs, dataset)
    metrics = aggregate(runs)
    reference = load_reference(metrics_dir)
    trials = None
    if sweep_csv is not None and Path(sweep_csv).is_file():
        trials = load_sweep_trials(sweep_csv)
    tables = build_tables(metrics, dataset, reference=reference)
    sweep = build_sweep(trials)
    paths = write_tables(results_dir, tables) + write_sweep(results_dir, sweep)
    per_image = {key: load_nll_per_image(nll_path(metrics_dir, key), key)
                 for key in metrics["key"].dropna()}
    found = paper_findings.findings(metrics, per_image)
    write_text(results_dir / "findings.md", paper_findings.to_markdown(found))
    paths += [results_dir / "findings.md", write_csv(results_dir / "findings.csv", found)]
    if plots_dir is not None:
        paths.append(loss_figure(plots_dir, [r.key for r in params.runs()],
                                 results_dir / "loss_curves.png"))
    if sweep["sweep_raw"] is not None:
        save_sweep_heatmap(sweep["sweep_raw"], results_dir / "sweep_heatmap.png")
        paths.append(results_dir / "sweep_heatmap.png")
    return {**tables, **sweep, "runs": runs, "metrics": metrics, "reference": reference,
            "findings": found, "paths": paths}


def loss_figure(plots_dir: str | Path, keys: Iterable[str], out: Path) -> Path:
    """Every run's training loss curve in one figure (results/loss_curves.png); a run without a
    loss curve file, or without a finite loss, is left out."""
    from pipeline.figures import save_loss_curves
    from pipeline.loss_curve import load_loss_curve

    curves = {}
    for key in keys:
        path = Path(plots_dir) / f"{key}.csv"
        if path.is_file():
            try:
                steps, losses = load_loss_curve(path)
            except ValueError as exc:  # a bad header (named by the reader), or a bad line
                problem = str(exc) if str(exc).startswith(str(path)) else \
                    f"{path}: not a loss curve ({exc})"
                raise ResultsError(f"{problem}; remake it with `dvc repro train@{key}`") from None
            if steps:
                curves[key] = (steps, losses)
    save_loss_curves(curves, out, "training loss by experiment")
    return out


def report(made: Mapping[str, Any]) -> str:
    """What the stage prints: Table 1, Table 2, the findings (and the sweep) as markdown, each
    under its title."""
    from pipeline.findings import to_markdown as findings_markdown
    from pipeline.tables import to_markdown

    shown = {"Table 1": to_markdown(made["table1"]), "Table 2": to_markdown(made["table2"]),
             "Findings": findings_markdown(made["findings"])}
    if made["sweep"] is not None:
        shown["Sweep"] = to_markdown(made["sweep"])
    return "".join(f"{title}\n\n{text}\n" for title, text in shown.items())
