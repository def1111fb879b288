"""Work in chunks (pipeline/measure/chunks.py, pipeline/diffusion/seeding.py,
ray_data.run_chunks): a seed per
image and per bound term, so that samples and per-image bounds are the same bytes whichever
worker made which chunk, in whatever order; sums of chunks that merge into the whole; finished
chunks kept in storage; one progress line; where the work cannot run, a refusal."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re

import numpy as np
import pytest
import torch

from helpers import PROJECT
from pipeline.measure.chunks import (Chunk, ChunkStore, ShardedJob, Workers, assemble_nll_chunks,
                                       feature_chunks, feature_parts, merge_feature_parts,
                                       nll_chunks, run_here)
from pipeline.core.params import load_params
from pipeline.diffusion.seeding import item_generators, item_seed, stream_offset
from pipeline.measure.stats import FeatureGroups, FeatureMoments, frechet_distance, inception_score


def tiny_experiment(**sample):
    exp = load_params(PROJECT / "params.yaml").experiment("eps_simple")
    return dataclasses.replace(
        exp, diffusion=dataclasses.replace(exp.diffusion, num_timesteps=12),
        model=dataclasses.replace(exp.model, ch=8, ch_mult=(1, 2)),
        sample=dataclasses.replace(exp.sample, **{"num_samples": 30, "batch_size": 10,
                                                  "cpus_per_worker": 1.0, **sample}))


def random_weights(exp):
    """A U-Net whose every weight is nonzero (the DDPM U-Net starts with a zero output)."""
    from pipeline.model.unet import build_model

    torch.manual_seed(0)
    model = build_model(exp, (1, 8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape))
    return model.state_dict()


def mixed_job(exp, images: np.ndarray, calls_per_part: int = 6) -> ShardedJob:
    """A job of 3 sampling chunks and the exact bound of 9 images (12 terms) in parts: 4
    images and 1 term per network call (nll_batch_size 4), `calls_per_part` calls a part."""
    from pipeline.jobs.sample_job import sample_job
    from pipeline.measure.nll import nll_parts

    job = sample_job(exp, None, {"image_shape": [1, 8, 8], "data_levels": 17},
                     weights=random_weights(exp))
    args = nll_chunks("ema", "test", 9, 12, "exact", 5, batch_size=4, seed=3)[0].args
    job.chunks = [*job.chunks, *(
        Chunk(f"nll-{p.first}-{p.term_first}", "nll", p.count * p.term_count,
              {**args, "first": p.first, "count": p.count, "term_first": p.term_first,
               "term_count": p.term_count})
        for p in nll_parts(9, 12, 4, calls_per_part=calls_per_part))]
    job.objects["images"]["test"] = images
    return job


@pytest.fixture(scope="module")
def digits_test():
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255.0 / 16)).astype(np.uint8)[:, None]
    return images[:9]


def samples_of(job, run):
    return np.concatenate([run.results[c.id]["images"] for c in job.chunks
                           if c.kind == "sample"])


def bounds_of(job, run):
    chunks = [c for c in job.chunks if c.kind == "nll"]
    return assemble_nll_chunks(chunks, [run.results[c.id] for c in chunks], 9)


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def test_each_item_of_a_stream_has_its_own_seed_and_streams_start_apart():
    seeds = [item_seed("sample", 1, i) for i in range(50_000)]
    assert len(set(seeds)) == 50_000 and all(0 <= s < 2 ** 32 for s in seeds)
    assert seeds[7] == (stream_offset("sample", 1) + 7) % 2 ** 32
    offsets = {stream_offset(p, s) for p in ("sample", "nll") for s in range(4)}
    assert len(offsets) == 8
    with pytest.raises(ValueError, match=">= 0"):
        item_seed("sample", 1, -1)


def test_an_images_noise_does_not_depend_on_the_other_images_of_its_batch():
    """Row r of a StackedGenerator's draws is generator r's: image 5 draws the same noise at
    every step alone, first in a batch, or last in another."""
    alone = item_generators("sample", 0, [5])
    first = item_generators("sample", 0, [5, 6, 7])
    last = item_generators("sample", 0, [2, 3, 5])
    for _ in range(3):  # x_T, then two steps
        a, b, c = (g.draw(torch.randn, (len(g), 1, 8, 8), torch.float32)
                   for g in (alone, first, last))
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[2])
    assert not torch.equal(b[0], b[1])
    with pytest.raises(ValueError, match="3 generators cannot draw a batch of 2"):
        first.draw(torch.randn, (2, 4), torch.float32)


# --------------------------------------------------------------------------------------------
# The same bytes in any order, from any worker
# --------------------------------------------------------------------------------------------


def test_samples_and_bounds_are_the_same_bytes_in_any_chunk_order(digits_test):
    """One worker in order, the chunks shuffled, and two 'workers' each with half of the
    chunks (fresh contexts): byte-identical samples and per-image bounds."""
    exp = tiny_experiment()
    job = mixed_job(exp, digits_test)
    assert [c.kind for c in job.chunks].count("sample") == 3
    assert [c.kind for c in job.chunks].count("nll") == 6  # 3 image blocks x 2 term blocks
    straight = run_here(job)
    order = np.random.default_rng(0).permutation(len(job.chunks)).tolist()
    shuffled = run_here(job, order=order)
    halves = [run_here(job, order=order[:4]), run_here(job, order=order[4:])]
    split = dataclasses.replace(straight, results={**halves[0].results, **halves[1].results})
    for other in (shuffled, split):
        assert samples_of(job, other).tobytes() == samples_of(job, straight).tobytes()
        assert bounds_of(job, other).tobytes() == bounds_of(job, straight).tobytes()
    assert len(np.unique(samples_of(job, straight).reshape(30, -1), axis=0)) == 30


def test_the_bound_in_other_parts_sums_the_same_terms(digits_test):
    """Parts of 1 call or of all 4 calls' terms: the same terms of the same network calls, so
    the per-image bounds agree to float64 rounding (the grouping of the sum)."""
    exp = tiny_experiment()
    fine = bounds_of(*_run(mixed_job(exp, digits_test, calls_per_part=1)))
    coarse = bounds_of(*_run(mixed_job(exp, digits_test, calls_per_part=4)))
    np.testing.assert_allclose(fine, coarse, rtol=1e-13)
    assert fine.std() > 0


def _run(job):
    return job, run_here(job)


def test_the_bound_in_parts_is_the_diffusions_bound_with_the_same_draws(digits_test):
    """nll.nll_bpd (every part, here) against GaussianDiffusion.nll_bpd fed the same
    per-term generators: the same per-image bound."""
    from pipeline.data.datasets import to_model_range
    from pipeline.diffusion.gaussian import GaussianDiffusion
    from pipeline.measure.nll import nll_bpd
    from pipeline.model.unet import build_model

    exp = tiny_experiment()
    model = build_model(exp, (1, 8, 8)).eval()
    model.load_state_dict(random_weights(exp))
    diffusion = GaussianDiffusion.from_config(exp.diffusion, data_levels=17)
    ours = nll_bpd(model, diffusion, digits_test, batch_size=12, seed=3)["per_image"]
    x0 = to_model_range(torch.from_numpy(digits_test), 17)

    def generators(t):
        return item_generators("nll", 3, [i * 12 + (11 - t) for i in range(9)])

    with torch.inference_mode():
        direct = diffusion.nll_bpd(model, x0, generator=generators).numpy()
    np.testing.assert_allclose(ours, direct, rtol=1e-5)


def test_feature_sums_of_chunks_merge_into_the_whole_sets_groups():
    """feature_parts of chunks cut anywhere (across jackknife groups) merge into the groups'
    sums of the whole set, and KID's features come back in image order."""
    rng = np.random.default_rng(1)
    features = rng.standard_normal((230, 6)).astype(np.float32)
    logits = (rng.standard_normal((230, 4)) * 2).astype(np.float32)
    whole = FeatureGroups.of(features, logits, groups=20)
    cuts = [0, 33, 34, 150, 230]
    parts = [feature_parts(features[a:b], logits[a:b], a, 230, 20, range(100), keep=False)
             for a, b in zip(cuts[:-1], cuts[1:])]
    merged = merge_feature_parts(parts[::-1], groups=20, total=230)
    assert [m.count for m in merged.features] == [m.count for m in whole.features]
    for ours, theirs in zip(merged.features, whole.features):
        np.testing.assert_allclose(ours.outer_sum, theirs.outer_sum, rtol=1e-12)
    np.testing.assert_array_equal(merged.kid_features, features[:100])
    reference = FeatureMoments.of(rng.standard_normal((300, 6)))
    assert frechet_distance(FeatureMoments.of(features), reference) == pytest.approx(
        frechet_distance(sum(merged.features[1:], merged.features[0]), reference), rel=1e-10)
    assert inception_score(merged.logits) == pytest.approx(inception_score(whole.logits))


def test_feature_chunks_hold_whole_jackknife_groups():
    chunks = feature_chunks("samples", 50_000, groups=50, kid=range(2000))
    assert len(chunks) == 50 and {c.args["count"] for c in chunks} == {1000}
    assert sum(len(c.args["kid"]) for c in chunks) == 2000
    small = feature_chunks("samples", 400, groups=50, kid=range(400))
    assert [c.args["count"] for c in small] == [400]
    reference = feature_chunks("train", 50_000, groups=1, kid=[])
    assert [c.args["count"] for c in reference] == [10_000] * 5


# --------------------------------------------------------------------------------------------
# Storage, progress, refusals
# --------------------------------------------------------------------------------------------


def test_finished_chunks_are_kept_whole_in_storage_and_discarded_together(tmp_path):
    store = ChunkStore(tmp_path / "storage", "job-1")
    assert store.finished() == set() and store.starts() == {}
    store.write("sample-000000", b"abc")
    store.mark_started("sample-000000")
    store.mark_started("sample-000000")
    store.mark_started("sample-000010")
    assert store.finished() == {"sample-000000"} and store.read("sample-000000") == b"abc"
    assert store.starts() == {"sample-000000": 2, "sample-000010": 1}
    assert not [p for p in (tmp_path / "storage").rglob("*.tmp*")]  # no temporary left
    store.discard()
    assert store.finished() == set() and not (tmp_path / "storage" / "chunks" / "job-1").exists()


@pytest.mark.parametrize("damage", ["garbage", "flip", "truncate"])
def test_a_chunk_damaged_in_storage_is_caught_by_its_digest_and_removed(tmp_path, damage):
    """A chunk's file is named by the SHA-256 of its bytes: garbage of its length, one byte
    flipped, or a cut-short file all raise DamagedChunk naming the file (never decoded as
    data); `remove` deletes it, so that it is computed again, and leaves the other chunks."""
    import hashlib

    from pipeline.measure.chunks import DamagedChunk, encode

    store = ChunkStore(tmp_path / "storage", "job-1")
    payload = encode({"images": np.arange(600, dtype=np.uint8).reshape(6, 10, 10)})
    store.write("sample-000000", payload)
    store.write("sample-000100", payload)
    (path,) = (tmp_path / "storage" / "chunks" / "job-1").glob("sample-000000.*.npz")
    assert path.name.split(".")[1] == hashlib.sha256(payload).hexdigest()[:16]
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data = bytearray(np.random.default_rng(1).bytes(len(data)))
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 10]
    path.write_bytes(bytes(data))
    assert store.finished() == {"sample-000000", "sample-000100"}
    with pytest.raises(DamagedChunk, match=re.escape(str(path))):
        store.read("sample-000000")
    assert store.read("sample-000100") == payload
    store.remove("sample-000000")
    assert not path.exists() and store.finished() == {"sample-000100"}
    store.write("sample-000000", payload)  # computed again
    assert store.read("sample-000000") == payload


def test_one_progress_line_counts_images_chunks_rate_and_eta():
    from pipeline.core.progress import ChunkProgress

    now = [100.0]
    out = io.StringIO()
    progress = ChunkProgress("sample e-0", 400, 4, "images", reused_units=100, reused_chunks=1,
                             workers=2, stream=out, every_s=5.0, clock=lambda: now[0])
    now[0] = 110.0
    line = progress.done(100)
    assert line == ("sample e-0: 200/400 images (50%), 2/4 chunks (1 from storage), "
                    "10 images/s, 2 workers, elapsed 10s, ETA 20s")
    now[0] = 111.0
    assert progress.done(100) is None  # within 5 s of the last line
    assert progress.idle() is None
    now[0] = 180.0
    assert progress.idle() is not None  # a heartbeat after 60 s of silence
    now[0] = 190.0
    assert progress.done(100).startswith("sample e-0: 400/400 images (100%), 4/4 chunks")
    assert out.getvalue().count("\n") == 3


def test_work_no_node_can_hold_is_refused_at_once(monkeypatch):
    """A GPU per worker where no node has one, or more CPUs per worker than any node: one line
    naming the key, instead of a request Ray would keep waiting on."""
    import ray

    from pipeline.cluster.ray_data import WorkersError, check_workers

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 4.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    check_workers(Workers(2, 4.0, False, "sample"))
    with pytest.raises(WorkersError, match=r"sample.use_gpu is true but no node .*2 nodes, "
                                           r"6 CPUs, 0 GPUs.* set sample.use_gpu: false"):
        check_workers(Workers(1, 1.0, True, "sample"))
    with pytest.raises(WorkersError, match=r"evaluate.cpus_per_worker is 8 but the largest "
                                           r"node .* has 4"):
        check_workers(Workers(1, 8.0, False, "evaluate"))


def test_use_gpu_without_a_gpu_stops_a_stage_at_once(tmp_path):
    """sample.use_gpu: true on a machine without a GPU (no cluster): the stage stops in
    seconds with one line, before Ray starts, and writes nothing."""
    import json
    import subprocess
    import sys
    import time

    import yaml

    from helpers import env_for, tiny

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    tiny(params, experiments=("eps_simple",))
    params["sample"]["use_gpu"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    exp = load_params(tmp_path / "params.yaml").experiment("eps_simple")
    model_dir = tmp_path / "models" / exp.key
    model_dir.mkdir(parents=True)
    torch.save(random_weights(exp), model_dir / "ema.pt")
    (model_dir / "state.json").write_text(json.dumps({"status": "ok", "step": 1,
                                                      "image_shape": [1, 8, 8],
                                                      "data_levels": 17}))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stages.sample", "-e", "eps_simple",
                           "--params", "params.yaml"], cwd=tmp_path, env=env_for(PROJECT),
                          capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 20
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: sample.use_gpu is true but this machine has no GPU")
    assert "started a local Ray instance" not in proc.stdout
    assert not (tmp_path / "samples").exists()


@pytest.mark.slow
def test_two_ray_workers_give_the_bytes_of_one_worker_here_and_resume_from_storage(
        digits_test, tmp_path):
    """The same job on a local Ray instance with 2 workers of 1 CPU: the samples and bounds of
    one worker in this process, byte for byte; run again, every chunk comes from storage."""
    from pipeline.cluster import connection, ray_data

    exp = tiny_experiment(num_workers=2)
    job = mixed_job(exp, digits_test)
    here = run_here(job)
    connection.start_local_cluster(num_cpus=2, log_to_driver=False)
    try:
        first = ray_data.run_chunks(job, tmp_path / "storage")
        again = ray_data.run_chunks(job, tmp_path / "storage")
    finally:
        connection.shutdown()
    assert first.workers == 2 and first.computed == len(job.chunks) and first.reused == 0
    assert first.redone == 0
    assert again.computed == 0 and again.reused == len(job.chunks)
    for run in (first, again):
        assert samples_of(job, run).tobytes() == samples_of(job, here).tobytes()
        assert bounds_of(job, run).tobytes() == bounds_of(job, here).tobytes()
    assert os.listdir(tmp_path / "storage" / "chunks") == [job.name]
    assert math.isfinite(first.units_per_s) and first.worker_s > 0
