"""A trained run one call away: its EMA model loaded from models/<E>-<S>/ (`load_run`) or from
its MLflow run (`load_logged_model`), sampled with the sample stage's own code and seeds
(`TrainedModel.sample`), and a grid of its images saved (`TrainedModel.save_grid`):

    from pipeline import load_run

    run = load_run("eps_simple-0")             # models/eps_simple-0/ with params.yaml
    images = run.sample(16, seed=0)            # uint8 16 x C x H x W
    run.save_grid(images, "eps_simple-0.png")

`sample` draws as the sample stage's workers do (`pipeline.measure.sampling.generate`: batches
of sample.batch_size, image i's noise from a generator of its own seeded by ("sample", seed,
i)), so one seed gives the same images at every call, and with `seed=None`, the stage's seed
(`TrainedModel.sample_seed`), the n images are the first n of samples/<E>-<S>/samples.npz (on
the same kind of device). `pipeline` exports `load_run`, `load_logged_model` and `TrainedModel`,
importing this module on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.artifacts.figures import save_sample_grid
from pipeline.artifacts.logged_model import LOGGED_MODEL, load_logged_ema
from pipeline.artifacts.models import ModelError, is_ok, load_model, read_model_info, train_command
from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import UserError
from pipeline.core.params import Params, load_params
from pipeline.core.tracking import Tracker
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.measure.sampling import SAMPLE_SEED_OFFSET, generate


class UnknownRun(UserError, LookupError):
    """A run key that params.yaml does not define: names the file and its runs."""


@dataclass(frozen=True)
class TrainedModel:
    """A run's EMA U-Net (eval mode, on `device`) with what samples it: its experiment (the
    sampler of its `sample` section), its data's image shape and levels."""

    exp: ExperimentConfig = field(repr=False)
    model: torch.nn.Module = field(repr=False)
    image_shape: tuple[int, int, int]
    data_levels: int
    source: str  # the model's folder, or its MLflow model URI
    device: str = "cpu"

    @property
    def key(self) -> str:
        """`<experiment>-<seed>`, the run's key."""
        return self.exp.key

    @property
    def sample_seed(self) -> int:
        """The sample stage's seed for this run (its training seed + 1)."""
        return self.exp.seed + SAMPLE_SEED_OFFSET

    @cached_property
    def diffusion(self) -> GaussianDiffusion:
        return GaussianDiffusion.from_config(self.exp.diffusion, data_levels=self.data_levels)

    def sample(self, n: int, seed: Optional[int] = None) -> np.ndarray:
        """`n` images, uint8 n x C x H x W, drawn with the run's sampler (sample.sampler,
        steps, eta, precision) and `seed`; None is the sample stage's seed, so they are the
        first n images of samples/<E>-<S>/samples.npz."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        run = generate(self.model, self.diffusion, self.exp, self.image_shape,
                       seed=self.sample_seed if seed is None else seed, device=self.device,
                       num_samples=n, progress=False, num_progressive=0)
        return run.images

    def save_grid(self, images: np.ndarray, path: str | Path,
                  nrow: Optional[int] = None) -> Path:
        """`images` (uint8 N x C x H x W) as a PNG grid of `nrow` per row (default: as square
        as N allows), as the sample stage's grid.png; returns its path."""
        images = np.asarray(images)
        path = Path(path)
        save_sample_grid(images, path, nrow=nrow or math.ceil(math.sqrt(len(images))))
        return path


def load_run(key: str, params: str | Path = "params.yaml", models: str | Path | None = None,
             device: str = "cpu") -> TrainedModel:
    """Run `key` (`<experiment>-<seed>`) of `params` with the EMA weights its train stage wrote
    to `models`/<key>/ (default: the models/ folder beside params.yaml), on `device`. It samples
    with the sample section of `params`. A folder trained with other params (its state.json's
    config hash), or whose training diverged, is refused."""
    params_path = Path(params)
    exp = _run_of(load_params(params_path), key, params_path)
    model_dir = (params_path.parent / "models" if models is None else Path(models)) / key
    info = read_model_info(model_dir, exp)
    if not is_ok(info):
        raise ModelError(f"{model_dir}: its training diverged (status '{info.get('status')}'), "
                         "so it has no model to sample; change its train settings in "
                         f"{params_path} and rerun {train_command(exp)}")
    trained_with = info.get("config_hash")
    if trained_with is not None and trained_with != exp.config_hash():
        raise ModelError(f"{model_dir}: trained with other params than {params_path} (config "
                         f"hash {trained_with}, theirs {exp.config_hash()}); rerun "
                         f"{train_command(exp)}, or pass the params it was trained with")
    return TrainedModel(exp, load_model(exp, model_dir, "ema", device),
                        tuple(info["image_shape"]), int(info["data_levels"]), str(model_dir),
                        str(device))


def load_logged_model(model: str, params: str | Path = "params.yaml",
                      device: str = "cpu") -> TrainedModel:
    """The EMA model the train stage logged to a run's MLflow record, on `device`: `model` is
    the MLflow run's id (its `ema` model) or a model URI (`runs:/<run id>/ema`,
    `models:/<model id>`), in the tracking store of `params` (tracking.tracking_uri, or
    MLFLOW_TRACKING_URI). It samples with the experiment config it was trained with (the
    logged model's metadata): the images of `load_run` of that run."""
    params_path = Path(params)
    study = load_params(params_path)
    tracker = Tracker(study.tracking, study.study, params_path.parent)
    tracker.check_reachable()
    uri = model if ":" in model else f"runs:/{model}/{LOGGED_MODEL}"
    exp, net, metadata = load_logged_ema(tracker, uri, device)
    return TrainedModel(exp, net, tuple(metadata["image_shape"]), int(metadata["data_levels"]),
                        uri, str(device))


def _run_of(params: Params, key: str, params_path: Path) -> ExperimentConfig:
    runs = {exp.key: exp for exp in params.runs()}
    if key not in runs:
        raise UnknownRun(f"{params_path}: no run '{key}'; its runs (<experiment>-<seed>, from "
                         f"experiments and study.seeds): {', '.join(runs) or '(none)'}")
    return runs[key]
