"""Stage `evaluate@<E>-<S>`: FID / IS / KID of the samples of run (experiment E, seed S) and
the NLL bound (bits/dim) of its model, each with its standard error.

    python -m stages.evaluate --experiment eps_simple [--seed 0] [--params params.yaml]

What is measured, and how, is `pipeline.jobs.evaluate_job`. Writes metrics/<E>-<S>.json (the
scores, numbers only), metrics/<E>-<S>_run.json (what the run was: settings, status, sample
counts, timings), metrics/<E>-<S>_nll.csv (the bound of every test and train image, for
comparing runs image by image) and, for scores over training, metrics/<E>-<S>_over_training.csv with its figure
plots/fid_over_training/<E>-<S>.png (one row, the final model, without evaluate.checkpoints).
Every network evaluation runs on evaluate.num_workers Ray workers (a GPU each with
evaluate.use_gpu), its finished chunks kept in Ray storage until the outputs are written; the
train split's side of FID and KID is read from data/reference_stats/train.npz (the
`reference_stats` stage), refused if it was made for another extractor, N, split or data.
An unstable model gets status "unstable" and no scores.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.scores import headline
from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("evaluate", "Measure FID / IS / KID, precision / recall and NLL (bits/dim) of one run.",
                       experiment=True, folders=("data", "stats", "models", "samples"),
                       out=("metrics", "folder for <E>-<S>.json, _run.json, _nll.csv and "
                                       "_over_training.csv"),
                       seed_use="gives the run (its model and samples) to evaluate")
    p.add_argument("--figures", default="plots/fid_over_training", type=Path,
                   help="folder for <E>-<S>.png, FID and NLL over training "
                        "(default: %(default)s)")
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.cluster import connection
        from pipeline.jobs.evaluate_job import (evaluate_run, evaluation_inputs, log_evaluation,
                                                save_evaluation)
        from pipeline.measure.reference_stats_file import reference_stats_path

        exp = params.experiment(args.experiment, args.seed)
        run_id = tracker.run_of(exp)
        # every input read and checked before the run is marked RUNNING: refused input leaves
        # the run as the stages before left it
        inputs = evaluation_inputs(exp, args.data, args.models, args.samples,
                                   reference_stats_path(args.stats))
        with tracker.live_run(run_id):  # RUNNING with system metrics; FINISHED, FAILED, KILLED
            try:
                result = evaluate_run(inputs, exp.cluster.resolved_storage(),
                                      on_progress=tracker.progress(run_id, "evaluate",
                                                                   "evaluations"))
            finally:
                connection.shutdown()
            paths = save_evaluation(result, exp, args.out, args.figures)
            log_evaluation(tracker, run_id, result, paths)
            if result.chunks is not None:  # written and logged: no chunk is needed any more
                result.chunks.discard()
        record = result.record
        shown = ", ".join(f"{k} {record[k]:.4g} ± {1.96 * record[k + '_se']:.2g}"
                          for k in headline() if record.get(k) is not None)
        print(f"evaluated {exp.key} ({record['status']}): {shown or 'no metrics'} "
              f"-> {paths['metrics']}")
        if record.get("best_checkpoint_step") is not None:
            print(f"best FID over training: step {record['best_checkpoint_step']} (quick FID "
                  f"{record['best_checkpoint_fid']:.4g}) -> {paths['scores']}, "
                  f"{paths['figure']}")
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
