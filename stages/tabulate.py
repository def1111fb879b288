"""Stage `tabulate`: metrics/*.json (+ the sweep's trials) -> the paper's Tables 1 and 2 and
the findings: which of the paper's claims the study reproduces.

    python -m stages.tabulate [--params params.yaml] [--metrics metrics] [--results results]
                              [--sweep results/sweep/trials.csv]
                              [--calibration calibration/seeds.json]

Writes <results>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}, loss_curves.png
and, when the sweep's trials csv exists, sweep.{md,csv} and the FID heat map sweep_heatmap.png
(schedule x weighting); prints Table 1, Table 2, the findings (and the sweep table) as markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.config import Params


def log_to_mlflow(tracker, params: Params, made: dict[str, Any], lock: Path) -> None:
    """The tables on the study's MLflow run; on each experiment's run, the dvc.lock stage
    hashes and a description naming its row of Table 2."""
    import yaml

    from pipeline.core.tracking import TAG_NOTE, tag_dvc_stage_md5
    from pipeline.reporting.tables import run_descriptions

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
                tags[tag_dvc_stage_md5(stage)] = outs[0]["md5"]
        if tags:
            tracker.set_tags(tracker.run_of(exp), tags)
    tracker.set_terminated(run_id, "FINISHED")


def main(argv: list[str] | None = None) -> int:
    from stages import _common

    parser = _common.parser(
        "tabulate", "Collect metrics/<experiment>-<seed>.json of every run in params.yaml into "
        "the paper's Table 1 and Table 2, judge the paper's claims (findings), and tabulate the "
        "sweep's schedule x weighting table when its trials csv exists: "
        "<results>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}, sweep.{md,csv}.",
        folders=("metrics", "plots"))
    parser.add_argument("--results", default="results", type=Path,
                        help="folder for the tables (default: %(default)s)")
    parser.add_argument("--sweep", default="results/sweep/trials.csv", type=Path,
                        help="the sweep's trials csv; skipped if absent (default: %(default)s)")
    parser.add_argument("--calibration", default="calibration/seeds.json", type=Path,
                        help="the seed calibration that widens single-seed intervals by "
                             "training noise; skipped if absent (default: %(default)s)")
    parser.add_argument("--lock", default="dvc.lock", type=Path,
                        help="dvc.lock, whose stage hashes are tagged on each MLflow run "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)

    def body(params: Params) -> int:
        from pipeline.reporting.tabulate import report, run_tabulate

        tracker = _common.tracker_for(params)
        made = run_tabulate(params, args.metrics, args.results, args.sweep, args.plots,
                            args.calibration)
        log_to_mlflow(tracker, params, made, Path(args.lock))
        print(report(made), end="")
        print(f"wrote {len(made['paths'])} files to {args.results}")
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
