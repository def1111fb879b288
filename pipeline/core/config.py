"""The sections of params.yaml as typed, frozen dataclasses, and the vocabularies they allow.

`pipeline.core.params` reads the file into them (`load_params`), once. Every key is checked: an
unknown key, a wrong type or an out-of-range value raises `ConfigError` with a short message
that names the key and the allowed values. Library code takes one section (or an
`ExperimentConfig`, the resolved view of one row of the study), never the raw mapping.

Experiments (the rows of the paper's Table 2) are entries of the `experiments` mapping; each
entry overrides fields of the `diffusion` section, and optionally of `train` and `sample` under
nested `train:` and `sample:` keys. The `sweep` section (Ray Tune over noise schedule x loss
weighting) names one of them as the base of every trial.

Defaults have one home, the dataclass fields here, and they are the default study's values:
params.yaml repeats every key (so that `dvc params diff` shows each) and tests/test_config.py
holds each of its values equal to its field's default, so a key deleted from params.yaml leaves
the study as it was. The paper's CIFAR10 values are docs/cifar10.params.yaml, complete too.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Optional, Union

from pipeline.core.coerce import ConfigError, build_section, choices, plain
from pipeline.core.dataset_specs import (DATASET_NAMES, DATASET_SPECS, DIGITS_EXTRACTOR,
                                         INCEPTION_EXTRACTOR)
from pipeline.core.io import sha256_hex
from pipeline.core.sampler_specs import SAMPLER_NAMES, SAMPLER_SPECS, unused_options
from pipeline.core.sweep_axes import SWEEP_AXES, SweepAxis, cell_patch

# The var_types whose variance the network outputs (its last layer has 2C channels).
LEARNED_VAR_TYPES = ("learned", "learned_range")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyConfig:
    """Identity of the study: its name (the MLflow experiment) and its training seeds. Every
    experiment is trained, sampled and evaluated once per seed (DVC's `matrix`: stages
    `train@<experiment>-<seed>`); the tables show the mean over seeds where there are several."""

    name: str = "ddpm-digits"
    seeds: tuple[int, ...] = (0,)

    def validate(self, where: str) -> None:
        require(bool(self.name.strip()), f"{where}.name", "must be a non-empty string")
        require(len(self.seeds) >= 1, f"{where}.seeds", "must be a non-empty list of seeds")
        require(all(s >= 0 for s in self.seeds), f"{where}.seeds", "must be integers >= 0")
        require(len(set(self.seeds)) == len(self.seeds), f"{where}.seeds",
                 f"lists a seed twice: {list(self.seeds)}")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its raw files live, and how it is split. `seed` draws the train/test
    split (and the digits classifier's training): the measuring apparatus, the same for every
    training seed of the study."""

    dataset: Literal[DATASET_NAMES] = "digits"  # pipeline.core.dataset_specs
    seed: int = 0
    cifar10_archive: str = "data/raw/cifar-10-python.tar.gz"
    download: bool = False
    folder: str = "data/raw/images"
    image_size: int = 32
    channels: int = 3
    test_fraction: float = 0.2
    hflip: Optional[bool] = None  # None: the dataset's default (cifar10/folder yes, digits no)

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the dataset's images: its spec's, or data.channels x image_size² (a
        folder of images)."""
        shape = DATASET_SPECS[self.dataset].shape
        return shape if shape is not None else (self.channels, self.image_size, self.image_size)

    def resolution(self) -> int:
        """The side of the dataset's square images (digits 8, cifar10 32, folder image_size)."""
        return self.image_shape()[-1]

    def validate(self, where: str) -> None:
        require(self.seed >= 0, f"{where}.seed", "must be >= 0")
        require(self.image_size >= 4, f"{where}.image_size", "must be >= 4")
        require(self.channels in (1, 3), f"{where}.channels", "must be 1 or 3")
        require(0.0 < self.test_fraction < 1.0, f"{where}.test_fraction", "must be in (0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process (schedule) and the reverse-process parameterization and objective.

    mean_type: eps | x0 | mu (the paper's "mu-tilde prediction");
    var_type: fixed_large (sigma^2 = beta) | fixed_small (beta-tilde) | learned | learned_range;
    loss: simple | vlb (the paper's "L") | hybrid (simple + hybrid_lambda * L_vlb);
    weighting (of the simple loss): uniform | vlb | p2 | min_snr.
    """

    num_timesteps: int = 200
    schedule: Literal["linear", "cosine", "quadratic", "sigmoid", "constant", "jsd"] = "linear"
    beta_start: Optional[float] = None  # None: the schedule's default
    beta_end: Optional[float] = None
    mean_type: Literal["eps", "x0", "mu"] = "eps"
    var_type: Literal["fixed_large", "fixed_small", "learned", "learned_range"] = "fixed_large"
    loss: Literal["simple", "vlb", "hybrid"] = "simple"
    weighting: Literal["uniform", "vlb", "p2", "min_snr"] = "uniform"
    hybrid_lambda: float = 0.001
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    min_snr_gamma: float = 5.0
    importance_sampling: bool = False
    clip_denoised: bool = True

    def validate(self, where: str) -> None:
        require(self.num_timesteps >= 1, f"{where}.num_timesteps", "must be a positive integer")
        for key in ("beta_start", "beta_end"):
            value = getattr(self, key)
            require(value is None or 0.0 < value < 1.0, f"{where}.{key}",
                     f"must be in (0, 1), got {value}")
        if self.beta_start is not None and self.beta_end is not None:
            require(self.beta_start <= self.beta_end, f"{where}.beta_start",
                     f"must be <= beta_end ({self.beta_end})")
        if self.var_type in LEARNED_VAR_TYPES:
            require(self.loss in ("vlb", "hybrid"), f"{where}.loss",
                     f"'{self.loss}' cannot train a learned variance (var_type '{self.var_type}'); "
                     "use loss 'vlb' or 'hybrid', or a fixed var_type")
        if self.weighting != "uniform":
            require(self.loss in ("simple", "hybrid"), f"{where}.weighting",
                     f"weights the simple loss; loss '{self.loss}' has none (use 'uniform')")
        if self.importance_sampling:
            require(self.loss == "vlb", f"{where}.importance_sampling",
                     "resamples t for loss 'vlb' only")
        require(self.hybrid_lambda >= 0.0, f"{where}.hybrid_lambda", "must be >= 0")
        require(self.p2_k > 0.0, f"{where}.p2_k", "must be > 0")
        require(self.p2_gamma >= 0.0, f"{where}.p2_gamma", "must be >= 0")
        require(self.min_snr_gamma > 0.0, f"{where}.min_snr_gamma", "must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """The DDPM U-Net (Ho et al. 2020, App. B)."""

    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.0

    def resolutions(self, image_size: int) -> list[int]:
        """The feature-map sizes of the U-Net's levels for `image_size` input, highest first."""
        return [image_size // 2 ** level for level in range(len(self.ch_mult))]

    def validate(self, where: str) -> None:
        require(self.ch >= 8 and self.ch % 8 == 0, f"{where}.ch",
                 f"must be a positive multiple of 8 (GroupNorm groups), got {self.ch}")
        require(len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult),
                 f"{where}.ch_mult", "must be a non-empty list of positive integers")
        require(self.num_res_blocks >= 1, f"{where}.num_res_blocks", "must be >= 1")
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization (Adam with a linear warm-up, then a constant or cosine learning rate, and
    gradient clipping), EMA (with its warm-up), checkpoints, Ray."""

    steps: int = 700
    batch_size: int = 128
    lr: float = 0.002
    warmup_steps: int = 50
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up
    lr_final: float = 0.0  # cosine: the last step's lr as a fraction of lr
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    log_every: int = 50
    checkpoint_every: int = 200
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 2.0
    max_failures: int = 2
    compile: bool = False
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"  # PRECISIONS (pipeline/model/precision.py)

    def validate(self, where: str) -> None:
        require(self.steps >= 1, f"{where}.steps", "must be >= 1")
        require(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        require(self.lr > 0.0 and math.isfinite(self.lr), f"{where}.lr", "must be > 0")
        require(self.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")
        require(0.0 <= self.lr_final <= 1.0, f"{where}.lr_final",
                 "must be in [0, 1] (a fraction of train.lr)")
        require(self.grad_clip > 0.0, f"{where}.grad_clip", "must be > 0")
        require(0.0 <= self.ema_decay < 1.0, f"{where}.ema_decay", "must be in [0, 1)")
        require(self.log_every >= 1, f"{where}.log_every", "must be >= 1")
        require(self.checkpoint_every >= 1, f"{where}.checkpoint_every", "must be >= 1")
        _validate_workers(self, where)
        require(self.batch_size % self.num_workers == 0, f"{where}.batch_size",
                 f"({self.batch_size}) must be divisible by num_workers ({self.num_workers})")
        require(self.max_failures >= -1, f"{where}.max_failures", "must be >= -1 (-1: no limit)")


@dataclass(frozen=True)
class SampleConfig:
    """Sampling with one of the samplers of `pipeline.core.sampler_specs` (ancestral: Algorithm
    2, all T steps; ddim: strided DDIM, `steps` and `eta`), each taking its declared options."""

    num_samples: int = 400
    batch_size: int = 400
    sampler: Literal[SAMPLER_NAMES] = "ancestral"
    steps: Optional[int] = None  # None: all T steps (a sampler option: ddim)
    eta: float = 0.0             # a sampler option: ddim
    grid_size: int = 10
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"  # PRECISIONS (pipeline/model/precision.py)
    compile: bool = False  # torch.compile the U-Net's forward (pays off on long runs)
    # where the batches run (Ray workers, as train's): changes no sample, but use_gpu does
    num_workers: int = 1
    cpus_per_worker: float = 2.0
    use_gpu: bool = False

    def validate(self, where: str) -> None:
        _validate_workers(self, where)
        require(self.num_samples >= 1, f"{where}.num_samples", "must be >= 1")
        require(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        require(self.steps is None or self.steps >= 1, f"{where}.steps", "must be >= 1")
        require(self.eta >= 0.0, f"{where}.eta", "must be >= 0")
        for key in unused_options(self):
            takers = [s.name for s in SAMPLER_SPECS.values() if key in s.options]
            require(False, f"{where}.{key}",
                    f"the {self.sampler} sampler takes no {key} "
                    f"({SAMPLER_SPECS[self.sampler].summary}); leave it empty or use "
                    f"sampler {' or '.join(repr(t) for t in takers)}")
        require(self.grid_size >= 1, f"{where}.grid_size", "must be >= 1")


@dataclass(frozen=True)
class EvaluateConfig:
    """Metrics: FID / IS / KID of the samples' features (the digits classifier's, or a
    torch-fidelity extractor's) and the NLL bound (bits/dim) of test and train images, each with
    its standard error (pipeline/measure/stats.py); the real-data reference drawn at the
    samples' N (`reference_draws` draws)."""

    nll: Literal["exact", "stratified"] = "exact"
    nll_num_images: int = 100
    nll_strata: int = 50
    nll_batch_size: int = 800  # (image, timestep) pairs per network call
    is_splits: int = 1  # IS over all samples at once: the least biased at small N
    reference_draws: int = 10  # real-data draws of sample.num_samples images
    inception_weights: Optional[str] = None  # local inception-v3-compat weights (cifar10, offline)
    # null: by dataset (digits-classifier / inception-v3-compat); or "package.module:Class", a
    # torch-fidelity FeatureExtractorBase subclass with `feat` and `logits_unbiased` outputs
    feature_extractor: Optional[str] = None
    classifier_steps: int = 1500
    # scores over training: null (only the final model), 'all' (every checkpoint step) or a
    # list of steps (multiples of train.checkpoint_every, or train.steps). The train stage then
    # keeps the EMA weights of those steps; the evaluate stage scores each with a quick FID of
    # `checkpoint_num_samples` samples and the stratified NLL, and reports the best-FID step.
    checkpoints: Optional[Union[Literal["all"], tuple[int, ...]]] = None
    checkpoint_num_samples: int = 200
    # where the bound, the features and the checkpoints' scores run (Ray workers, as train's)
    num_workers: int = 1
    cpus_per_worker: float = 2.0
    use_gpu: bool = False

    def validate(self, where: str) -> None:
        _validate_workers(self, where)
        require(self.nll_num_images >= 1, f"{where}.nll_num_images", "must be >= 1")
        if isinstance(self.checkpoints, tuple):
            require(len(self.checkpoints) >= 1 and all(s >= 1 for s in self.checkpoints),
                     f"{where}.checkpoints", "must be null, 'all' or a non-empty list of "
                     "training steps >= 1")
        require(self.checkpoint_num_samples >= 2, f"{where}.checkpoint_num_samples",
                 "must be >= 2 (FID needs two images)")
        require(self.nll_strata >= 1, f"{where}.nll_strata", "must be >= 1")
        require(self.nll_batch_size >= 1, f"{where}.nll_batch_size", "must be >= 1")
        require(self.is_splits >= 1, f"{where}.is_splits", "must be >= 1")
        require(self.reference_draws >= 2, f"{where}.reference_draws",
                 "must be >= 2 (a spread needs two draws)")

        require(self.classifier_steps >= 1, f"{where}.classifier_steps", "must be >= 1")
        fx = self.feature_extractor
        require(fx is None or fx in (DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR) or
                 (":" in fx and all(fx.split(":", 1))), f"{where}.feature_extractor",
                 f"'{fx}' is not allowed; use null, digits-classifier, inception-v3-compat or "
                 "'package.module:ClassName'")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: tracking URI (MLFLOW_TRACKING_URI overrides it) and artifact root."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"

    def validate(self, where: str) -> None:
        problem = tracking_uri_problem(self.tracking_uri)
        require(problem is None, f"{where}.tracking_uri", str(problem))


# What MLflow can track into: a database (sqlite, or a server's database with an optional
# +driver, e.g. postgresql+psycopg2) or a tracking server (`mlflow server`).
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https")


def tracking_uri_problem(uri: str) -> Optional[str]:
    """Why MLflow cannot track into `uri`, or None if its scheme is one it can use."""
    scheme = uri.partition("://")[0].partition("+")[0].lower() if "://" in uri else ""
    if scheme in TRACKING_SCHEMES:
        return None
    found = f"scheme '{scheme}'" if scheme else "no scheme"
    return (f"{uri!r} has {found}, not a store MLflow can track into; use sqlite:///mlflow.db, "
            "the http(s)://HOST:PORT of an `mlflow server`, or a postgresql:// / mysql:// / "
            "mssql:// database URI")


# What pyarrow (and so Ray Train / Tune) can keep storage in, besides a local or shared path.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


@dataclass(frozen=True)
class ClusterConfig:
    """Where Ray keeps and places the work. Nothing here changes a result, so no stage lists
    this section among its DVC params.

    storage: Ray's storage (the training runs with their checkpoints and EMA snapshots, the
    sweep's trials, the finished chunks of sampling and evaluation): a local path, a path every
    node mounts, or a URI every node reaches (`s3://bucket/prefix`; an S3-compatible endpoint
    such as MinIO through `AWS_ENDPOINT_URL`); `DDPM_STORAGE` overrides it. A run resumes from
    the last checkpoint it finds there.
    placement: pack (Ray's default: fill a node before the next) | spread (the workers of one
    run on as many nodes as hold them, one per node where there are enough).
    """

    storage: str = "ray_storage"
    placement: Literal["pack", "spread"] = "pack"

    def resolved_storage(self) -> str:
        """Where runs keep their storage: `DDPM_STORAGE` where it is set, else `storage`."""
        return os.environ.get("DDPM_STORAGE") or self.storage

    def validate(self, where: str) -> None:
        require(bool(self.storage.strip()), f"{where}.storage",
                 "must be a path or a URI such as s3://bucket/prefix")
        scheme = self.storage.partition("://")[0].lower() if "://" in self.storage else None
        require(scheme is None or scheme in STORAGE_SCHEMES, f"{where}.storage",
                 f"scheme '{scheme}' is not one Ray storage can use; use a path or one of: "
                 f"{', '.join(f'{s}://' for s in STORAGE_SCHEMES)}")


SECTIONS: dict[str, type] = {
    "study": StudyConfig,
    "data": DataConfig,
    "diffusion": DiffusionConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
    "tracking": TrackingConfig,
    "cluster": ClusterConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """One run of the study, fully resolved: a row (experiment `name`, the base sections with
    its overrides) trained with one of the study's seeds (`seed`)."""

    name: str
    seed: int
    study: StudyConfig
    data: DataConfig
    diffusion: DiffusionConfig
    model: ModelConfig
    train: TrainConfig
    sample: SampleConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    cluster: ClusterConfig

    @property
    def key(self) -> str:
        """`<experiment>-<seed>`: the suffix of this run's DVC stages (`train@<key>`) and the
        name of its outputs (models/<key>/, samples/<key>/, metrics/<key>.json)."""
        return run_key(self.name, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ExperimentConfig":
        """Rebuild from `to_dict()` output (e.g. inside a Ray worker), validating it again."""
        sections = {}
        for name, section_cls in SECTIONS.items():
            sections[name] = build_section(section_cls, dict(raw.get(name) or {}), name)
            sections[name].validate(name)
        return cls(name=str(raw["name"]), seed=int(raw["seed"]), **sections)

    def config_hash(self, sections: tuple[str, ...] = ("data", "diffusion", "model",
                                                          "train")) -> str:
        """Short hash of what determines a trained model: the study's name, the experiment, its
        seed and `sections` (names a training run; the study's other seeds do not enter)."""
        payload = {name: plain(dataclasses.asdict(getattr(self, name))) for name in sections}
        return sha256_hex(json.dumps([self.study.name, self.name, self.seed, payload],
                                     sort_keys=True), length=10)


def run_key(experiment: str, seed: int) -> str:
    """The key of one (experiment, seed) run: `<experiment>-<seed>`, as DVC's matrix names it."""
    return f"{experiment}-{seed}"


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune sweep over noise schedule x loss weighting (the `sweep` stage).

    Every trial trains `base_experiment` (an entry of `experiments`) with one cell of the grid
    of `axes` (`pipeline.core.sweep_axes.SWEEP_AXES`: one schedule of `schedules` and one
    weighting of `weightings`, see SWEEP_OBJECTIVES) for `steps` steps with the same per-worker
    function as the train stage (with `ema_decay` if set: a short trial wants a shorter EMA than
    the study's runs), reporting a stratified NLL estimate (bits/dim, `val_strata` timesteps) of
    the EMA model on the first `val_images` test images every `report_every` steps. Synchronous
    successive halving stops the trials whose NLL is in the worst 1 - 1/reduction_factor at
    rungs grace_period * rf^k steps (once every trial has reached the rung); a trial that runs
    to the end measures a quick FID on `fid_num_samples` DDIM samples (`fid_steps` steps).
    Resources per trial: `num_workers` workers of `cpus_per_worker` CPUs (and one GPU each with
    `use_gpu`); at most `max_concurrent_trials` trials at once (0: as many as the cluster's
    CPUs / GPUs hold at once).
    """

    base_experiment: str = "eps_simple"
    schedules: tuple[Literal["linear", "cosine", "quadratic", "sigmoid"], ...] = (
        "linear", "cosine", "quadratic", "sigmoid")
    weightings: tuple[Literal["uniform", "vlb", "p2", "min_snr", "hybrid"], ...] = (
        "uniform", "min_snr")
    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1  # random search: trials drawn; grid: must be 1
    steps: int = 120
    report_every: int = 30
    ema_decay: Optional[float] = None  # None: the base experiment's; short trials want less
    grace_period: int = 60
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 0  # 0: as many as the cluster's resources hold
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    val_images: int = 100
    val_strata: int = 20
    fid_num_samples: int = 200
    fid_steps: int = 20

    axes: ClassVar[tuple[SweepAxis, ...]] = SWEEP_AXES  # each lists its values in a field above

    def allowed(self, axis: SweepAxis) -> tuple[str, ...]:
        """The values `axis` may take: the choices of its field's annotation."""
        return choices(type(self), axis.values)

    def validate(self, where: str) -> None:
        for axis in self.axes:
            key, values, allowed = axis.values, getattr(self, axis.values), self.allowed(axis)
            require(len(values) >= 1, f"{where}.{key}",
                     f"must be a non-empty list; choose from: {', '.join(allowed)}")
            require(len(set(values)) == len(values), f"{where}.{key}",
                     f"lists a value twice: {', '.join(values)}")
        require(self.num_samples >= 1, f"{where}.num_samples", "must be >= 1")
        require(self.search == "random" or self.num_samples == 1, f"{where}.num_samples",
                 "must be 1 for search 'grid' (each cell once, same seed); use search 'random' "
                 "to draw num_samples trials")
        require(self.steps >= 1, f"{where}.steps", "must be >= 1")
        require(self.ema_decay is None or 0.0 <= self.ema_decay < 1.0, f"{where}.ema_decay",
                 "must be in [0, 1), or null for the base experiment's train.ema_decay")
        require(1 <= self.report_every <= self.steps, f"{where}.report_every",
                 f"must be in 1..steps ({self.steps})")
        require(1 <= self.grace_period <= self.steps, f"{where}.grace_period",
                 f"must be in 1..steps ({self.steps}) (training steps before the first rung, "
                 "where the worst trials stop)")
        require(self.reduction_factor > 1.0, f"{where}.reduction_factor",
                 "must be > 1 (keep the best 1/rf of the trials at each rung)")
        off = [r for r in self.rung_steps() if r % self.report_every]
        require(not off, f"{where}.grace_period",
                f"puts rungs at steps {off}, where trials do not report (every report_every = "
                f"{self.report_every} steps): make grace_period * reduction_factor^k multiples "
                "of report_every")
        require(self.max_concurrent_trials >= 0, f"{where}.max_concurrent_trials",
                 "must be >= 0 (0: as many as the cluster's CPUs / GPUs hold at once)")
        _validate_workers(self, where)
        require(self.val_images >= 2, f"{where}.val_images", "must be >= 2")
        require(self.val_strata >= 1, f"{where}.val_strata", "must be >= 1")
        require(self.fid_num_samples >= 2, f"{where}.fid_num_samples", "must be >= 2")
        require(self.fid_steps >= 1, f"{where}.fid_steps", "must be >= 1")

    def rung_steps(self) -> list[int]:
        """The steps where trials are compared: grace_period * reduction_factor^k < steps."""
        out, k = [], 0
        while (step := int(round(self.grace_period * self.reduction_factor ** k))) < self.steps:
            out.append(step)
            k += 1
        return out

    def cells(self) -> list[tuple[str, ...]]:
        """Every cell of the grid, one value per axis, the first axis outermost."""
        return list(itertools.product(*(getattr(self, axis.values) for axis in self.axes)))

    def trial_experiment(self, base: ExperimentConfig, *cell: str) -> ExperimentConfig:
        """`base` with one cell's values (one per axis: a schedule and an objective), trained
        as a sweep trial: `steps` steps, reports every `report_every` steps with a checkpoint
        at each (a trial paused at a rung or stopped with the sweep goes on from there), this
        section's workers. Raises ConfigError (naming sweep.*) if the cell is not a valid
        experiment."""
        require(len(cell) == len(self.axes), "sweep",
                f"a cell has one value per axis ({', '.join(a.name for a in self.axes)}), "
                f"got {list(cell)}")
        where = f"sweep (base_experiment '{base.name}', " + ", ".join(
            f"{axis.name} '{value}'" for axis, value in zip(self.axes, cell)) + ")"
        for axis, value in zip(self.axes, cell):
            allowed = self.allowed(axis)
            require(value in allowed, f"sweep.{axis.values}",
                    f"'{value}' is not allowed; choose from: {', '.join(allowed)}")
        patch = cell_patch(cell, self.axes)
        sections = {name: dataclasses.replace(getattr(base, name), **keys)
                    for name, keys in patch.items()}
        diffusion = dataclasses.replace(sections.pop("diffusion", base.diffusion),
                                        importance_sampling=False)
        require(base.train.batch_size % self.num_workers == 0, "sweep.num_workers",
                 f"({self.num_workers}) must divide the base experiment's train.batch_size "
                 f"({base.train.batch_size})")
        ema_decay = base.train.ema_decay if self.ema_decay is None else self.ema_decay
        train = dataclasses.replace(sections.pop("train", base.train), steps=self.steps,
                                    log_every=self.report_every,
                                    checkpoint_every=self.report_every,
                                    num_workers=self.num_workers,
                                    cpus_per_worker=self.cpus_per_worker, use_gpu=self.use_gpu,
                                    ema_decay=ema_decay)
        try:
            for name, section in (("diffusion", diffusion), ("train", train),
                                  *sections.items()):
                section.validate(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return dataclasses.replace(base, name="-".join((base.name, *cell)), diffusion=diffusion,
                                   train=train, **sections)


@dataclass(frozen=True)
class SamplingStepsConfig:
    """FID, IS and precision / recall against the number of sampling steps (the
    `sampling_steps` stage): each run of `experiments` (every seed of the study) sampled with
    DDIM (`eta`) at each of `ddim_steps`, and with ancestral sampling at all T steps, from the
    same trained model and the same per-image seeds as its samples (sample.num_samples images,
    sample.batch_size at a time). An empty `experiments` leaves the stage out."""

    experiments: tuple[str, ...] = ("eps_simple",)
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100)
    eta: float = 0.0

    def validate(self, where: str) -> None:
        require(len(set(self.experiments)) == len(self.experiments), f"{where}.experiments",
                f"lists an experiment twice: {', '.join(self.experiments)}")
        require(len(self.ddim_steps) >= 1, f"{where}.ddim_steps", "must list at least one count")
        require(all(s >= 1 for s in self.ddim_steps), f"{where}.ddim_steps", "must be >= 1")
        require(list(self.ddim_steps) == sorted(set(self.ddim_steps)), f"{where}.ddim_steps",
                f"must increase, each count once, got {list(self.ddim_steps)}")
        require(self.eta >= 0.0, f"{where}.eta", "must be >= 0")


# The choices of params.yaml, read from the annotations above (their only home); the library's
# registries (pipeline.diffusion.schedules.SCHEDULES, pipeline.diffusion.gaussian.MEAN_TYPES,
# ...) are keyed by the same names (tests/test_config.py checks each registry against its annotation).
SCHEDULES = choices(DiffusionConfig, "schedule")
MEAN_TYPES = choices(DiffusionConfig, "mean_type")
VAR_TYPES = choices(DiffusionConfig, "var_type")
LOSSES = choices(DiffusionConfig, "loss")
WEIGHTINGS = choices(DiffusionConfig, "weighting")
SAMPLERS = SAMPLER_NAMES
PRECISIONS = choices(TrainConfig, "precision")  # sample.precision has the same (tested)
SWEEP_SCHEDULES = choices(SweepConfig, "schedules")
SWEEP_WEIGHTINGS = choices(SweepConfig, "weightings")


def checkpoint_steps(train: TrainConfig) -> list[int]:
    """The training steps that have a checkpoint: every `checkpoint_every` steps and the last."""
    steps = list(range(train.checkpoint_every, train.steps + 1, train.checkpoint_every))
    return steps if steps and steps[-1] == train.steps else [*steps, train.steps]


# The keys that say where a section's work runs, and change none of its results but use_gpu
# (another device, other kernels): no stage lists them among its DVC params.
WORKER_KEYS = ("num_workers", "cpus_per_worker")


def _validate_workers(section, where: str) -> None:
    require(section.num_workers >= 1, f"{where}.num_workers", "must be >= 1")
    require(section.cpus_per_worker > 0.0, f"{where}.cpus_per_worker", "must be > 0")


def require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")
