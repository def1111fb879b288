"""Sampling and the NLL bound on Ray workers (`pipeline.cluster.ray_data.run_chunks`, what the
sample and evaluate stages run) against the same work in one loop in this process, with 1 and 2
workers on this machine's CPUs, in alternating rounds of one run.

Cases, each a whole job (fresh weights of the configured U-Net; throughput does not depend on
them):
- `one loop`: the peer: `samplers.sample` over all images in batches of sample.batch_size from
  one generator (how sampling ran before it was sharded), or `nll.nll_bpd`'s parts one
  after another, in this process;
- `chunks here`: the job's chunks run in this process (`sharding.run_here`): per-image seeds,
  results encoded as the workers send them;
- `Ray, N workers`: the job on a local Ray instance (started once), N workers of 2 / N CPUs,
  chunks written to a temporary storage; a fresh actor pool per job, as every stage starts.

Figures: seconds per job, images (or bound terms) per second, the ratio of each case to the
peer (paired by round), the 2-worker speed-up over 1 worker, the workers' compute share of a
Ray job's wall time (the rest: the driver, the actors' start in fresh processes, transfers), and
the chunk overhead (the chunks here over the peer, in the same process: the seed per image and
the encoding of results). `--batch-sizes` also samples the
first images at other batch sizes and counts the pixels that differ from the configured batch
(the kernels may change the floats with the batch).

    python benchmarks/sharded_throughput.py --rounds 2 --json results/bench/sharded.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile

import numpy as np
import torch

import _common as common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=None,
                   help="images per sampling job (default: sample.num_samples)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sample.batch_size of the jobs (default: params.yaml's)")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion steps T (default: params.yaml's)")
    p.add_argument("--nll-images", type=int, default=None,
                   help="test and train images of the bound (default: evaluate.nll_num_images)")
    p.add_argument("--workers", default="1,2", help="worker counts to run (default: %(default)s)")
    p.add_argument("--batch-sizes", default="",
                   help="other batch sizes to compare the first batch's pixels with (e.g. 100,50)")
    common.add_common_args(p)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.check_pipeline_is_this_checkout()

    from pipeline.cluster import connection, ray_data
    from pipeline.measure.chunks import ShardedJob, Workers, nll_chunks, run_here
    from pipeline.core.params import load_params
    from pipeline.diffusion.gaussian import GaussianDiffusion
    from pipeline.diffusion.samplers import sample
    from pipeline.jobs.evaluate_job import untrained_model
    from pipeline.jobs.sample_job import sample_job
    from pipeline.measure.sampling import sampling_network

    params = load_params(common.REPO_ROOT / "params.yaml")
    exp = params.experiment("eps_simple")
    diffusion_cfg = dataclasses.replace(exp.diffusion, num_timesteps=args.steps) \
        if args.steps else exp.diffusion
    sample_cfg = dataclasses.replace(exp.sample, num_samples=args.num_samples or
                                     exp.sample.num_samples,
                                     batch_size=args.batch_size or exp.sample.batch_size)
    exp = dataclasses.replace(exp, diffusion=diffusion_cfg, sample=sample_cfg)
    shape, levels = (1, 8, 8), 17
    model = untrained_model(exp, shape)
    diffusion = GaussianDiffusion.from_config(exp.diffusion, data_levels=levels)
    info = {"image_shape": list(shape), "data_levels": levels}
    counts = [int(n) for n in args.workers.split(",") if n]
    cpus = 2.0

    from sklearn.datasets import load_digits

    digits = np.rint(load_digits().images * (255.0 / 16)).astype(np.uint8)[:, None]
    n_nll = args.nll_images or exp.evaluate.nll_num_images
    terms = diffusion.num_bound_terms(exp.evaluate.nll, exp.evaluate.nll_strata)

    def jobs(workers: int) -> dict[str, ShardedJob]:
        w = Workers(workers, cpus / workers, False, "sample")
        sampling = sample_job(dataclasses.replace(exp, sample=dataclasses.replace(
            exp.sample, num_workers=workers, cpus_per_worker=cpus / workers)), None, info,
            weights=model.state_dict())
        chunks = [c for split in ("test", "train") for c in nll_chunks(
            "ema", split, n_nll, terms, exp.evaluate.nll, exp.evaluate.nll_strata,
            exp.evaluate.nll_batch_size, seed=2, prefix=f"nll-{split}")]
        bound = ShardedJob(name=f"bench-nll-{workers}", label="nll", unit="evaluations",
                           chunks=chunks, workers=dataclasses.replace(w, section="evaluate"),
                           spec=sampling.spec,
                           objects={"models": {"ema": model.state_dict()},
                                    "images": {"test": digits[:n_nll],
                                               "train": digits[n_nll:2 * n_nll]}})
        return {"sampling": sampling, "nll": bound}

    def one_loop_sampling():
        net = sampling_network(model, exp.sample)
        generator = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            for first in range(0, exp.sample.num_samples, exp.sample.batch_size):
                n = min(exp.sample.batch_size, exp.sample.num_samples - first)
                sample(diffusion, net, (n, *shape), generator, sampler=exp.sample.sampler)

    def one_loop_nll():
        from pipeline.measure.nll import nll_bpd

        for images in (digits[:n_nll], digits[n_nll:2 * n_nll]):
            nll_bpd(model, diffusion, images, method=exp.evaluate.nll,
                    num_strata=exp.evaluate.nll_strata,
                    batch_size=exp.evaluate.nll_batch_size, seed=2)

    info_machine = common.machine()
    print(f"machine: {common.describe(info_machine)}", flush=True)
    torch.set_num_threads(int(cpus))
    connection.start_local_cluster(num_cpus=int(cpus), log_to_driver=False)
    runs: dict[str, list] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-chunks-") as storage:
            def ray_case(work: str, workers: int):
                def run():
                    job = jobs(workers)[work]
                    result = ray_data.run_chunks(job, f"{storage}/{work}-{workers}",
                                                    stream=open("/dev/null", "w"))
                    from pipeline.measure.chunks import ChunkStore

                    ChunkStore(f"{storage}/{work}-{workers}", job.name).discard()
                    runs.setdefault(f"{work} Ray, {workers} worker"
                                    f"{'s' if workers > 1 else ''}", []).append(result)
                return run

            cases = {"sampling one loop": one_loop_sampling,
                     "sampling chunks here": lambda: run_here(jobs(1)["sampling"]),
                     **{f"sampling Ray, {n} worker{'s' if n > 1 else ''}":
                        ray_case("sampling", n) for n in counts},
                     "nll one loop": one_loop_nll,
                     "nll chunks here": lambda: run_here(jobs(1)["nll"]),
                     **{f"nll Ray, {n} worker{'s' if n > 1 else ''}": ray_case("nll", n)
                        for n in counts}}
            seconds = common.alternate(cases, rounds=args.rounds, warmup=0)
    finally:
        connection.shutdown()

    units = {"sampling": exp.sample.num_samples, "nll": 2 * n_nll * terms}
    rows, results = [], {"cases": {}, "settings": {
        "num_samples": exp.sample.num_samples, "batch_size": exp.sample.batch_size,
        "num_timesteps": exp.diffusion.num_timesteps, "nll_images": n_nll,
        "nll_batch_size": exp.evaluate.nll_batch_size, "cpus": cpus}}
    for name, secs in seconds.items():
        work = name.split(" ", 1)[0]
        peer = seconds[f"{work} one loop"]
        entry = {"seconds": secs, "median_s": statistics.median(secs),
                 "per_s": units[work] / statistics.median(secs),
                 "over_peer": statistics.median(s / q for s, q in zip(secs, peer))}
        if name.endswith("chunks here"):  # the chunks' own cost: seeds per image, encoding
            entry["chunk_overhead"] = entry["over_peer"] - 1
        if name in runs:
            made = runs[name]
            compute = [r.worker_s / r.workers for r in made]
            entry["worker_share"] = statistics.median(c / s for c, s in zip(compute, secs))
            entry["workers"] = made[0].workers
            entry["chunks"] = len(made[0].results)
        results["cases"][name] = entry
        rows.append({"case": name, "median s": entry["median_s"],
                     "per s": entry["per_s"], "/ one loop": entry["over_peer"],
                     "workers' share": entry.get("worker_share"),
                     "chunk overhead": entry.get("chunk_overhead")})
    for work in ("sampling", "nll"):
        one, two = f"{work} Ray, 1 worker", f"{work} Ray, 2 workers"
        if one in seconds and two in seconds:
            results[f"{work}_speedup_2_over_1"] = statistics.median(
                a / b for a, b in zip(seconds[one], seconds[two]))
    print()
    print(f"sampling: {exp.sample.num_samples} images, batch {exp.sample.batch_size}, T = "
          f"{exp.diffusion.num_timesteps}; bound: 2 x {n_nll} images x {terms} terms, "
          f"{exp.evaluate.nll_batch_size} pairs per call; {cpus:g} CPUs shared by the workers")
    print(common.table(rows, ["case", "median s", "per s", "/ one loop", "workers' share",
                              "chunk overhead"]))
    for work in ("sampling", "nll"):
        if f"{work}_speedup_2_over_1" in results:
            print(f"{work}: 2 workers / 1 worker speed-up {results[f'{work}_speedup_2_over_1']:.3f}")

    if args.batch_sizes:
        from pipeline.measure.sampling import sample_batch

        net = sampling_network(model, exp.sample)
        first = min(exp.sample.batch_size, exp.sample.num_samples)
        with torch.inference_mode():
            base = sample_batch(net, diffusion, exp.sample, shape, 0, first, seed=1)["images"]
            differ = {}
            for size in (int(b) for b in args.batch_sizes.split(",") if b):
                other = np.concatenate([sample_batch(net, diffusion, exp.sample, shape, a,
                                                     min(size, first - a), seed=1)["images"]
                                        for a in range(0, first, size)])
                differ[size] = int((other != base).sum())
                print(f"images 0..{first - 1} sampled in batches of {size} against one batch of "
                      f"{first}: {differ[size]} of {base.size} pixels differ")
        results["pixels_differing_by_batch_size"] = differ
    common.write_json(args.json, "sharded_throughput", args, info_machine, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
