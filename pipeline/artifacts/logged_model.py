"""A run's EMA model in its MLflow record: the logged model `ema` of the run, its writer (the
train stage's record, `log_ema_model`) beside its reader (`load_logged_ema`).

It is the U-Net of models/<E>-<S>/ with the EMA weights of `ema.pt`, in MLflow's pt2 format
(`pipeline.core.tracking.Tracker.log_torch_model`), so that `mlflow.pytorch.load_model(
"runs:/<run id>/ema")` loads it without the project's code. Its metadata holds what sampling it
needs beside the weights: the resolved experiment config, the image shape and the data's levels
(and the run's key, its training step and config hash), so that it samples without params.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.artifacts.models import ModelError, load_model, read_model_info
from pipeline.core.config import ExperimentConfig
from pipeline.core.tracking import TAG_EXPERIMENT, TAG_SEED
from pipeline.model.unet import build_model

if TYPE_CHECKING:
    from pipeline.core.tracking import Tracker

# The name of a run's EMA model among its MLflow run's logged models: runs:/<run id>/ema
LOGGED_MODEL = "ema"


def log_ema_model(tracker: Tracker, run_id: str, exp: ExperimentConfig, model_dir: Path) -> str:
    """Log the EMA U-Net of models/<E>-<S>/ (`load_model`) to the run's MLflow record as its
    logged model `ema`, with what sampling it needs as metadata; returns the model's URI."""
    info = read_model_info(model_dir, exp)
    model = load_model(exp, model_dir)
    shape = tuple(info["image_shape"])
    example = {"x_t": torch.zeros(2, *shape), "t": torch.zeros(2, dtype=torch.long)}  # a batch
    metadata = {"run": exp.key, "step": info["step"], "image_shape": list(shape),
                "data_levels": info["data_levels"], "config_hash": exp.config_hash(),
                "config": exp.to_dict()}
    return tracker.log_torch_model(run_id, model, LOGGED_MODEL, example, metadata=metadata,
                                   tags={TAG_EXPERIMENT: exp.name, TAG_SEED: exp.seed})


def load_logged_ema(tracker: Tracker, model_uri: str, device: str | torch.device = "cpu"
                    ) -> tuple[ExperimentConfig, torch.nn.Module, dict[str, Any]]:
    """The run's experiment, its EMA U-Net (eval mode, on `device`) and the logged model's
    metadata (`log_ema_model`), from the logged model at `model_uri`: the weights that
    `mlflow.pytorch.load_model` loads, in the experiment's U-Net (`build_model`), which then
    samples as the one of models/<E>-<S>/ does."""
    logged, metadata = tracker.load_torch_model(model_uri)
    if "config" not in metadata:
        raise ModelError(f"{model_uri}: not a model the train stage logged (its metadata holds "
                         f"no experiment config); load a run's `{LOGGED_MODEL}` model, "
                         f"runs:/<run id>/{LOGGED_MODEL}")
    exp = ExperimentConfig.from_dict(metadata["config"])
    model = build_model(exp, tuple(metadata["image_shape"]))
    try:
        model.load_state_dict(logged.state_dict())
    except RuntimeError as exc:
        raise ModelError(f"{model_uri}: its weights do not fit this checkout's U-Net of its "
                         f"config ({str(exc).splitlines()[0]}); load it from a checkout of the "
                         "commit it was trained with (its run's git.commit tag)") from None
    return exp, model.to(device).eval(), metadata
