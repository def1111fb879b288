"""Work in chunks: what the sample, evaluate and reference stages hand to their workers.

A stage's network work (sampling, the NLL bound, feature extraction) is cut into `Chunk`s that
depend on the params alone, never on how many workers there are: sampling in batches of
`sample.batch_size` images, the bound in parts of (images x terms)
(`pipeline.measure.nll.nll_parts`), features in blocks of FEATURE_CHUNK images. Every image
(and every bound term) draws its noise from a generator of its own
(`pipeline.diffusion.seeding`), so a chunk's result is the same
whichever worker makes it, in whatever order. A `ShardedJob` is the chunks plus what the workers
need: the resolved experiment, the models' weights, the images, the feature extractor.

- `pipeline.cluster.ray_data.run_chunks` runs a job on Ray workers (Ray Data), keeping each finished
  chunk in Ray storage (`ChunkStore`), so a stopped stage redoes only the missing chunks;
- `run_here` runs it in this process, chunk by chunk (tests, benchmarks): the same bytes.

Each kind of chunk (`CHUNK_KINDS`) is a function of a worker's `ChunkContext` and the chunk's
arguments that returns named numpy arrays. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.core.config import ExperimentConfig
from pipeline.core.io import (delete_from_storage, list_storage, read_from_storage, sha256_hex,
                              storage_location, write_to_storage)
from pipeline.core.layers import SHAPES_A_CHUNK, source_digest
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.measure.nll import NllPart, assemble_nll, nll_layout, nll_part, nll_parts
from pipeline.measure.sampling import sample_batch, sampling_network
from pipeline.measure.stats import FeatureGroups, FeatureMoments, LogitMoments, group_bounds
from pipeline.model.unet import build_model

FEATURE_CHUNK = 1000  # images per chunk of feature extraction
CHUNKS_FOLDER = "chunks"  # <storage>/chunks/<job name>/<chunk id>.npz


@dataclass(frozen=True)
class Workers:
    """Where a job runs: `num_workers` workers of `cpus_per_worker` CPUs (and one GPU each
    with `use_gpu`), from params.yaml section `section` (sample or evaluate)."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    section: str

    @classmethod
    def of(cls, config, section: str) -> "Workers":
        return cls(config.num_workers, config.cpus_per_worker, config.use_gpu, section)

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"


@dataclass(frozen=True)
class Chunk:
    """One unit of a job: `kind` (a key of CHUNK_KINDS) applied to `args`; `units` network
    evaluations (images x steps, image-terms, images), for the job's progress line."""

    id: str
    kind: str
    units: int
    args: Mapping[str, Any]


@dataclass
class ShardedJob:
    """Chunks and what their workers need. `name` is the job's folder in storage: a digest of
    everything its results depend on (`job_name`), so a rerun finds its finished chunks and a
    changed input starts afresh. `objects` (model weights, images, extractor weights) go to the
    workers through Ray's object store; `spec` (small) is what else they need."""

    name: str
    label: str  # "sample eps_simple-0": the job in progress lines
    unit: str  # what `Chunk.units` counts, for progress lines: "images", "evaluations"
    chunks: list[Chunk]
    workers: Workers
    spec: dict[str, Any]  # experiment (to_dict), image_shape, data_levels, extractor
    objects: dict[str, Any] = field(repr=False)  # models: {name: state dict}, images: {...}

    @property
    def total_units(self) -> int:
        return sum(c.units for c in self.chunks)


def code_digest() -> str:
    """Short hash of the source of every layer that shapes a chunk's result (this module's
    among them)."""
    return source_digest(SHAPES_A_CHUNK)


def job_name(exp: ExperimentConfig, stage: str, workers: Workers, *inputs: Any) -> str:
    """`<study>-<run>-<stage>-<digest>`: the digest covers `inputs` (file digests, configs),
    the code, the device kind and torch's version; not the number of workers."""
    blob = json.dumps([list(inputs), workers.device, torch.__version__, code_digest()],
                      sort_keys=True, default=str)
    return f"{exp.study.name}-{exp.key}-{stage}-{sha256_hex(blob, length=12)}"


# --------------------------------------------------------------------------------------------
# A worker's side: its context (models, data, feature network built once) and the chunk kinds
# --------------------------------------------------------------------------------------------


class ChunkContext:
    """What one worker holds for a job: the experiment, the models (built on first use from
    their weights), the images, the feature network, on `device` with `threads` CPU threads."""

    def __init__(self, spec: Mapping[str, Any], objects: Mapping[str, Any], device: str,
                 threads: int = 1):
        self.exp = ExperimentConfig.from_dict(spec["experiment"])
        self.spec, self.objects, self.device = spec, objects, device
        if torch.device(device).type == "cpu":
            torch.set_num_threads(max(1, threads))
        self._cache: dict[str, Any] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.spec["image_shape"])

    def diffusion(self):
        if "diffusion" not in self._cache:
            self._cache["diffusion"] = GaussianDiffusion.from_config(
                self.exp.diffusion, data_levels=self.spec["data_levels"])
        return self._cache["diffusion"]

    def model(self, name: str) -> torch.nn.Module:
        key = f"model:{name}"
        if key not in self._cache:
            model = build_model(self.exp, self.image_shape)
            model.load_state_dict(self.objects["models"][name])
            self._cache[key] = model.to(self.device).eval()
        return self._cache[key]

    def sampling_network(self, name: str) -> torch.nn.Module:
        """Model `name` at sample.precision (compiled with sample.compile)."""
        key = f"sampling:{name}"
        if key not in self._cache:
            self._cache[key] = sampling_network(self.model(name), self.exp.sample)
        return self._cache[key]

    def images(self, name: str) -> torch.Tensor:
        key = f"images:{name}"
        if key not in self._cache:  # a copy: the object store's arrays are read-only
            self._cache[key] = torch.from_numpy(np.array(self.objects["images"][name]))
        return self._cache[key]

    def feature_network(self):
        if "features" not in self._cache:
            # loads torch-fidelity (a second of start-up): only workers that extract features
            from pipeline.measure.extractors import FeatureNetwork

            self._cache["features"] = FeatureNetwork.from_bytes(
                self.spec["extractor"], self.objects.get("extractor_weights"), self.device)
        return self._cache["features"]


def feature_parts(features: np.ndarray, logits: np.ndarray, first: int, total: int,
                  groups: int, kid: Sequence[int], keep: bool) -> dict[str, np.ndarray]:
    """What a chunk of images first .. first + n - 1 (of a set of `total`) contributes to the
    set's `FeatureGroups`: the sums of each jackknife group it touches (`group_bounds(total,
    groups)`; none with `groups` 0), the features of its images listed in `kid` (set indices)
    and, with `keep`, every image's features and logits (float32, as the network gives them)."""
    n = len(features)
    bounds = group_bounds(total, groups) if groups else np.zeros(1, dtype=np.int64)
    out: dict[str, list] = {k: [] for k in ("group", "count", "feature_sum", "outer_sum",
                                            "prob_sum", "plogp_sum")}
    for g in range(len(bounds) - 1):
        lo, hi = max(bounds[g], first), min(bounds[g + 1], first + n)
        if lo >= hi:
            continue
        f = FeatureMoments.of(features[lo - first:hi - first])
        p = LogitMoments.of(logits[lo - first:hi - first])
        for key, value in (("group", g), ("count", f.count), ("feature_sum", f.feature_sum),
                           ("outer_sum", f.outer_sum), ("prob_sum", p.prob_sum),
                           ("plogp_sum", p.plogp_sum)):
            out[key].append(value)
    arrays = {k: np.asarray(v) for k, v in out.items()}
    kid = np.asarray([i for i in kid if first <= i < first + n], dtype=np.int64)
    arrays["kid_index"] = kid
    arrays["kid_features"] = np.asarray(features[kid - first], dtype=np.float32)
    if keep:
        arrays["features"], arrays["logits"] = features, logits
    return arrays


def merge_feature_parts(results: Iterable[Mapping[str, np.ndarray]], groups: int,
                        total: int) -> FeatureGroups:
    """The `FeatureGroups` of a set of `total` images from its chunks' `feature_parts`."""
    feature_sums: dict[int, FeatureMoments] = {}
    logit_sums: dict[int, LogitMoments] = {}
    kid_index, kid_features = [], []
    for r in results:
        for k, g in enumerate(r["group"].tolist()):
            f = FeatureMoments(int(r["count"][k]), r["feature_sum"][k], r["outer_sum"][k])
            p = LogitMoments(int(r["count"][k]), r["prob_sum"][k], float(r["plogp_sum"][k]))
            feature_sums[g] = feature_sums[g] + f if g in feature_sums else f
            logit_sums[g] = logit_sums[g] + p if g in logit_sums else p
        kid_index.append(r["kid_index"])
        kid_features.append(r["kid_features"])
    expected = len(group_bounds(total, groups)) - 1
    if sorted(feature_sums) != list(range(expected)):
        raise ValueError(f"chunks hold groups {sorted(feature_sums)}, expected 0..{expected - 1}")
    index = np.concatenate(kid_index)
    order = np.argsort(index, kind="stable")
    return FeatureGroups([feature_sums[g] for g in range(expected)],
                         [logit_sums[g] for g in range(expected)],
                         np.concatenate(kid_features)[order])


def per_image(results: Iterable[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    """The per-image arrays `key` of chunks (in image order) joined."""
    return np.concatenate([r[key] for r in results])


def _sample_kind(ctx: ChunkContext, *, model: str, first: int, count: int, seed: int,
                 progressive: int = 0, sampler: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, np.ndarray]:
    """Images first .. first + count - 1 of a run's samples (`sampling.sample_batch`), with the
    run's sampler or, given `sampler`, with those keys of its `sample` section replaced
    ({"sampler": "ddim", "steps": 10, "eta": 0.0})."""
    cfg = dataclasses.replace(ctx.exp.sample, **sampler) if sampler else ctx.exp.sample
    return sample_batch(ctx.sampling_network(model), ctx.diffusion(), cfg,
                        ctx.image_shape, first, count, seed=seed, device=ctx.device,
                        num_progressive=progressive)


def _features_kind(ctx: ChunkContext, *, images: str, first: int, count: int, total: int,
                   groups: int, kid: Sequence[int], keep: bool = False) -> dict[str, np.ndarray]:
    """The `feature_parts` of images first .. first + count - 1 of image set `images`."""
    features, logits = ctx.feature_network()(ctx.images(images)[first:first + count])
    return feature_parts(features, logits, first, total, groups, kid, keep)


def _sample_features_kind(ctx: ChunkContext, *, model: str, first: int, count: int, seed: int,
                          total: int, groups: int, kid: Sequence[int],
                          keep_images: bool = False,
                          sampler: Optional[Mapping[str, Any]] = None) -> dict[str, np.ndarray]:
    """Sample images first .. first + count - 1 of a set of `total` (with `sampler`, as
    `_sample_kind`) and return their `feature_parts` (and the images with `keep_images`):
    scores of samples not kept."""
    sampled = _sample_kind(ctx, model=model, first=first, count=count, seed=seed,
                           sampler=sampler)["images"]
    features, logits = ctx.feature_network()(sampled)
    out = feature_parts(features, logits, first, total, groups, kid, keep=False)
    if keep_images:
        out["images"] = sampled
    return out


def _nll_kind(ctx: ChunkContext, *, model: str, images: str, first: int, count: int,
              term_first: int, term_count: int, method: str, num_strata: int,
              terms_per_call: int, seed: int) -> dict[str, np.ndarray]:
    """Part of the bound of image set `images` (`metrics.nll_part`)."""
    part = NllPart(first, count, term_first, term_count)
    bpd = nll_part(ctx.model(model), ctx.diffusion(), ctx.images(images)[first:first + count],
                   part, method=method, num_strata=num_strata,
                   terms_per_call=terms_per_call, seed=seed, device=ctx.device)
    return {"bpd": bpd}


CHUNK_KINDS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "sample": _sample_kind,
    "features": _features_kind,
    "sample_features": _sample_features_kind,
    "nll": _nll_kind,
}


def run_chunk(ctx: ChunkContext, chunk: Chunk) -> bytes:
    """Compute `chunk` in this worker; its result as npz bytes."""
    with torch.inference_mode():
        arrays = CHUNK_KINDS[chunk.kind](ctx, **chunk.args)
    return encode(arrays)


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload)) as f:
        return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------------------------
# Finished chunks in Ray storage
# --------------------------------------------------------------------------------------------


class DamagedChunk(ValueError):
    """A finished chunk in storage whose bytes are not those written: its file name's digest
    does not match them, or they do not decode."""


class ChunkStore:
    """The finished chunks of job `name` in storage `storage` (a path or a URI): one npz file
    per chunk, `<storage>/chunks/<name>/<chunk id>.<digest>.npz` (digest: the first 16 hex
    digits of its bytes' SHA-256), each written whole (a rename locally, one PUT on S3), so a
    stage killed mid-write leaves no half chunk, and checked against its digest when read back:
    storage that garbles or truncates an object over days is caught, never decoded as data."""

    DIGEST_LENGTH = 16

    def __init__(self, storage: str | Path, name: str):
        self.folder = f"{storage_location(storage)}/{CHUNKS_FOLDER}/{name}"

    def _files(self) -> dict[str, list[str]]:
        """{chunk id: its file names in storage} (an id holds no dot; names of any other
        shape, a temporary or a file of another layout, are not chunks)."""
        files: dict[str, list[str]] = {}
        for name in list_storage(self.folder):
            parts = name.split(".")
            if len(parts) == 3 and parts[2] == "npz" and len(parts[1]) == self.DIGEST_LENGTH:
                files.setdefault(parts[0], []).append(name)
        return files

    def finished(self) -> set[str]:
        return set(self._files())

    def write(self, chunk_id: str, payload: bytes) -> None:
        digest = sha256_hex(payload, length=self.DIGEST_LENGTH)
        write_to_storage(f"{self.folder}/{chunk_id}.{digest}.npz", payload)

    def read(self, chunk_id: str) -> bytes:
        """The bytes of finished chunk `chunk_id`, checked against the digest in its name
        (`DamagedChunk` naming the file where they do not match)."""
        names = self._files().get(chunk_id, [])
        for name in names:
            payload = read_from_storage(f"{self.folder}/{name}")
            if sha256_hex(payload, length=self.DIGEST_LENGTH) == name.split(".")[1]:
                return payload
        raise DamagedChunk(f"{self.folder}/{names[0] if names else chunk_id + '.npz'}")

    def remove(self, chunk_id: str) -> None:
        """Delete every file of chunk `chunk_id` (a damaged one, before it is computed again)."""
        for name in self._files().get(chunk_id, []):
            delete_from_storage(f"{self.folder}/{name}")

    def mark_started(self, chunk_id: str, node: str = "local") -> None:
        """Note that a worker on `node` began `chunk_id` (a chunk begun twice was redone: its
        first worker was lost): `started/<chunk id>.<node>.<pid>.<time>`."""
        write_to_storage(f"{self.folder}/started/{chunk_id}.{node}.{os.getpid()}."
                         f"{time.time_ns()}", b"")

    def starts(self) -> dict[str, int]:
        """{chunk id: how many times a worker began it} (where the markers are visible: a
        storage every node reaches)."""
        counts: dict[str, int] = {}
        for name in list_storage(f"{self.folder}/started"):
            chunk_id = name.split(".", 1)[0]  # ids hold no dot; node addresses do
            counts[chunk_id] = counts.get(chunk_id, 0) + 1
        return counts

    def discard(self) -> None:
        """Delete the job's folder: its output is written, nothing needs the chunks."""
        delete_from_storage(self.folder)


@dataclass
class ChunkRun:
    """A job's results ({chunk id: arrays}) and how they were made."""

    results: dict[str, dict[str, np.ndarray]]
    computed: int  # chunks computed in this run
    reused: int  # chunks found finished in storage
    workers: int  # workers that ran (0: nothing to compute)
    wall_s: float  # of the whole job, start-up included
    units_per_s: float  # network evaluations (or images) computed per second of wall time
    worker_s: float = 0.0  # seconds the workers spent computing chunks, summed
    redone: int = 0  # chunks begun twice or more (a worker was lost)

    def of(self, chunks: Sequence[Chunk]) -> list[dict[str, np.ndarray]]:
        return [self.results[c.id] for c in chunks]


def run_here(job: ShardedJob, order: Optional[Sequence[int]] = None,
             threads: Optional[int] = None) -> ChunkRun:
    """Run `job` in this process, chunk by chunk in `order` (default: as listed): what a
    single worker computes, without Ray."""
    start = time.monotonic()
    ctx = ChunkContext(job.spec, job.objects, job.workers.device,
                       threads or max(1, int(job.workers.cpus_per_worker)))
    results, worker_s = {}, 0.0
    for index in (range(len(job.chunks)) if order is None else order):
        chunk = job.chunks[index]
        began = time.monotonic()
        results[chunk.id] = decode(run_chunk(ctx, chunk))
        worker_s += time.monotonic() - began
    wall = time.monotonic() - start
    return ChunkRun(results, computed=len(results), reused=0, workers=1, wall_s=wall,
                    units_per_s=job.total_units / wall if wall > 0 else float("nan"),
                    worker_s=worker_s)


def feature_chunks(images: str, total: int, groups: int, kid: Sequence[int],
                   keep: bool = False, prefix: str = "features") -> list[Chunk]:
    """Feature chunks of image set `images` (`total` images). With `groups` (jackknife groups,
    `group_bounds`), each chunk is a run of whole groups of at most FEATURE_CHUNK images (one
    group at least), so a group's sums come back whole; one group (a reference set's sums
    alone) in chunks of up to 10 x FEATURE_CHUNK; no groups (`keep`: per-image features) in
    chunks of FEATURE_CHUNK."""
    limit = FEATURE_CHUNK * (10 if groups == 1 else 1)
    if groups > 1:
        bounds = group_bounds(total, groups).tolist()
        edges = [0]
        for a, b in zip(bounds[:-1], bounds[1:]):  # group a .. b - 1 joins the chunk or starts one
            if b - edges[-1] > limit and a > edges[-1]:
                edges.append(a)
        edges.append(total)
    else:
        edges = [*range(0, total, limit), total]
    kid = [int(i) for i in kid]
    return [Chunk(f"{prefix}-{images}-{a:06d}", "features", b - a,
                  {"images": images, "first": a, "count": b - a, "total": total,
                   "groups": groups, "kid": [i for i in kid if a <= i < b], "keep": keep})
            for a, b in zip(edges[:-1], edges[1:])]


def nll_chunks(model: str, images: str, num_images: int, num_terms: int, method: str,
               num_strata: int, batch_size: int, seed: int, prefix: str = "nll") -> list[Chunk]:
    """The bound of the first `num_images` of image set `images` in parts (`nll_parts`)."""
    _, terms_per_call = nll_layout(num_images, batch_size)
    return [Chunk(f"{prefix}-{images}-{p.first:06d}-{p.term_first:05d}", "nll",
                  p.count * p.term_count,
                  {"model": model, "images": images, "first": p.first, "count": p.count,
                   "term_first": p.term_first, "term_count": p.term_count, "method": method,
                   "num_strata": num_strata, "terms_per_call": terms_per_call, "seed": seed})
            for p in nll_parts(num_images, num_terms, batch_size)]


def assemble_nll_chunks(chunks: Sequence[Chunk], results: Sequence[Mapping[str, np.ndarray]],
                        num_images: int) -> np.ndarray:
    """Each image's bound from `nll_chunks`' results."""
    parts = [NllPart(c.args["first"], c.args["count"], c.args["term_first"],
                     c.args["term_count"]) for c in chunks]
    return assemble_nll(parts, [r["bpd"] for r in results], num_images)
