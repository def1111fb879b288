"""Stage `sweep`: Ray Tune over noise schedule x loss weighting, with ASHA early stopping.

    python -m stages.sweep [--params params.yaml]

Every trial trains `sweep.base_experiment` with one schedule and one weighting (a TorchTrainer
around the train stage's per-worker function), reports a stratified NLL estimate on held-out
test images every `sweep.report_every` steps (ASHA stops the worst trials on it) and, if it runs
to the end, a quick FID. Writes results/sweep/trials.csv (Ray Tune's results table plus
schedule, weighting, status ok | stopped | unstable | error, fid, nll_bpd) and
results/sweep/best.yaml; logs one MLflow run for the sweep with one nested run per trial.
"""

from __future__ import annotations

import sys
import time

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("sweep", "Sweep noise schedules x loss weightings with Ray Tune (ASHA).",
                       folders=("data", "models"),
                       out=("results/sweep", "folder for trials.csv and best.yaml"))
    p.add_argument("--storage", default=None,
                   help="Ray Tune storage for trial logs and checkpoints: a path or a URI "
                        "(default: <$DDPM_STORAGE, else cluster.storage>/sweep)")
    args = p.parse_args(argv)

    def body(params) -> int:
        from pipeline.cluster.sweep import (best_record, best_trial, log_sweep, save_sweep,
                                            trial_probe, trials_table)
        from pipeline.data.datasets import load_prepared, prepared_path

        cfg = params.sweep
        base = params.experiment(cfg.base_experiment)
        trial_exps = [params.sweep_experiment(s, w) for s, w in cfg.cells()]  # all valid
        tracker = _common.tracker_for(params)
        train_path = prepared_path(args.data, base.data.dataset, "train")
        test_path = prepared_path(args.data, base.data.dataset, "test")
        load_prepared(train_path)  # fail now, with the command to run, if missing or corrupt
        load_prepared(test_path)
        probe = trial_probe(cfg, base, train_path, test_path,
                            args.models / "classifier" / "classifier.pt")

        from pipeline.cluster import connection, tune

        print(connection.connect(), flush=True)
        num_trials = len(trial_exps) if cfg.search == "grid" else cfg.num_samples
        print(f"sweep: {num_trials} trials of {base.name} ({cfg.search} search over "
              f"{len(cfg.schedules)} schedules x {len(cfg.weightings)} weightings), "
              f"{cfg.steps} steps each, {tune.concurrent_trials(cfg)} at a time, ASHA on "
              "the validation nll_bpd", flush=True)
        start = time.monotonic()
        try:
            storage = args.storage or f"{params.cluster.resolved_storage().rstrip('/')}/sweep"
            run = tune.run_sweep(cfg, base, storage, probe, seed=base.seed)
        finally:
            connection.shutdown()
        table = trials_table(run.table, run.trials, cfg)
        parent, children = log_sweep(tracker, cfg, base, run.trials, table, run.wall_s)
        best = best_trial(table)
        record = best_record(best, table, cfg, base, children)
        record["sweep_wall_s"] = round(run.wall_s, 1)
        record["mlflow_sweep_run_id"] = parent
        record["tune_path"] = str(run.path)

        for path in save_sweep(args.out, table, record):
            tracker.log_artifact(parent, path, "sweep")

        counts = table["status"].value_counts().to_dict()
        print(f"sweep done in {run.wall_s:.0f}s (stage {time.monotonic() - start:.0f}s): "
              + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
        if best is not None:
            print(f"best: schedule {record['schedule']}, weighting {record['weighting']} "
                  f"(fid {record['fid']}, nll_bpd {record['nll_bpd']}) -> {args.out}/best.yaml")
        errors = table[table["status"] == "error"]
        for row in errors.to_dict("records"):
            print(f"warning: trial {row['trial_id']} ({row['schedule']}, {row['weighting']}) "
                  f"failed: {row['error']}", file=sys.stderr)
        if len(errors) == len(table):
            from pipeline.cluster.train import TrainingError

            raise TrainingError(f"every sweep trial failed; logs are under {run.path}")
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
