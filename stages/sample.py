"""Stage `sample@<E>-<S>`: sample the EMA model of experiment E trained with seed S.

    python -m stages.sample --experiment eps_simple [--seed 0] [--params params.yaml]

Ancestral sampling (Algorithm 2), or the strided DDIM sampler when sample.sampler says so, on
the data's own levels (17 grey levels for digits), with a seed per image. The batches of
sample.batch_size images run on sample.num_workers Ray workers (a GPU each with
sample.use_gpu); each finished batch is kept in Ray storage (cluster.storage, or
DDPM_STORAGE) until the output is written, so a stopped stage redoes only the missing ones.
Writes samples/<E>-<S>/samples.npz (uint8 N x C x H x W), grid.png and progressive.png
(predicted x0 over time, as the paper's Fig. 6). A model recorded as unstable gets an empty
samples.npz and figures that say so.
"""

from __future__ import annotations

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("sample", "Sample one trained experiment of the study.", experiment=True,
                       folders=("models",), out=("samples", "folder for samples/<E>-<S>/"),
                       seed_use="gives the trained run to sample")
    args = p.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.cluster import connection
        from pipeline.jobs.sample_job import sample_run

        exp = params.experiment(args.experiment, args.seed)
        run_id = tracker.run_of(exp)
        out = args.out / exp.key
        with tracker.live_run(run_id):  # RUNNING with system metrics; FINISHED, FAILED, KILLED
            try:
                result = sample_run(exp, args.models, args.out, exp.cluster.resolved_storage(),
                                    on_progress=tracker.progress(run_id, "sample", "images"))
            finally:
                connection.shutdown()
            if result is None:
                print(f"{exp.key} is unstable: wrote empty samples")
                return 0
            tracker.log_metrics(run_id, {"sample_wall_s": result.wall_s,
                                         "sample_images_per_s": result.images_per_s,
                                         "sample_workers": result.workers,
                                         "sample_chunks_computed": result.computed,
                                         "sample_chunks_reused": result.reused,
                                         "sample_chunks_redone": result.redone})
            tracker.log_params(run_id, {"sample": exp.to_dict()["sample"]})
            for name in ("grid.png", "progressive.png"):
                tracker.log_artifact(run_id, out / name, "samples")
        reused = f", {result.reused} found in storage" if result.reused else ""
        if result.redone:
            reused += f", {result.redone} begun again after its worker was lost"
        print(f"sampled {exp.key}: {len(result.images)} images in {result.wall_s:.0f}s "
              f"({result.images_per_s:.1f} images/s; {_count(result.computed, 'chunk')} "
              f"computed on {_count(result.workers, 'worker')}{reused}) -> {out}")
        return 0

    return _common.run(body, args.params, tracking=True)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


if __name__ == "__main__":
    raise SystemExit(main())
