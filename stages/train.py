"""Stage `train@<E>-<S>`: Ray Train (TorchTrainer, DDP) fits experiment E with seed S (one of
study.seeds) on the prepared train split.

    python -m stages.train --experiment eps_simple [--seed 0] [--params params.yaml]

Writes models/<E>-<S>/ (EMA and raw weights, optimizer state, state.json, config.yaml) and the
loss curve plots/loss/<E>-<S>.csv, from what it reads back from Ray Train's storage:
`cluster.storage` (checkpoints/ by default, outside every DVC output; a shared path or a URI
such as s3://bucket/prefix on a cluster; DDPM_STORAGE or --storage override it), so a killed
run resumes from its last checkpoint. With evaluate.checkpoints set, rank 0 also keeps the EMA
weights of every checkpoint step (<storage>/<run name>/ema/) and the steps asked for are copied
to models/<E>-<S>/checkpoints/ema_<step>.pt for the evaluate stage.
A diverged run (non-finite loss) is written with status "unstable" and the stage succeeds, so
the rest of the study goes on.
"""


from __future__ import annotations

import shutil
import sys
import time

from pipeline.core.status import Status
from pipeline.core.tracking import TAG_RAY_RUN_NAME, TAG_STATUS
from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("train", "Train one experiment of the study with Ray Train.",
                       experiment=True, folders=("data", "plots"),
                       out=("models", "folder for models/<E>-<S>/"))
    p.add_argument("--storage", default=None,
                   help="Ray Train storage for checkpoints: a path or a URI such as "
                        "s3://bucket/prefix (default: $DDPM_STORAGE, else cluster.storage)")
    args = p.parse_args(argv)

    def body(params) -> int:
        from pipeline.data.datasets import load_prepared, prepared_path

        exp = params.experiment(args.experiment, args.seed)
        tracker = _common.tracker_for(params)
        train_path = prepared_path(args.data, exp.data.dataset, "train")
        load_prepared(train_path)  # fails now, with the command to run, if missing or corrupt

        from pipeline.artifacts.loss_curve import save_loss_curve
        from pipeline.artifacts.models import wanted_ema_snapshots, write_model_dir
        from pipeline.cluster import connection, train
        from pipeline.core.io import is_uri

        storage = args.storage or exp.cluster.resolved_storage()
        print(connection.connect(), flush=True)
        start = time.monotonic()
        try:
            outcome = train.fit(exp, train_path, storage)
        finally:
            connection.shutdown()
        wall = time.monotonic() - start
        state = outcome.state
        history = state["loss_history"]
        steps_done = state["step"]
        images_per_s = steps_done * exp.train.batch_size / state["wall_s"] \
            if state.get("wall_s") else None
        extra = {"run_name": train.run_name(exp), "config_hash": exp.config_hash(),
                 "train_wall_s": state.get("wall_s"), "images_per_s": images_per_s,
                 "final_loss": history[-1][1] if history else None,
                 "checkpoints": str(outcome.run_path)}
        snapshots = wanted_ema_snapshots(exp, outcome.ema_snapshot_dir, steps_done)
        write_model_dir(args.out / exp.key, state, extra, ema_snapshots=snapshots)
        if outcome.ema_snapshot_dir is not None and is_uri(storage):  # a local copy: done
            shutil.rmtree(outcome.ema_snapshot_dir, ignore_errors=True)
        save_loss_curve(args.plots / f"{exp.key}.csv", history)

        run_id = tracker.run_of(exp)
        tracker.log_params(run_id, exp.to_dict())
        tracker.log_metric_history(run_id, "train_loss", [s for s, _ in history],
                                   [v for _, v in history])
        tracker.log_metrics(run_id, {"train_wall_s": state.get("wall_s"),
                                     "train_images_per_s": images_per_s,
                                     "train_steps": steps_done})
        tracker.set_tags(run_id, {TAG_STATUS: state["status"],
                                  TAG_RAY_RUN_NAME: train.run_name(exp)})
        status = state["status"]
        kept = f", EMA kept at steps {list(snapshots)}" if snapshots else ""
        print(f"trained {exp.key}: {steps_done} steps, status {status}, "
              f"{images_per_s or float('nan'):.0f} images/s, stage wall time {wall:.0f}s{kept}",
              flush=True)
        if status != Status.OK:
            print(f"warning: {exp.key} diverged (non-finite loss); recorded as unstable",
                  file=sys.stderr)
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
