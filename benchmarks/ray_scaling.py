"""Ray Train scaling: the same training run with 1 worker and with N workers (DDP, gloo on CPU).

The default study's experiment (`params.yaml`, `--experiment`) on the digits train split, fit
through `pipeline.cluster.ray_train.fit` exactly as the train stage does it, under a private local
Ray instance. Every case trains the same global batch (`train.batch_size`, split across the
workers) for `--steps` steps and gets the same CPUs in all (`--cpus`, split across the workers:
2 workers of 1 CPU on the 2-core machine). Reported per case:

- training images/s, from the training loop's own clock (`wall_s` of the final state: the
  steps, the gradient all-reduce and the checkpoints, without Ray's start-up);
- the wall time of the whole `fit` call, and its overhead (fit minus training: the Train
  controller, the worker group, the process group, the data load, the checkpoint upload);
- the speed-up of training images/s over 1 worker.

On one machine N workers share its cores, so the speed-up measures what DDP costs (an
all-reduce of the gradients every step, smaller per-worker matmuls), not what more machines
would give.

    python benchmarks/ray_scaling.py --steps 200 --workers 1,2 --cpus 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as common  # puts this checkout first on sys.path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="eps_simple",
                   help="params.yaml experiment (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    p.add_argument("--workers", default="1,2",
                   help="comma-separated worker counts (default: %(default)s)")
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1),
                   help="CPUs in all, split across the workers (default: this machine's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each case, alternating (default: 1)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    common.check_pipeline_is_this_checkout()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from pipeline.cluster import connection, ray_train
    from pipeline.data.datasets import prepare_dataset, prepared_path

    base, _ = common.load_experiment("digits", args.experiment)
    counts = [int(n) for n in args.workers.split(",") if n]
    for n in counts:
        if base.train.batch_size % n:
            raise SystemExit(f"error: train.batch_size ({base.train.batch_size}) is not "
                             f"divisible by {n} workers")
    info = common.machine()
    print(f"machine: {common.describe(info)}")
    print(f"digits ({base.name}): {args.steps} steps of global batch {base.train.batch_size}, "
          f"{args.cpus:g} CPUs split across the workers")

    work = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    results: dict[str, list[dict]] = {str(n): [] for n in counts}
    try:
        prepare_dataset(base.data, work / "data", base.data.seed)
        train_data = prepared_path(work / "data", base.data.dataset, "train")
        print(connection.connect(num_cpus=int(round(args.cpus))), flush=True)
        for r in range(args.rounds):
            for n in (counts if r % 2 == 0 else counts[::-1]):
                exp = dataclasses.replace(base, train=dataclasses.replace(
                    base.train, steps=args.steps, num_workers=n, cpus_per_worker=args.cpus / n,
                    log_every=max(1, args.steps // 4), checkpoint_every=args.steps))
                storage = work / f"ckpt-{n}-{r}"
                start = time.monotonic()
                outcome = ray_train.fit(exp, train_data, storage)
                fit_s = time.monotonic() - start
                shutil.rmtree(storage, ignore_errors=True)
                train_s = float(outcome.state["wall_s"])
                run = {"workers": n, "cpus_per_worker": args.cpus / n, "fit_s": fit_s,
                       "train_s": train_s, "overhead_s": fit_s - train_s,
                       "images_per_s": args.steps * base.train.batch_size / train_s,
                       "status": outcome.status}
                results[str(n)].append(run)
                print(f"  round {r + 1}/{args.rounds} {n} worker(s): {run['images_per_s']:.0f} "
                      f"images/s, fit {fit_s:.1f} s (overhead {run['overhead_s']:.1f} s)",
                      flush=True)
    finally:
        connection.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    import statistics

    one = statistics.median(r["images_per_s"] for r in results[str(counts[0])])
    rows = []
    for n in counts:
        runs = results[str(n)]
        ips = statistics.median(r["images_per_s"] for r in runs)
        rows.append({"workers": n, "CPUs/worker": args.cpus / n, "images/s": ips,
                     "speed-up": ips / one,
                     "fit s": statistics.median(r["fit_s"] for r in runs),
                     "overhead s": statistics.median(r["overhead_s"] for r in runs)})
    print()
    print(common.table(rows, ["workers", "CPUs/worker", "images/s", "speed-up", "fit s",
                              "overhead s"]))
    common.write_json(args.json, "ray_scaling", args, info, {"runs": results, "table": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
