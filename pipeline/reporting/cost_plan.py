"""What a params.yaml will cost before it runs: stage by stage, the network evaluations, their
FLOPs (counted from the configured networks) and the time at a throughput, on the configured
number of workers (`python -m stages.plan`).

- Network evaluations: images through a network: a training step of one image (forward and
  backward) for train and the sweep; a forward pass otherwise (one sampling step of one image,
  one term of the bound of one image, the features of one image).
- FLOPs per evaluation are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls,
  convolutions and attention, 2 FLOPs per multiply-add; elementwise work is not counted), as
  benchmarks/flops.py does: the U-Net's forward and training step as params.yaml configures
  them, the digits classifier, torchvision's Inception-v3 for inception-v3-compat.
- Time: FLOPs / (the throughput of a worker x the workers that share the stage's work) + the
  stage's start-up. The throughput is given (`--gflops`, GFLOP/s achieved per worker: a GPU's)
  or measured here (`measure_rates`: the U-Net's forward and training step at the stage's batch
  and threads, timed in this process). Start-up (`STARTUP_S`) is measured on the 2-core machine,
  from a tiny study's stages; the digits classifier's many small steps are timed, not counted.

The statistics on the driver (jackknife, KID) and file transfers are not counted. The train
split's features are extracted once, by the reference_stats stage, and read by every evaluate row
and sweep trial (`reference_saving` counts what that saves).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.core.config import DIGITS_EXTRACTOR, ExperimentConfig, checkpoint_steps
from pipeline.core.dataset_specs import DATASET_SPECS
from pipeline.core.params import Params
from pipeline.core.progress import format_duration
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.measure.digits_classifier import DigitsClassifier
from pipeline.measure.extractors import extractor_name
from pipeline.model.unet import build_model
from pipeline.training.loop import make_optimizer

# Seconds of a stage outside its network work on the 2-core machine: the stages' wall times in
# a tiny study (T = 20, 40 training steps, 60 samples: next to no compute) under
# `python -m stages.local_ray dvc repro`, less that compute: Python and torch imports, Ray, the
# workers' start, MLflow, DVC. What a stage costs however little it computes. reference_stats
# is not measured yet: the reference stage's less building a U-Net, about 10 s; nor is
# sampling_steps: the evaluate stage's, whose inputs it reads.
STARTUP_S = {"prepare": 4.0, "classifier": 4.0, "reference_stats": 10.0, "train": 16.0,
             "sample": 11.0, "evaluate": 12.0, "sampling_steps": 12.0, "reference": 11.0,
             "sweep": 12.0, "tabulate": 6.0}


@dataclass(frozen=True)
class Work:
    """The network work of one stage: `evaluations` of `kind` ("train": a training step of one
    image; "infer": a forward pass; "classifier": a digits classifier training step) at
    `gflop_each`, shared by `workers` workers of `threads` CPUs, at network batch `batch`."""

    stage: str
    kind: str
    evaluations: int
    gflop_each: float
    workers: int
    threads: float
    batch: int
    note: str = ""

    @property
    def gflop(self) -> float:
        return self.evaluations * self.gflop_each


def split_sizes(params: Params) -> tuple[int, int]:
    """(train, test) images of the study's prepared splits, without preparing them."""
    data = params.data
    spec = DATASET_SPECS[data.dataset]
    if spec.sizes is not None:
        return spec.sizes
    if spec.images is not None:
        test = math.ceil(spec.images * data.test_fraction)
        return spec.images - test, test

    files = [p for p in Path(data.folder).rglob("*") if p.suffix.lower() in
             (".png", ".jpg", ".jpeg", ".bmp", ".webp")]
    test = math.ceil(len(files) * data.test_fraction)
    return len(files) - test, test


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_gflops(exp: ExperimentConfig, shape: tuple[int, int, int]) -> dict[str, float]:
    """GFLOP per image of the experiment's U-Net: forward, and a training step (forward and
    backward of `training_losses`)."""
    torch.manual_seed(0)
    model = build_model(exp, shape)
    diffusion = GaussianDiffusion.from_config(exp.diffusion)
    x0 = torch.rand(2, *shape) * 2 - 1
    t = torch.tensor([0, diffusion.num_timesteps - 1])
    with torch.inference_mode():
        forward = count_flops(lambda: model(x0, t))
    train = count_flops(lambda: diffusion.training_losses(model, x0, t)["loss"].mean().backward())
    return {"forward": forward / 2e9, "train": train / 2e9}


def _digits_classifier(params: Params) -> bool:
    """Whether the study's extractor is the digits classifier, which its classifier stage
    trains."""
    return extractor_name(params.data.dataset,
                          params.evaluate.feature_extractor) == DIGITS_EXTRACTOR


def extractor_gflops(params: Params, shape: tuple[int, int, int]) -> float:
    """GFLOP per image of the study's feature extractor: the digits classifier, or Inception-v3
    at 299 x 299 (torchvision's, the architecture of inception-v3-compat)."""
    if _digits_classifier(params):
        net = DigitsClassifier(image_size=shape[-1]).eval()
        with torch.inference_mode():
            return count_flops(lambda: net(torch.zeros(1, 1, shape[1], shape[2]))) / 1e9

    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    with torch.inference_mode():
        return count_flops(lambda: net(torch.zeros(1, 3, 299, 299))) / 1e9


def study_work(params: Params, workers: Optional[int] = None,
               cluster_cpus: Optional[int] = None) -> list[Work]:
    """The network work of every stage of the study, in `dvc repro`'s order; `workers`
    overrides num_workers of train, sample and evaluate; the sweep runs as many trials at once
    as `cluster_cpus` (default: this machine's) hold, or sweep.max_concurrent_trials."""
    shape = params.data.image_shape()
    n_train, n_test = split_sizes(params)
    feature = extractor_gflops(params, shape)
    runs = params.runs()
    base = params.base_experiment("plan")
    cost = {}  # U-Net GFLOP by architecture (every row of Table 2 shares one, or nearly)

    def unet(exp):
        key = (dataclasses.astuple(exp.model), exp.diffusion.var_type)
        if key not in cost:
            cost[key] = unet_gflops(exp, shape)
        return cost[key]

    def count(section):
        return workers or section.num_workers

    def bound_terms(exp, method=None):
        method = method or exp.evaluate.nll
        return exp.diffusion.num_timesteps if method == "exact" else \
            min(exp.evaluate.nll_strata, exp.diffusion.num_timesteps)

    def sampler_steps(exp):
        return exp.sample.steps or exp.diffusion.num_timesteps

    out = [Work("prepare", "none", 0, 0.0, 1, 1, 1)]
    if _digits_classifier(params):
        out.append(Work("classifier", "classifier", params.evaluate.classifier_steps * 128,
                        3 * feature, 1, 1, 128, "timed: small steps"))
    else:
        out.append(Work("classifier", "none", 0, 0.0, 1, 1, 1, "checks the extractor"))
    e = base.evaluate
    out.append(dataclasses.replace(
        _inference("reference_stats", 0, 0.0, n_train, feature, count(e), e.cpus_per_worker,
                   e.nll_batch_size),
        note=f"{n_train:,} feature extractions (the train split), read by every row"))
    for exp in runs:
        t = exp.train
        out.append(Work(f"train@{exp.key}", "train", t.steps * t.batch_size, unet(exp)["train"],
                        count(t), t.cpus_per_worker, t.batch_size // count(t)))
    for exp in runs:
        s = exp.sample
        out.append(Work(f"sample@{exp.key}", "infer", s.num_samples * sampler_steps(exp),
                        unet(exp)["forward"], min(count(s), math.ceil(s.num_samples /
                                                                      s.batch_size)),
                        s.cpus_per_worker, s.batch_size))
    for exp in runs:
        e = exp.evaluate
        n_nll = min(e.nll_num_images, n_test) + min(e.nll_num_images, n_train)
        unet_evals = n_nll * bound_terms(exp)
        features = exp.sample.num_samples  # the train split's: reference_stats, once
        if e.checkpoints is not None:
            kept = len(checkpoint_steps(exp.train)) if e.checkpoints == "all" else \
                len(e.checkpoints)
            unet_evals += kept * (e.checkpoint_num_samples * sampler_steps(exp) +
                                  min(e.nll_num_images, n_test) * bound_terms(exp, "stratified"))
            features += kept * e.checkpoint_num_samples
        out.append(_inference(f"evaluate@{exp.key}", unet_evals, unet(exp)["forward"],
                              features, feature, count(e), e.cpus_per_worker, e.nll_batch_size))
    for name in params.sampling_steps.experiments:
        for seed in params.study.seeds:
            exp = params.experiment(name, seed)
            s = exp.sample
            steps = sum(params.sampling_steps.ddim_steps) + exp.diffusion.num_timesteps
            settings = len(params.sampling_steps.ddim_steps) + 1
            out.append(_inference(f"sampling_steps@{exp.key}", s.num_samples * steps,
                                  unet(exp)["forward"], settings * s.num_samples, feature,
                                  min(count(s), settings * math.ceil(s.num_samples /
                                                                     s.batch_size)),
                                  s.cpus_per_worker, s.batch_size))
    e = base.evaluate
    n = base.sample.num_samples
    out.append(_inference("reference", n * sampler_steps(base) +
                          (min(e.nll_num_images, n_test) + min(e.nll_num_images, n_train)) *
                          bound_terms(base), unet(base)["forward"], n_train + n_test + n,
                          feature, count(e), e.cpus_per_worker, base.sample.batch_size))
    sweep = params.sweep
    if sweep.base_experiment in params.experiments:
        trial = params.sweep_experiment(*sweep.cells()[0])
        trials = len(sweep.cells()) * sweep.num_samples
        cpus = cluster_cpus or os.cpu_count() or 1
        concurrent = sweep.max_concurrent_trials or max(1, math.floor(
            cpus / (sweep.num_workers * sweep.cpus_per_worker) + 1e-9))
        if sweep.use_gpu and not sweep.max_concurrent_trials:  # the GPUs: train's workers'
            concurrent = min(concurrent, max(1, (workers or params.train.num_workers) //
                                             sweep.num_workers))
        reports = sweep.steps // sweep.report_every
        infer = trials * (reports * sweep.val_images * sweep.val_strata +
                          sweep.fid_num_samples * sweep.fid_steps)
        out.append(Work("sweep", "train", trials * sweep.steps * trial.train.batch_size,
                        unet(trial)["train"] + unet(trial)["forward"] * infer /
                        max(1, trials * sweep.steps * trial.train.batch_size),
                        min(concurrent, trials), sweep.cpus_per_worker,
                        trial.train.batch_size // sweep.num_workers,
                        "every trial to its last step (successive halving stops some sooner)"))
    out.append(Work("tabulate", "none", 0, 0.0, 1, 1, 1))
    return out


def reference_saving(params: Params) -> dict[str, int]:
    """What the reference statistics, extracted once, save: {"images": the train split's
    images, "rows": evaluate rows and "trials": sweep trials that each extracted them before
    (a trial at its last step), "saved": the extractions no longer made by the rows, "trials_saved":
    at most those of the trials}."""
    n_train, _ = split_sizes(params)
    rows = len(params.runs())
    sweep = params.sweep
    trials = 0 if sweep.base_experiment not in params.experiments else \
        len(sweep.cells()) if sweep.search == "grid" else sweep.num_samples
    return {"images": n_train, "rows": rows, "trials": trials,
            "saved": (rows - 1) * n_train, "trials_saved": trials * n_train}


def _inference(stage: str, unet_evals: int, unet_gflop: float, features: int,
               feature_gflop: float, workers: int, threads: float, batch: int) -> Work:
    """One inference stage's work: U-Net forwards and feature extractions, as evaluations of
    their mean cost (their FLOPs add up)."""
    total = unet_evals + features
    mean = (unet_evals * unet_gflop + features * feature_gflop) / total if total else 0.0
    return Work(stage, "infer", total, mean, workers, threads, batch,
                f"{unet_evals:,} U-Net forwards + {features:,} feature extractions")


# --------------------------------------------------------------------------------------------
# Throughput and time
# --------------------------------------------------------------------------------------------


def measure_rates(params: Params, works: list[Work], repeats: int = 3) -> dict[tuple, float]:
    """GFLOP/s achieved here by one worker for each (kind, batch, threads) of `works`: the
    U-Net's training step or forward at that batch and torch thread count (fresh weights, the
    best of `repeats` timed calls after one warm-up); for the digits classifier, its training
    step. Keys as `rate_key`."""
    shape = params.data.image_shape()
    exp = params.experiment(next(iter(params.experiments)))
    per_image = unet_gflops(exp, shape)
    rates = {}
    saved = torch.get_num_threads()
    try:
        for work in works:
            key = rate_key(work)
            if work.kind == "none" or key in rates:
                continue
            torch.set_num_threads(max(1, int(work.threads)))
            torch.manual_seed(0)
            batch = max(1, min(work.batch, 4096))
            if work.kind == "classifier":
                fn = _classifier_step(shape, batch)
                gflop = work.gflop_each * batch
            else:
                model = build_model(exp, shape)
                diffusion = GaussianDiffusion.from_config(exp.diffusion)
                x0 = torch.rand(batch, *shape) * 2 - 1
                t = torch.randint(0, diffusion.num_timesteps, (batch,))
                if work.kind == "train":
                    optimizer, _ = make_optimizer(model, exp)

                    def fn():
                        optimizer.zero_grad(set_to_none=True)
                        diffusion.training_losses(model, x0, t)["loss"].mean().backward()
                        optimizer.step()
                    gflop = per_image["train"] * batch
                else:
                    model.eval()

                    def fn():
                        with torch.inference_mode():
                            model(x0, t)
                    gflop = per_image["forward"] * batch
            fn()
            seconds = min(_timed(fn) for _ in range(repeats))
            rates[key] = gflop / seconds
    finally:
        torch.set_num_threads(saved)
    return rates


def _classifier_step(shape, batch):
    net = DigitsClassifier(image_size=shape[-1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, shape[1], shape[2])
    y = torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return step


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rate_key(work: Work) -> tuple:
    return (work.kind, work.batch, max(1, int(work.threads)))


def plan_table(works: list[Work], gflops: Optional[float] = None,
               rates: Optional[Mapping[tuple, float]] = None,
               startup: Mapping[str, float] = STARTUP_S):
    """One row per stage and a total: evaluations, GFLOP, workers, GFLOP/s per worker, compute
    seconds (FLOPs / (rate x workers)), start-up and total seconds. The rate is `gflops` (given,
    per worker) or `rates[rate_key(work)]` (measured)."""
    rows = []
    for work in works:
        rate = None if work.kind == "none" else (gflops if gflops else rates[rate_key(work)])
        compute = work.gflop / (rate * work.workers) if rate else 0.0
        start = startup.get(work.stage.partition("@")[0], 0.0)
        rows.append({"stage": work.stage, "workers": work.workers,
                     "evaluations": work.evaluations, "gflop": work.gflop,
                     "gflops_per_worker": rate, "compute_s": compute, "startup_s": start,
                     "total_s": compute + start, "note": work.note})
    table = pd.DataFrame(rows)
    total = {"stage": "total", "evaluations": int(table["evaluations"].sum()),
             "gflop": float(table["gflop"].sum()), "compute_s": float(table["compute_s"].sum()),
             "startup_s": float(table["startup_s"].sum()),
             "total_s": float(table["total_s"].sum()), "note": "stages one after another"}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


PLAN_COLUMNS = (("stage", "<"), ("workers", ">"), ("evaluations", ">"), ("GFLOP", ">"),
                ("compute", ">"), ("start-up", ">"), ("total", ">"))


def plan_lines(table) -> list[str]:
    """`plan_table`'s rows as the lines `python -m stages.plan` prints: a header, then a line
    per row; every column as wide as its widest cell (or its name), the note last, unpadded."""
    cells = []
    for row in table.to_dict("records"):
        workers = "" if row["stage"] == "total" else f"{row['workers']:.0f}"
        note = row["note"] if isinstance(row["note"], str) else ""
        cells.append(([row["stage"], workers, f"{row['evaluations']:,.0f}",
                       f"{row['gflop']:,.0f}", format_duration(row["compute_s"]),
                       format_duration(row["startup_s"]), format_duration(row["total_s"])],
                      note))
    widths = [max([len(name)] + [len(row[i]) for row, _ in cells])
              for i, (name, _) in enumerate(PLAN_COLUMNS)]

    def line(values, note=""):
        text = " ".join(f"{value:{align}{width}}"
                        for value, (_, align), width in zip(values, PLAN_COLUMNS, widths))
        return f"{text}  {note}" if note else text.rstrip()

    return [line([name for name, _ in PLAN_COLUMNS])] + [line(row, note) for row, note in cells]
