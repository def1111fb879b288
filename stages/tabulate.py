"""Stage `tabulate`: metrics/*.json (+ the sweep's trials) -> the paper's Tables 1 and 2 and
the findings: which of the paper's claims the study reproduces.

    python -m stages.tabulate [--params params.yaml] [--metrics metrics] [--results results]
                              [--sweep results/sweep/trials.csv]
                              [--calibration calibration/seeds.json]

Writes <results>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}, metrics.json (the
headline numbers: DVC's metrics), loss_curves.png, samples.png (each experiment's samples) and,
when the sweep's trials csv exists, sweep.{md,csv} and the FID heat map sweep_heatmap.png
(schedule x weighting); <charts>/loss.csv and fid_over_training.csv, the data of `dvc plots
show`'s charts; prints Table 1, Table 2, the findings (and the sweep table) as markdown.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.params import Params
from stages import _common


def main(argv: list[str] | None = None) -> int:
    parser = _common.parser(
        "tabulate", "Collect metrics/<experiment>-<seed>.json of every run in params.yaml into "
        "the paper's Table 1 and Table 2, judge the paper's claims (findings), and tabulate the "
        "sweep's schedule x weighting table when its trials csv exists: "
        "<results>/table1.{md,csv,tex}, table2.{md,csv,tex}, findings.{md,csv}, sweep.{md,csv}.",
        folders=("metrics", "plots", "samples"))
    parser.add_argument("--results", default="results", type=Path,
                        help="folder for the tables (default: %(default)s)")
    parser.add_argument("--charts", default="plots", type=Path,
                        help="folder for the data of the DVC charts, loss.csv and "
                             "fid_over_training.csv (default: %(default)s)")
    parser.add_argument("--sweep", default="results/sweep/trials.csv", type=Path,
                        help="the sweep's trials csv; skipped if absent (default: %(default)s)")
    parser.add_argument("--calibration", default=_common.CALIBRATION_FILE, type=Path,
                        help="the seed calibration that widens single-seed intervals by "
                             "training noise; skipped if absent (default: %(default)s)")
    parser.add_argument("--lock", default="dvc.lock", type=Path,
                        help="dvc.lock, whose stage hashes are tagged on each MLflow run "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)

    def body(params: Params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.reporting.tabulate_job import (logged_tables, read_lock, report, run_tabulate,
                                                     run_tags)

        lock = read_lock(args.lock)  # a broken one stops the stage before it writes a table
        made = run_tabulate(params, args.metrics, args.results, args.sweep, args.plots,
                            args.calibration, args.samples, args.charts)
        run_id = tracker.study_run()
        for name, frame in logged_tables(made).items():
            tracker.log_table(run_id, frame, f"tables/{name}.json")
        for path in made["paths"]:
            tracker.log_artifact(run_id, path, "tables")
        runs = {run.key: run for run in params.runs()}
        for key, tags in run_tags(params, made, lock).items():
            tracker.set_tags(tracker.run_of(runs[key]), tags)
        tracker.set_terminated(run_id, "FINISHED")
        print(report(made), end="")
        print(f"wrote {len(made['paths'])} files to {args.results} and {args.charts}")
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
