"""Stage `reference`: the reference rows of Table 1, measured the way the runs are.

    python -m stages.reference [--params params.yaml]

- real data: evaluate.reference_draws draws of sample.num_samples real images, drawn at random
  from all prepared images as a model's samples are, each scored against the rest (mean and sd
  over draws): the N-sample scores of a perfect model;
- untrained model: the base `diffusion` / `model` sections with freshly initialized weights
  (the study's first seed), sampled and scored like a run, with its NLL bound;
- the ceiling of the NLL bound: log2(levels) bits/dim (uniform over the data's levels).
The features, samples and bounds are computed on evaluate.num_workers Ray workers, as the
evaluate stage's. Writes metrics/reference.json and samples/reference/untrained_grid.png.
"""

from __future__ import annotations

from pathlib import Path

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("reference", "Score real data and an untrained model (Table 1's "
                       "reference rows).", folders=("data", "models"),
                       out=("metrics/reference.json", "output file"))
    p.add_argument("--figures", default="samples/reference", type=Path,
                   help="folder for the untrained model's sample grid (default: %(default)s)")
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.artifacts.figures import save_sample_grid
        from pipeline.artifacts.records import save_reference
        from pipeline.cluster import connection
        from pipeline.jobs.evaluate_job import Apparatus, reference_scores
        from pipeline.measure.digits_classifier import classifier_path

        exp = params.base_experiment("untrained")
        apparatus = Apparatus.load(exp, args.data, classifier_path(args.models))
        try:
            reference, untrained_images, chunks = reference_scores(
                exp, apparatus, exp.cluster.resolved_storage())
        finally:
            connection.shutdown()
        real, untrained = reference["real_data"], reference["untrained"]
        print(f"real data ({real['draws']} draws of {real['num_images']} images against the "
              f"other {real['reference_images']}): FID {real['fid']:.3f} ± {real['fid_sd']:.3f},"
              f" IS {real['is_mean']:.3f} ± {real['is_mean_sd']:.3f} (mean ± sd over draws)")
        print(f"untrained model: FID {untrained['fid']:.3f}, IS {untrained['is_mean']:.3f}, "
              f"NLL {untrained['nll_bpd']:.3f} bits/dim (ceiling "
              f"{reference['ceiling']['nll_bpd']:.3f})")
        g = exp.sample.grid_size
        save_sample_grid(untrained_images[: g * g], args.figures / "untrained_grid.png", nrow=g)
        save_reference(args.out, reference)
        chunks.discard()
        run_id = tracker.study_run()
        tracker.log_metrics(run_id, {f"real_{k}": v for k, v in real.items()})
        tracker.log_metrics(run_id, {f"untrained_{k}": v for k, v in untrained.items()})
        tracker.log_artifact(run_id, args.out, "metrics")
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
