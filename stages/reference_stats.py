"""Stage `reference_stats`: the real data's side of FID and KID, computed once for the study.

    python -m stages.reference_stats [--params params.yaml]

Extracts the features of every train image with the study's feature extractor (on
evaluate.num_workers Ray workers, as the evaluate stage's features) and writes
data/reference_stats/train.npz: the train split's feature sums, the features of KID's reference
images, their provenance (extractor and the SHA-256 of its weights, split, N, the SHA-256 of the
prepared split) and a digest of it all. Every evaluate stage, its checkpoints' quick FIDs and
the sweep's trials read it instead of extracting the train split again, and refuse a file made
for another study (`pipeline.measure.reference_stats_file`).
"""

from __future__ import annotations

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("reference_stats", "Compute the train split's reference statistics "
                       "(FID / KID) once.", folders=("data", "models"),
                       out=("data/reference_stats", "folder for <split>.npz"))
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.cluster import connection
        from pipeline.jobs.evaluate_job import Apparatus
        from pipeline.jobs.reference_stats_job import SPLIT, reference_stats_run
        from pipeline.measure.digits_classifier import classifier_path
        from pipeline.measure.reference_stats_file import reference_stats_path, save_reference_stats

        exp = params.base_experiment("reference_stats")
        apparatus = Apparatus.load(exp, args.data, classifier_path(args.models))
        try:
            stats, chunks = reference_stats_run(exp, apparatus, exp.cluster.resolved_storage())
        finally:
            connection.shutdown()
        path = reference_stats_path(args.out, SPLIT)
        save_reference_stats(path, stats)
        chunks.discard()
        made = stats.provenance
        print(f"reference statistics of {made['num_images']} {made['split']} images "
              f"({made['dataset']}, {made['extractor']}, {stats.moments.feature_sum.shape[0]} "
              f"features, {len(stats.kid_features)} for KID) -> {path}")
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
