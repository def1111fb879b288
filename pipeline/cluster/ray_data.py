"""A job's chunks on Ray Data's workers (`run_chunks`): sampling, the NLL bound and features,
one actor per worker holding the models, each finished chunk kept in storage by the driver.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cluster.connection import connect
from pipeline.core.errors import UserError
from pipeline.core.progress import ChunkProgress
from pipeline.measure.chunks import (ChunkContext, ChunkRun, ChunkStore, DamagedChunk, decode,
                                     run_chunk)

# --------------------------------------------------------------------------------------------
# Inference in chunks: sampling, the NLL bound and features on Ray Data's workers
# --------------------------------------------------------------------------------------------


class WorkersError(UserError, RuntimeError):
    """A job's workers cannot run as params.yaml asks (no GPU, no node with enough CPUs), or a
    worker failed; the message says which section's keys to change."""


def check_workers(workers) -> None:
    """Refuse at once what no node of the cluster can hold (Ray would wait for it forever): a
    GPU per worker where no node has one, more CPUs per worker than the largest node has."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    where = f"the Ray cluster ({len(nodes)} node{'s' if len(nodes) != 1 else ''}, " \
            f"{sum(n.get('CPU', 0.0) for n in nodes):.0f} CPUs, " \
            f"{sum(n.get('GPU', 0.0) for n in nodes):.0f} GPUs)"
    section = workers.section
    if workers.use_gpu and gpus < 1:
        raise WorkersError(f"{section}.use_gpu is true but no node of {where} has a GPU, so the "
                           f"work would wait forever and never fall back to a CPU; start GPU "
                           f"nodes, or set {section}.use_gpu: false to run on CPUs")
    if workers.cpus_per_worker > cpus:
        raise WorkersError(f"{section}.cpus_per_worker is {workers.cpus_per_worker:g} but the "
                           f"largest node of {where} has {cpus:g}; lower it (a fraction shares "
                           f"a CPU)")


class _ChunkWorker:
    """A Ray Data actor of one job: builds its `ChunkContext` once (the models, data and feature
    network it gets through the object store), then computes one chunk per call and returns its
    result to the driver, which keeps it in storage."""

    def __init__(self, spec, chunks, objects, workers, store):
        import ray

        if workers.use_gpu and not torch.cuda.is_available():
            raise WorkersError(f"{workers.section}.use_gpu is true but torch on node "
                               f"{ray.util.get_node_ip_address()} sees no CUDA device (torch "
                               f"{torch.__version__}, CUDA {torch.version.cuda}); install a "
                               f"CUDA build of torch there, or set {workers.section}.use_gpu: "
                               "false")
        self.ctx = ChunkContext(spec, ray.get(objects[0]), workers.device,
                                max(1, int(workers.cpus_per_worker)))
        self.chunks, self.store = chunks, store
        self.node = ray.util.get_node_ip_address()

    def __call__(self, batch):
        index = int(batch["chunk"][0])
        chunk = self.chunks[index]
        self.store.mark_started(chunk.id, self.node)
        start = time.monotonic()
        payload = run_chunk(self.ctx, chunk)
        return {"chunk": np.array([index]), "payload": np.array([payload], dtype=object),
                "wall_s": np.array([time.monotonic() - start]), "node": np.array([self.node])}


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars and per-dataset log lines off: the job prints one line."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "disabled"


def run_chunks(job, storage: str | Path, stream=None, heartbeat_s: float = 60.0,
               on_progress=None):
    """Run `job` (a `pipeline.measure.chunks.ShardedJob`) on Ray workers and return its
    `ChunkRun`.

    Chunks already finished in `storage` (a path, or a URI every node reaches) are read back,
    not recomputed; the rest go through Ray Data, `map_batches` with a callable class on an
    actor pool of min(num_workers, chunks) workers of `cpus_per_worker` CPUs (and a GPU each
    with `use_gpu`), one chunk per call. Each result is written to storage as it comes back,
    so a stage killed mid-way, or a lost worker node, costs only the chunks in flight (Ray
    Data restarts a lost actor and retries its chunk). One progress line for the whole job;
    `on_progress(done, per_s)`, if given, is called in the driver as each chunk comes back,
    with the job's units done (those found in storage included) and this run's rate (e.g.
    `pipeline.core.tracking.Tracker.progress`, which logs them to the stage's MLflow run).
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS") and job.workers.use_gpu and \
                not torch.cuda.is_available():  # a local instance would have no GPU either
            raise WorkersError(f"{job.workers.section}.use_gpu is true but this machine has no "
                               f"GPU torch can use (and RAY_ADDRESS names no cluster); set "
                               f"{job.workers.section}.use_gpu: false to run on CPUs, or "
                               "submit the study to a cluster with GPU nodes")
        print(connect(), flush=True)
    store = ChunkStore(storage, job.name)
    payloads = _read_back(job, store, stream)
    finished = set(payloads)
    todo = [i for i, c in enumerate(job.chunks) if c.id not in finished]
    workers = min(job.workers.num_workers, len(todo))
    if todo:
        check_workers(job.workers)
    progress = ChunkProgress(job.label, job.total_units, len(job.chunks), job.unit,
                             reused_units=sum(c.units for c in job.chunks if c.id in finished),
                             reused_chunks=len(finished), workers=workers, stream=stream,
                             heartbeat_s=heartbeat_s)
    worker_s = 0.0
    start = time.monotonic()
    if todo:
        w = job.workers
        print(f"{job.label}: {len(todo)} of {len(job.chunks)} chunks to compute on {workers} "
              f"worker{'s' if workers != 1 else ''} ({w.cpus_per_worker:g} "
              f"CPU{'s' if w.cpus_per_worker != 1 else ''}"
              f"{' and a GPU' if w.use_gpu else ''} each)"
              f"{f', {len(finished)} found in storage' if finished else ''}; finished chunks "
              f"go to {store.folder}", file=stream or sys.stdout, flush=True)
        _quiet_ray_data()
        objects = ray.put(job.objects)
        dataset = ray.data.from_items([{"chunk": i} for i in todo],
                                      override_num_blocks=len(todo)).map_batches(
            _ChunkWorker, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"spec": job.spec, "chunks": job.chunks,
                                   "objects": [objects], "workers": job.workers,
                                   "store": store},
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=w.cpus_per_worker, num_gpus=1 if w.use_gpu else 0)
        rows: queue.Queue = queue.Queue()

        def consume():
            try:
                for row in dataset.iter_rows():
                    rows.put(row)
                rows.put(None)
            except BaseException as exc:  # handed to the driver's thread
                rows.put(exc)

        threading.Thread(target=consume, daemon=True).start()
        while True:
            try:
                row = rows.get(timeout=min(5.0, heartbeat_s))
            except queue.Empty:
                progress.idle()
                continue
            if row is None:
                break
            if isinstance(row, BaseException):
                raise _chunk_failure(job, row, store, len(payloads)) from row
            chunk = job.chunks[int(row["chunk"])]
            store.write(chunk.id, bytes(row["payload"]))
            payloads[chunk.id] = bytes(row["payload"])
            worker_s += float(row["wall_s"])
            progress.done(chunk.units)
            if on_progress is not None:
                on_progress(progress.reused_units + progress.units, progress.rate)
    wall = time.monotonic() - start
    starts = store.starts() if todo else {}
    return ChunkRun(results={c.id: decode(payloads[c.id]) for c in job.chunks},
                    computed=len(todo), reused=len(finished),
                    redone=sum(1 for n in starts.values() if n > 1), workers=workers,
                    wall_s=wall, units_per_s=progress.rate if todo else math.nan,
                    worker_s=worker_s)


def _read_back(job, store, stream=None) -> dict[str, bytes]:
    """{chunk id: bytes} of the job's chunks finished in `store`, each checked against the
    digest it was written with. A damaged chunk is deleted, to be computed again, and said so
    in one line."""
    payloads = {}
    for chunk_id in sorted(store.finished() & {c.id for c in job.chunks}):
        try:
            payloads[chunk_id] = store.read(chunk_id)
        except DamagedChunk as exc:
            print(f"{job.label}: chunk {chunk_id} was damaged in storage ({exc}: its bytes do "
                  "not match the digest it was written with); computing it again",
                  file=stream or sys.stdout, flush=True)
            store.remove(chunk_id)
    return payloads


def _chunk_failure(job, error: BaseException, store, kept: int) -> UserError:
    """One line for a failed job: the worker's own user error where there is one (Ray hands it
    back wrapped, or as the text of an ActorDiedError when the worker failed to start)."""
    cause = error
    for _ in range(10):  # Ray wraps a worker's exception (RayTaskError.cause, __cause__)
        if cause is None or isinstance(cause, UserError):
            break
        cause = getattr(cause, "cause", None) or cause.__cause__
    if isinstance(cause, UserError):
        return type(cause)(str(cause))
    named = re.findall(r"pipeline\.\w+\.\w+Error: ([^\n]+)", str(error))
    if named:
        return WorkersError(named[-1].rstrip(")"))
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    kept_text = f"the {kept} finished chunks are kept in {store.folder} and a rerun computes " \
                "only the rest" if kept else "no chunk had finished"
    return WorkersError(f"{job.label}: a worker failed ({type(error).__name__}: "
                        f"{lines[-1] if lines else ''}); {kept_text}")
