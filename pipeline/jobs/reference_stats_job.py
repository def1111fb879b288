"""The `reference_stats` stage's work: the train split's reference statistics, once per study.

The features of every train image go through the study's extractor on Ray workers, in the chunks
the evaluate stage used to extract them in (`reference_chunks`: one jackknife group, chunks of up
to 10 x FEATURE_CHUNK images, KID's `kid_subset`), and are merged in chunk order: the
`FeatureMoments` and KID features that every evaluation then reads from
`data/reference_stats/train.npz` (`pipeline.measure.reference_stats_file`) are the float64 arrays the
evaluate stage computed for itself before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.cluster import ray_data
from pipeline.jobs.evaluate_job import Apparatus
from pipeline.measure.chunks import (ChunkStore, ShardedJob, Workers, feature_chunks, job_name,
                                     merge_feature_parts)
from pipeline.measure.reference_stats_file import ReferenceStats
from pipeline.measure.stats import kid_subset

SPLIT = "train"  # FID and KID compare samples with the train split


def reference_chunks(num_images: int) -> list:
    """Features of the train split: the reference side of FID (its sums) and KID (the
    features of `kid_subset` of it)."""
    return feature_chunks(SPLIT, num_images, groups=1, kid=kid_subset(num_images),
                          prefix="reference")


def reference_stats_job(exp, apparatus: Apparatus):
    """The stage's `ShardedJob` (`exp`: the study's base experiment, for its evaluate
    section's workers) and its chunks."""
    workers = Workers.of(exp.evaluate, "evaluate")
    images = apparatus.train.images
    chunks = reference_chunks(len(images))
    name = job_name(exp, "reference_stats", workers, *apparatus.digests())
    job = ShardedJob(
        name=name, label="reference statistics", unit="images", chunks=chunks, workers=workers,
        spec={"experiment": exp.to_dict(), "image_shape": list(images.shape[1:]),
              "data_levels": apparatus.train.levels, "extractor": apparatus.extractor},
        objects={"models": {}, "extractor_weights": apparatus.extractor_weights(),
                 "images": {SPLIT: images}})
    return job, chunks


def reference_statistics(chunks, run, provenance: dict[str, Any]) -> ReferenceStats:
    """The merged `feature_parts` of `reference_chunks` as `ReferenceStats`."""
    merged = merge_feature_parts(run.of(chunks), groups=1,
                                 total=sum(c.args["count"] for c in chunks))
    return ReferenceStats(merged.features[0], merged.kid_features, provenance)


def reference_stats_run(exp, apparatus: Apparatus, storage: str | Path):
    """Compute the train split's reference statistics on Ray workers (finished chunks kept in
    `storage`): (the `ReferenceStats`, the job's ChunkStore to discard once they are written)."""
    job, chunks = reference_stats_job(exp, apparatus)
    run = ray_data.run_chunks(job, storage)
    made = {**apparatus.reference_provenance(), "device": job.workers.device,
            "torch": torch.__version__}
    return reference_statistics(chunks, run, made), ChunkStore(storage, job.name)
