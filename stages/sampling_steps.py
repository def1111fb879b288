"""Stage `sampling_steps@<E>-<S>`: run E-S's FID, IS, KID and precision / recall against the
number of sampling steps.

    python -m stages.sampling_steps --experiment eps_simple [--seed 0] [--params params.yaml]

The run's EMA model draws sample.num_samples images with DDIM at each count of
sampling_steps.ddim_steps and with ancestral sampling at all T steps, from the per-image seeds
of its own samples, on sample.num_workers Ray workers (finished chunks kept in Ray storage until
the output is written); each setting is scored as the evaluate stage scores a run. Writes
metrics/<E>-<S>_sampling_steps.csv, and logs each score on the run's MLflow run at step = the
number of sampling steps. The experiments it runs for are sampling_steps.experiments.
"""

from __future__ import annotations

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("sampling_steps", "FID, IS and precision / recall of one trained run "
                       "against the number of sampling steps.", experiment=True,
                       folders=("data", "stats", "models"),
                       out=("metrics", "folder for <E>-<S>_sampling_steps.csv"),
                       seed_use="gives the trained run to measure")
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.artifacts.records import sampling_steps_path, save_sampling_steps
        from pipeline.cluster import connection
        from pipeline.jobs.sampling_steps_job import (log_sampling_steps, sampling_steps_run,
                                                      steps_inputs, summary)
        from pipeline.measure.reference_stats_file import reference_stats_path

        exp = params.experiment(args.experiment, args.seed)
        run_id = tracker.run_of(exp)
        inputs = steps_inputs(exp, args.data, args.models, reference_stats_path(args.stats))
        path = sampling_steps_path(args.out, exp.key)
        with tracker.live_run(run_id):  # RUNNING with system metrics; FINISHED, FAILED, KILLED
            try:
                result = sampling_steps_run(inputs, params.sampling_steps,
                                            exp.cluster.resolved_storage(),
                                            on_progress=tracker.progress(run_id, "sampling_steps",
                                                                         "evaluations"))
            finally:
                connection.shutdown()
            save_sampling_steps(path, result.scores)
            log_sampling_steps(tracker, run_id, result, path)
            if result.chunks is not None:  # written and logged: no chunk is needed any more
                result.chunks.discard()
        if result.scores.empty:
            print(f"{exp.key} is {result.status}: wrote an empty table -> {path}")
            return 0
        shown = "; ".join(f"{setting} {scores}"
                          for setting, scores in summary(result.scores).items())
        print(f"sampling steps of {exp.key} ({result.wall_s:.0f}s): {shown} -> {path}")
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
