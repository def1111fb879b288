"""Stage `tabulate`: metrics/*.json (+ the sweep's trials) -> the paper's Tables 1 and 2 and
the findings: which of the paper's claims the study reproduces.

    python -m stages.tabulate [--params params.yaml] [--metrics metrics] [--results results]
                              [--sweep results/sweep/trials.csv]

Writes <results>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}, loss_curves.png
and, when the sweep's trials csv exists, sweep.{md,csv} and the FID heat map sweep_heatmap.png
(schedule x weighting); prints Table 1, Table 2, the findings (and the sweep table) as markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params


def run_tabulate(params: Params, metrics_dir: str | Path, results_dir: str | Path,
                 sweep_csv: str | Path | None = None) -> dict[str, Any]:
    """Build and write the tables and the findings for the runs of `params`; return what was
    made.

    Keys: dataset; runs (one row per run, as loaded); metrics (one row per experiment: the mean
    over its seeds); reference (dict or None); table1, table2, sweep (formatted frames; sweep
    None without a trials csv); *_tex (the LaTeX-formatted frames); table1_raw, table2_raw,
    sweep_raw (numbers); findings (one row per claim of the paper); paths (the files written).
    The sweep csv is optional: absent, the sweep table is skipped.
    """
    from pipeline import findings as paper_findings
    from pipeline.evaluation import load_nll_per_image, load_reference, nll_path
    from pipeline.io import write_text
    from pipeline.tables import (_write_csv, aggregate, build_tables, check_dataset,
                                 load_runs, load_sweep_trials, write_tables)

    dataset = params.data.dataset
    runs = load_runs(metrics_dir, [(r.name, r.seed) for r in params.runs()])
    check_dataset(runs, dataset)
    metrics = aggregate(runs)
    reference = load_reference(metrics_dir)
    trials = None
    if sweep_csv is not None and Path(sweep_csv).is_file():
        trials = load_sweep_trials(sweep_csv)
    tables = build_tables(metrics, dataset, reference=reference, trials=trials)
    paths = write_tables(results_dir, tables)
    per_image = {key: load_nll_per_image(nll_path(metrics_dir, key), key)
                 for key in metrics["key"].dropna()}
    found = paper_findings.findings(metrics, per_image)
    write_text(Path(results_dir) / "findings.md", paper_findings.to_markdown(found))
    paths += [Path(results_dir) / "findings.md",
              _write_csv(Path(results_dir) / "findings.csv", found)]
    return {**tables, "runs": runs, "metrics": metrics, "reference": reference,
            "findings": found, "paths": paths}


def loss_figure(plots_dir: Path, keys: list[str], out: Path) -> Path:
    """Every run's training loss curve in one figure (results/loss_curves.png)."""
    import pandas as pd

    from pipeline.figures import save_loss_curves

    curves = {}
    for name in keys:
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
    for name in ("table1", "table2", "sweep", "findings"):
        raw = made.get(name if name == "findings" else f"{name}_raw")
        if raw is not None:
            tracker.log_table(run_id, raw.reset_index(drop=True), f"tables/{name}.json")
    for path in made["paths"]:
        tracker.log_artifact(run_id, path, "tables")
    stages = {}
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    descriptions = run_descriptions(made["table2_raw"])
    for exp in params.runs():
        tags = {}
        if exp.name in descriptions:
            tags[TAG_NOTE] = descriptions[exp.name]  # the run's description in mlflow ui
        for stage in ("train", "sample", "evaluate"):
            entry = stages.get(f"{stage}@{exp.key}") or {}
            outs = entry.get("outs") or []
            if outs and outs[0].get("md5"):
                tags[f"dvc.{stage}.md5"] = outs[0]["md5"]
        if tags:
            tracker.set_tags(tracker.run_for(exp.name, {"config_hash": exp.config_hash()},
                                             exp.seed), tags)
    tracker.set_terminated(run_id, "FINISHED")



def main(argv: list[str] | None = None) -> int:
    from stages import _common

    parser = _common.parser(
        "tabulate", "Collect metrics/<experiment>-<seed>.json of every run in params.yaml into "
        "the paper's Table 1 and Table 2, judge the paper's claims (findings), and tabulate the "
        "sweep's schedule x weighting table when its trials csv exists: "
        "<results>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}, sweep.{md,csv}.")
    parser.add_argument("--metrics", default="metrics", type=Path,
                        help="folder of <experiment>-<seed>.json metrics (default: %(default)s)")
    parser.add_argument("--results", default="results", type=Path,
                        help="folder for the tables (default: %(default)s)")
    parser.add_argument("--sweep", default="results/sweep/trials.csv", type=Path,
                        help="the sweep's trials csv; skipped if absent (default: %(default)s)")
    parser.add_argument("--plots", default="plots/loss", type=Path,
                        help="folder of the training loss curves <experiment>-<seed>.csv "
                             "(default: %(default)s)")
    parser.add_argument("--lock", default="dvc.lock", type=Path,
                        help="dvc.lock, whose stage hashes are tagged on each MLflow run "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)

    def body(params: Params) -> int:
        from pipeline.findings import to_markdown as findings_markdown
        from pipeline.tables import to_markdown

        tracker = _common.tracker_for(params)
        made = run_tabulate(params, args.metrics, args.results, args.sweep)
        made["paths"].append(loss_figure(args.plots, [r.key for r in params.runs()],
                                         args.results / "loss_curves.png"))
        if made["sweep_raw"] is not None:
            from pipeline.figures import save_sweep_heatmap

            save_sweep_heatmap(made["sweep_raw"], args.results / "sweep_heatmap.png")
            made["paths"].append(args.results / "sweep_heatmap.png")
        log_to_mlflow(tracker, params, made, Path(args.lock))
        shown = {"Table 1": to_markdown(made["table1"]), "Table 2": to_markdown(made["table2"]),
                 "Findings": findings_markdown(made["findings"])}
        if made["sweep"] is not None:
            shown["Sweep"] = to_markdown(made["sweep"])
        for title, text in shown.items():
            print(f"{title}\n\n{text}")
        print(f"wrote {len(made['paths'])} files to {args.results}")
        return 0

    return _common.run(body, args.params)



if __name__ == "__main__":
    raise SystemExit(main())
