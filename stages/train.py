"""Stage `train@<E>-<S>`: Ray Train (TorchTrainer, DDP) fits experiment E with seed S (one of
study.seeds) on the prepared train split.

    python -m stages.train --experiment eps_simple [--seed 0] [--params params.yaml]

Writes models/<E>-<S>/ (EMA and raw weights, optimizer state, state.json, config.yaml) and the
loss curve plots/loss/<E>-<S>.csv, from what it reads back from Ray Train's storage:
`cluster.storage` (ray_storage/ by default, outside every DVC output; a shared path or a URI
such as s3://bucket/prefix on a cluster; DDPM_STORAGE or --storage override it), so a killed
run resumes from its last checkpoint. With evaluate.checkpoints set, rank 0 also keeps the EMA
weights of every checkpoint step (<storage>/<run name>/ema/) and the steps asked for are copied
to models/<E>-<S>/ema_snapshots/ema_<step>.pt for the evaluate stage.
Its MLflow run is open from the start: params first, then the loss, learning rate, images/s
and gradient norm every train.log_every steps and MLflow's system metrics while it trains
(status RUNNING), FINISHED at the end (FAILED on an error, KILLED on Ctrl-C or SIGTERM); a
killed and rerun stage goes on in the same run without logging a step twice.
A diverged run (non-finite loss) is written with status "unstable" and the stage succeeds, so
the rest of the study goes on.
"""

from __future__ import annotations

import sys

from pipeline.core.status import Status
from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("train", "Train one experiment of the study with Ray Train.",
                       experiment=True, folders=("data", "plots"),
                       out=("models", "folder for models/<E>-<S>/"))
    p.add_argument("--storage", default=None,
                   help="Ray Train storage for checkpoints: a path or a URI such as "
                        "s3://bucket/prefix (default: $DDPM_STORAGE, else cluster.storage)")
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.data.datasets import load_prepared, prepared_path
        from pipeline.jobs.train_job import log_training, open_training, train_run

        exp = params.experiment(args.experiment, args.seed)
        train_path = prepared_path(args.data, exp.data.dataset, "train")
        load_prepared(train_path)  # fails now, with the command to run, if missing or corrupt

        storage = args.storage or exp.cluster.resolved_storage()
        run_id, stream = open_training(tracker, exp)
        with tracker.live_run(run_id):  # RUNNING with system metrics; FINISHED, FAILED, KILLED
            run = train_run(exp, train_path, storage, args.out, args.plots, stream=stream)
            log_training(tracker, run_id, run)
        kept = f", EMA kept at steps {list(run.snapshots)}" if run.snapshots else ""
        print(f"trained {exp.key}: {run.steps} steps, status {run.status}, "
              f"{run.images_per_s or float('nan'):.0f} images/s, stage wall time "
              f"{run.wall_s:.0f}s{kept}", flush=True)
        if run.status != Status.OK:
            print(f"warning: {exp.key} diverged (non-finite loss); recorded as unstable",
                  file=sys.stderr)
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
