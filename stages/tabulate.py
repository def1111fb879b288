"""Stage `tabulate`: metrics/*.json (+ the sweep's trials) -> the paper's Tables 1 and 2.

    python -m stages.tabulate [--params params.yaml] [--metrics metrics] [--results results]
                              [--sweep results/sweep/trials.csv]

Writes <results>/table1.{md,csv,tex}, table2.{md,csv,tex}, loss_curves.png and, when the
sweep's trials csv exists, sweep.{md,csv} and the FID heat map sweep_heatmap.png (schedule x
weighting); prints Table 1 and Table 2 (and the sweep table) as markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Params, load_params
from pipeline.tables import (build_tables, check_dataset, load_metrics, load_reference,
                             load_sweep_trials, to_markdown, write_tables)


def run_tabulate(params: Params, metrics_dir: str | Path, results_dir: str | Path,
                 sweep_csv: str | Path | None = None) -> dict[str, Any]:
    """Build and write the tables for the experiments of `params`; return what was made.

    Keys: dataset; metrics (one row per experiment, as loaded); reference (dict or None);
    table1, table2, sweep (formatted frames; sweep None without a trials csv); *_tex (the
    LaTeX-formatted frames); table1_raw, table2_raw, sweep_raw (numbers); paths (the files
    written). The sweep csv is optional: absent, the sweep table is skipped.
    """
    dataset = params.data.dataset
    metrics = load_metrics(metrics_dir, list(params.experiments))
    check_dataset(metrics, dataset)
    reference = load_reference(metrics_dir)
    trials = None
    if sweep_csv is not None and Path(sweep_csv).is_file():
        trials = load_sweep_trials(sweep_csv)
    tables = build_tables(metrics, dataset, reference=reference, trials=trials)
    paths = write_tables(results_dir, tables)
    return {**tables, "metrics": metrics, "reference": reference, "paths": paths}


def loss_figure(plots_dir: Path, experiments: list[str], out: Path) -> Path:
    """All experiments' training loss curves in one figure (results/loss_curves.png)."""
    import pandas as pd

    from pipeline.figures import save_loss_curves

    curves = {}
    for name in experiments:
        path = Path(plots_dir) / f"{name}.csv"
        if path.is_file():
            frame = pd.read_csv(path)
            frame = frame[frame["loss"].apply(lambda v: v == v and abs(v) != float("inf"))]
            if len(frame):
                curves[name] = (frame["step"].tolist(), frame["loss"].tolist())
    save_loss_curves(curves, out, "training loss by experiment")
    return out


def log_to_mlflow(tracker, params: Params, made: dict[str, Any], lock: Path) -> None:
    """The tables on the study's MLflow run; on each experiment's run, the dvc.lock stage
    hashes and a description naming its row of Table 2."""
    import yaml

    from pipeline.tables import run_descriptions
    from pipeline.tracking import TAG_NOTE

    run_id = tracker.study_run()
    for name in ("table1", "table2", "sweep"):
        raw = made.get(f"{name}_raw")
        if raw is not None:
            tracker.log_table(run_id, raw.reset_index(drop=True), f"tables/{name}.json")
    for path in made["paths"]:
        tracker.log_artifact(run_id, path, "tables")
    stages = {}
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    descriptions = run_descriptions(made["table2_raw"])
    for name, exp in params.experiments.items():
        tags = {}
        if name in descriptions:
            tags[TAG_NOTE] = descriptions[name]  # the run's description in mlflow ui
        for stage in ("train", "sample", "evaluate"):
            entry = stages.get(f"{stage}@{name}") or {}
            outs = entry.get("outs") or []
            if outs and outs[0].get("md5"):
                tags[f"dvc.{stage}.md5"] = outs[0]["md5"]
        if tags:
            tracker.set_tags(tracker.run_for(name, {"config_hash": exp.config_hash()}), tags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.tabulate",
        description="Collect metrics/<experiment>.json of every experiment in params.yaml into "
                    "the paper's Table 1 and Table 2 (and the sweep's schedule x weighting "
                    "table when its trials csv exists): <results>/table1.{md,csv,tex}, "
                    "table2.{md,csv,tex}, sweep.{md,csv}.")
    parser.add_argument("--params", default="params.yaml", type=Path,
                        help="the study's params file (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics", type=Path,
                        help="folder of <experiment>.json metrics (default: %(default)s)")
    parser.add_argument("--results", default="results", type=Path,
                        help="folder for the tables (default: %(default)s)")
    parser.add_argument("--sweep", default="results/sweep/trials.csv", type=Path,
                        help="the sweep's trials csv; skipped if absent (default: %(default)s)")
    parser.add_argument("--plots", default="plots/loss", type=Path,
                        help="folder of the training loss curves <experiment>.csv "
                             "(default: %(default)s)")
    parser.add_argument("--lock", default="dvc.lock", type=Path,
                        help="dvc.lock, whose stage hashes are tagged on each MLflow run "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    from stages import _common

    try:
        params = load_params(args.params)
        tracker = _common.tracker_for(params)
        made = run_tabulate(params, args.metrics, args.results, args.sweep)
        made["paths"].append(loss_figure(args.plots, list(params.experiments),
                                         args.results / "loss_curves.png"))
        if made["sweep_raw"] is not None:
            from pipeline.figures import save_sweep_heatmap

            save_sweep_heatmap(made["sweep_raw"], args.results / "sweep_heatmap.png")
            made["paths"].append(args.results / "sweep_heatmap.png")
        log_to_mlflow(tracker, params, made, Path(args.lock))
    except _common.user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("Table 1\n")
    print(to_markdown(made["table1"]))
    print("Table 2\n")
    print(to_markdown(made["table2"]))
    if made["sweep"] is not None:
        print("Sweep\n")
        print(to_markdown(made["sweep"]))
    print(f"wrote {len(made['paths'])} files to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
