"""Stage `sweep`: Ray Tune over noise schedule x loss weighting, with synchronous successive
halving.

    python -m stages.sweep [--params params.yaml]

Every trial trains `sweep.base_experiment` with one schedule and one weighting (the train
stage's per-worker function), reports a stratified NLL estimate on held-out test images every
`sweep.report_every` steps (at each rung, once every trial has reached it, the worst trials stop
on it) and, if it runs to the end, a quick FID. Writes results/sweep/trials.csv (a row per trial:
schedule, weighting, status ok | stopped | unstable | error, fid, nll_bpd, the NLL at the first
rung) and results/sweep/best.yaml, the same on every run of the same commit; logs one MLflow run
for the sweep with one nested run per trial. A sweep stopped mid-way (Ctrl-C, SIGTERM, a lost
node) continues where it was when the stage runs again."""

from __future__ import annotations

import sys

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("sweep", "Sweep noise schedules x loss weightings with Ray Tune "
                       "(synchronous successive halving).",
                       folders=("data", "stats", "models"),
                       out=("results/sweep", "folder for trials.csv and best.yaml"))
    p.add_argument("--storage", default=None,
                   help="Ray Tune storage for trial logs and checkpoints: a path or a URI "
                        "(default: <$DDPM_STORAGE, else cluster.storage>/sweep)")
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.cluster.ray_train import TrainingError
        from pipeline.data.datasets import load_prepared, prepared_path
        from pipeline.jobs.sweep_job import sweep_run
        from pipeline.measure.digits_classifier import classifier_path
        from pipeline.measure.reference_stats_file import reference_stats_path
        from pipeline.training.sweep_trials import trial_probe

        cfg = params.sweep
        base = params.experiment(cfg.base_experiment)
        trial_exps = [params.sweep_experiment(*cell) for cell in cfg.cells()]  # all valid
        train_path = prepared_path(args.data, base.data.dataset, "train")
        test_path = prepared_path(args.data, base.data.dataset, "test")
        load_prepared(train_path)  # fail now, with the command to run, if missing or corrupt
        load_prepared(test_path)
        probe = trial_probe(cfg, base, train_path, test_path, classifier_path(args.models),
                            reference_stats_path(args.stats))

        num_trials = len(trial_exps) if cfg.search == "grid" else cfg.num_samples
        storage = args.storage or f"{params.cluster.resolved_storage().rstrip('/')}/sweep"
        result = sweep_run(cfg, base, num_trials, probe, storage, tracker, args.out)

        table, record = result.table, result.record
        counts = table["status"].value_counts().to_dict()
        print(f"sweep done in {result.tune_wall_s:.0f}s (stage {result.wall_s:.0f}s): "
              + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
        if result.best is not None:
            cell = ", ".join(f"{axis.name} {record[axis.name]}" for axis in cfg.axes)
            print(f"best: {cell} (fid {record['fid']}, nll_bpd {record['nll_bpd']}) -> "
                  f"{args.out}/best.yaml")
        errors = table[table["status"] == "error"]
        for row in errors.to_dict("records"):
            cell = ", ".join(str(row[axis.name]) for axis in cfg.axes)
            print(f"warning: trial {row['trial']} ({cell}) failed: {row['error']}",
                  file=sys.stderr)
        if len(errors) == len(table):
            raise TrainingError(f"every sweep trial failed; logs are under {result.tune_path}")
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
