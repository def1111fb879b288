"""Training data through Ray's object store at CIFAR10 size, against reading it from disk.

A Ray Train worker gets its prepared split from the object store, where the train stage's
driver put it (`pipeline.cluster.ray_train.fit`), so that no worker reads the driver's disk. This
measures that hand-over for a CIFAR10-sized split (50,000 x 3 x 32 x 32 uint8, 147 MiB; random
pixels, saved as the prepare stage saves it) on a private local Ray instance:

- `put`: the driver's `np.load` of the .npz plus `ray.put` (once per training run);
- `get in a worker`: a Ray task on another process `ray.get`s the split and touches every byte
  (what each worker does once), against
- `load in a worker`: the same task `np.load`ing the .npz from disk (the peer: what a worker
  did before, and can only do where it shares the driver's disk).

    python benchmarks/object_store.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common as common  # puts this checkout first on sys.path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50_000, help="images (default: 50000)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default: 3)")
    common.add_common_args(p)
    args = p.parse_args(argv)
    common.set_threads(args.threads)

    import numpy as np
    import ray

    from pipeline.cluster.connection import shutdown, start_local_cluster
    from pipeline.core.io import save_npz
    from pipeline.data.datasets import Prepared, load_prepared

    info = common.machine()
    print(common.describe(info))
    folder = Path(tempfile.mkdtemp(prefix="ddpm-objstore-"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, 3, 32, 32), dtype=np.uint8)
    path = folder / "train.npz"
    save_npz(path, images=images, labels=np.zeros(args.images, np.int64),
             levels=np.asarray(256))
    start_local_cluster(num_cpus=2, log_to_driver=False)

    @ray.remote
    def from_store(ref_holder):
        data = ray.get(ref_holder[0])
        return int(data.images.sum(dtype=np.uint64) % 1000)

    @ray.remote
    def from_disk(file):
        data = load_prepared(file)
        return int(data.images.sum(dtype=np.uint64) % 1000)

    try:
        ray.get(from_disk.remote(str(path)))  # warm-up: a worker process and its imports
        results = {"put": [], "get in a worker": [], "load in a worker": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            ref = ray.put(load_prepared(path))
            results["put"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checksum = ray.get(from_store.remote([ref]))
            results["get in a worker"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert ray.get(from_disk.remote(str(path))) == checksum
            results["load in a worker"].append(time.perf_counter() - start)
            del ref
        assert isinstance(load_prepared(path), Prepared)
    finally:
        shutdown()
        path.unlink()
        folder.rmdir()
    size_mib = images.nbytes / 2**20
    rows = [{"step": name, "median s": f"{statistics.median(times):.3f}",
             "min s": f"{min(times):.3f}", "MiB/s": f"{size_mib / statistics.median(times):.0f}"}
            for name, times in results.items()]
    print(f"\n{args.images} images, {size_mib:.0f} MiB, {args.rounds} rounds")
    print(common.table(rows, ["step", "median s", "min s", "MiB/s"]))
    ratio = statistics.median(results["get in a worker"]) / \
        statistics.median(results["load in a worker"])
    print(f"\nworker: get from the object store / load from disk = {ratio:.2f}")
    common.write_json(args.json, "object_store", args, info,
                      {"seconds": results, "size_mib": size_mib, "get_over_load": ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
