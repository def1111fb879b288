"""The `tabulate` stage's work (`run_tabulate`): the paper's Tables 1 and 2, the sweep report,
the findings and the figures, written to results/; the study's headline numbers
(`headline`: results/metrics.json, what `dvc exp show` shows first and `dvc metrics diff`
compares); the data of `dvc plots show`'s charts (`plot_data`: every run's loss curve, and
the FID of each run scored at several training steps, in one file each); and what goes on each
run's MLflow page (`run_tags`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import numpy as np
import yaml

from pipeline.artifacts.figures import save_image_panels, save_loss_curves, save_sweep_heatmap
from pipeline.artifacts.loss_curve import LossCurveError, load_loss_curve, loss_curve_path
from pipeline.artifacts.records import (ResultsError, load_nll_per_image, load_over_training,
                                        load_reference, nll_path, over_training_path)
from pipeline.artifacts.trials import load_sweep_trials
from pipeline.core import scores
from pipeline.core.config import run_key
from pipeline.core.errors import remake
from pipeline.core.io import write_json, write_text
from pipeline.core.tracking import TAG_NOTE, tag_dvc_stage_md5
from pipeline.reporting import findings as paper_findings
from pipeline.reporting.calibration import apply_calibration, load_calibration
from pipeline.reporting.findings import VERDICTS
from pipeline.reporting.formats import to_markdown, write_csv
from pipeline.reporting.results import aggregate, check_dataset, load_runs
from pipeline.reporting.steps_table import write_steps_table
from pipeline.reporting.sweep_report import build_sweep, write_sweep
from pipeline.reporting.tables import build_tables, run_descriptions, write_tables
from pipeline.reporting.verdicts import hold_verdicts

if TYPE_CHECKING:
    from pipeline.core.params import Params


# --------------------------------------------------------------------------------------------
# Tabulating: the tables, the sweep report, the findings and the figures
# --------------------------------------------------------------------------------------------


def run_tabulate(params: Params, metrics_dir: str | Path, results_dir: str | Path,
                 sweep_csv: str | Path | None = None,
                 plots_dir: str | Path | None = None,
                 calibration: str | Path | None = None,
                 samples_dir: str | Path | None = None,
                 charts_dir: str | Path | None = None) -> dict[str, Any]:
    """Build and write the tables, the findings and the figures for the runs of `params`;
    return what was made.

    Writes <results_dir>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}, the
    headline numbers, metrics.json (`headline`), and sampling_steps.{md,csv,png}
    (`steps_table`, the runs of sampling_steps.experiments); with `charts_dir`, the data of the DVC charts
    there (`plot_data`, the loss curves read from `plots_dir`); with a
    sweep csv that exists, sweep.{md,csv} and sweep_heatmap.png; with `plots_dir` (the loss
    curves <experiment>-<seed>.csv), loss_curves.png; with `samples_dir` (samples/<E>-<S>/), if
    it exists, samples.png, the first seed's sample grids of every experiment side by side. With a `calibration` file
    (`pipeline.reporting.calibration`) that exists, single-seed rows of a recipe it holds have
    intervals that cover training noise too.

    Keys: dataset; runs (one row per run, as loaded); metrics (one row per experiment: the mean
    over its seeds); reference (dict or None); table1, table2, sweep (formatted frames; sweep
    None without a trials csv); *_tex (the LaTeX-formatted frames); table1_raw, table2_raw,
    sweep_raw (numbers); findings (one row per claim of the paper); paths (the files written).
    """
    results_dir = Path(results_dir)
    dataset = params.data.dataset
    runs = load_runs(metrics_dir, [(r.name, r.seed) for r in params.runs()])
    check_dataset(runs, dataset)
    seeds = load_calibration(calibration) if calibration is not None else None
    metrics = apply_calibration(aggregate(runs), params, seeds)
    reference = load_reference(metrics_dir)
    trials = None
    if sweep_csv is not None and Path(sweep_csv).is_file():
        trials = load_sweep_trials(sweep_csv)
    tables = build_tables(metrics, dataset, reference=reference)
    sweep = build_sweep(trials, params.sweep)
    paths = write_tables(results_dir, tables) + write_sweep(results_dir, sweep)
    per_image = {key: load_nll_per_image(nll_path(metrics_dir, key), key)
                 for key in metrics["key"].dropna()}
    found = hold_verdicts(paper_findings.findings(metrics, per_image), seeds)
    write_text(results_dir / "findings.md", paper_findings.to_markdown(found))
    paths += [results_dir / "findings.md", write_csv(results_dir / "findings.csv", found)]
    made = {**tables, **sweep, "runs": runs, "metrics": metrics, "reference": reference,
            "findings": found}
    write_json(results_dir / "metrics.json", headline(made))
    paths.append(results_dir / "metrics.json")
    if charts_dir is not None:
        paths += plot_data(params, plots_dir, metrics_dir, charts_dir)
    paths += write_steps_table(params, metrics_dir, results_dir, charts_dir)
    if plots_dir is not None:
        paths.append(loss_figure(plots_dir, [r.key for r in params.runs()],
                                 results_dir / "loss_curves.png"))
    if samples_dir is not None and Path(samples_dir).is_dir():
        paths.append(samples_figure(params, samples_dir, runs, results_dir / "samples.png"))
    if sweep["sweep_raw"] is not None:
        save_sweep_heatmap(sweep["sweep_raw"], results_dir / "sweep_heatmap.png",
                           axes=params.sweep.axes)
        paths.append(results_dir / "sweep_heatmap.png")
    return {**made, "paths": paths}




def headline(made: Mapping[str, Any]) -> dict[str, Any]:
    """results/metrics.json, the study at a glance (`run_tabulate`'s `made` in): how many of the
    paper's claims got each verdict (`findings.<verdict>`), then each Table 2 row's FID, IS and
    NLL in bits/dim (the mean over its seeds, as in table2.csv; a diverged row has none), in
    params.yaml's order, then the real data's FID and IS (`real_data.*`, Table 1's reference).
    Only finite numbers: DVC compares them across commits and experiments."""
    found = made["findings"]["verdict"]
    out: dict[str, Any] = {"findings": {v.replace(" ", "_"): int((found == v).sum())
                                        for v in VERDICTS}}
    for row in made["metrics"].to_dict("records"):
        if row["experiment"] in ("findings", "real_data"):
            raise ResultsError(f"experiment '{row['experiment']}': the name of a section of "
                               f"results/metrics.json; rename the experiment in params.yaml")
        out[row["experiment"]] = _finite(row, scores.headline())
    real = (made.get("reference") or {}).get("real_data")
    if real:
        out["real_data"] = _finite(real, scores.headline(real_data=True))
    return out


def _finite(record: Mapping[str, Any], names: Iterable[str]) -> dict[str, float]:
    return {name: float(record[name]) for name in names
            if isinstance(record.get(name), (int, float)) and math.isfinite(record[name])}


def plot_data(params: Params, plots_dir: Optional[str | Path], metrics_dir: str | Path,
              out_dir: str | Path) -> list[Path]:
    """The data of `dvc plots show`'s two charts (dvc.yaml's top-level `plots`, drawn by the
    template .dvc/plots/by_run.json, one line per run), as long tables with a `run` column:

    - <out_dir>/loss.csv (run, step, loss): every run's training loss curve in `plots_dir`
      (plots/loss/<key>.csv; `loss_curves`), all runs on one set of axes;
    - <out_dir>/fid_over_training.csv (run, step, fid): the FID of each run scored at several
      training steps (`evaluate.checkpoints`); a run scored only at its end has no line (a
      one-point chart says nothing), and the file holds its header alone when none was.

    Returns the paths written."""
    out_dir = Path(out_dir)
    loss = ["run,step,loss"]
    fid = ["run,step,fid"]
    keys = [run.key for run in params.runs()]
    curves = loss_curves(plots_dir, keys) if plots_dir is not None else {}
    for key, (steps, losses) in curves.items():
        loss += [f"{key},{s},{v!r}" for s, v in zip(steps, losses)]
    for key in keys:
        path = over_training_path(metrics_dir, key)
        if path.is_file():
            table = load_over_training(path, key)
            table = table[np.isfinite(table["fid"])]
            if len(table) > 1:
                fid += [f"{key},{int(s)},{float(v)!r}"
                        for s, v in zip(table["step"], table["fid"])]
    paths = [out_dir / "loss.csv", out_dir / "fid_over_training.csv"]
    for path, lines in zip(paths, (loss, fid)):
        write_text(path, "\n".join(lines) + "\n")
    return paths


def samples_figure(params: Params, samples_dir: str | Path, runs, out: Path) -> Path:
    """The sample grid of every experiment (its first seed: samples/<E>-<S>/grid.png, as the
    sample stage drew it) side by side, in params.yaml's order, each titled with its name and
    FID (results/samples.png)."""
    fid = {run_key(row["experiment"], row["seed"]): row.get("fid")
           for row in runs.to_dict("records")}
    panels = []
    for name in params.experiments:
        key = run_key(name, params.study.seeds[0])
        path = Path(samples_dir) / key / "grid.png"
        if not path.is_file():
            raise ResultsError(f"{path}: no sample grid; make it with `dvc repro sample@{key}`")
        score = fid.get(key)
        shown = f"FID {score:.1f}" if score is not None and score == score else "no FID"
        panels.append((f"{key} · {shown}", path))
    save_image_panels(panels, out, title=f"samples of each experiment ({params.data.dataset})")
    return out


def loss_curves(plots_dir: str | Path, keys: Iterable[str]
                ) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, losses)}: the loss curve of each run of `keys` that has a file in
    `plots_dir` and a finite loss (non-finite losses left out); a file that is not a loss curve
    stops tabulate with a ResultsError naming it and the fix."""
    curves = {}
    for key in keys:
        path = loss_curve_path(plots_dir, key)
        if path.is_file():
            try:
                steps, losses = load_loss_curve(path)
            except LossCurveError as exc:  # names the file and what is wrong with it
                raise ResultsError(f"{exc}; {remake(f'`dvc repro train@{key}`')}") from None
            if steps:
                curves[key] = (steps, losses)
    return curves


def loss_figure(plots_dir: str | Path, keys: Iterable[str], out: Path) -> Path:
    """Every run's training loss curve in one figure (results/loss_curves.png); a run without a
    loss curve file, or without a finite loss, is left out."""
    save_loss_curves(loss_curves(plots_dir, keys), out, "training loss by experiment")
    return out


def report(made: Mapping[str, Any]) -> str:
    """What the stage prints: Table 1, Table 2, the findings (and the sweep) as markdown, each
    under its title."""
    shown = {"Table 1": to_markdown(made["table1"]), "Table 2": to_markdown(made["table2"]),
             "Findings": paper_findings.to_markdown(made["findings"])}
    if made["sweep"] is not None:
        shown["Sweep"] = to_markdown(made["sweep"])
    return "".join(f"{title}\n\n{text}\n" for title, text in shown.items())


def logged_tables(made: Mapping[str, Any]) -> dict[str, Any]:
    """{name: frame}: the numbers of each table `run_tabulate` made, as logged on the study's
    MLflow run (tables/<name>.json)."""
    frames = {"table1": made["table1_raw"], "table2": made["table2_raw"],
              "sweep": made.get("sweep_raw"), "findings": made["findings"]}
    return {name: frame.reset_index(drop=True) for name, frame in frames.items()
            if frame is not None}


def read_lock(path: str | Path) -> dict[str, Any]:
    """The stages of dvc.lock at `path` ({stage: its entry}; none where there is no file):
    ResultsError naming the file and the fix where it is not a lock DVC wrote."""
    path = Path(path)
    if not path.is_file():
        return {}
    fix = "restore it with `git checkout -- dvc.lock`, or delete it and run `dvc repro`"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ResultsError(f"{path}: not valid YAML{at}; {fix}") from None
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(e, dict) for e in stages.values()):
        raise ResultsError(f"{path}: not a DVC lock file (no mapping of stages); {fix}")
    return stages


def run_tags(params: Params, made: Mapping[str, Any], stages: Mapping[str, Any]
             ) -> dict[str, dict[str, str]]:
    """{run key: tags} for each run's MLflow page: a description naming its row of Table 2
    (`tables.run_descriptions`), and the md5 of its train, sample and evaluate outputs in
    `stages` (dvc.lock's, `read_lock`), which ties the run to the DVC stages."""
    descriptions = run_descriptions(made["table2_raw"])
    out = {}
    for run in params.runs():
        tags = {}
        if run.name in descriptions:
            tags[TAG_NOTE] = descriptions[run.name]  # the run's description in mlflow ui
        for stage in ("train", "sample", "evaluate"):
            outs = (stages.get(f"{stage}@{run.key}") or {}).get("outs") or []
            if outs and isinstance(outs[0], dict) and outs[0].get("md5"):
                tags[tag_dvc_stage_md5(stage)] = outs[0]["md5"]
        if tags:
            out[run.key] = tags
    return out
