"""A trained model's folder `models/<E>-<S>/`: its writer (the train stage) and its readers.

It holds `ema.pt` and `model.pt` (U-Net state dicts), `optimizer.pt`, `state.json` (step,
status, timings, run name) and `config.yaml` (the resolved experiment config); with
`evaluate.checkpoints` set, also `ema_snapshots/ema_<step>.pt`, the EMA weights at those training
steps.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from pipeline.core.config import ExperimentConfig, checkpoint_steps
from pipeline.core.errors import UserError
from pipeline.core.io import atomic_dir, torch_load
from pipeline.core.status import Status
from pipeline.model.ema import ema_snapshot_path, ema_snapshot_steps, ema_weights
from pipeline.model.unet import build_model

# models/<E>-<S>/ema_snapshots/ema_<step>.pt: the EMA weights at the training steps scored
SNAPSHOTS_DIR = "ema_snapshots"


def train_command(exp: ExperimentConfig) -> str:
    """The commands that (re)make the trained model of `exp`."""
    return (f"`dvc repro train@{exp.key}` (or `python -m stages.train --experiment {exp.name} "
            f"--seed {exp.seed}`)")


class ModelError(UserError, RuntimeError):
    """A trained model folder that is missing or unreadable: names the file and the fix."""


def write_model_dir(out: Path, state: dict[str, Any], extra: dict[str, Any],
                    ema_snapshots: Optional[dict[int, Path]] = None) -> None:
    """Write `models/<E>/` atomically from a final training state (see `pipeline.training.loop`);
    `ema_snapshots` ({step: file}) are copied to `models/<E>-<S>/ema_snapshots/ema_<step>.pt`."""
    with atomic_dir(out) as tmp:
        torch.save(ema_weights(state["ema"]), tmp / "ema.pt")
        for step, source in (ema_snapshots or {}).items():
            target = Path(ema_snapshot_path(tmp / SNAPSHOTS_DIR, step))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        torch.save(state["model"], tmp / "model.pt")
        torch.save({"optimizer": state["optimizer"], "scheduler": state["scheduler"]},
                   tmp / "optimizer.pt")
        info = {"step": state["step"], "status": state["status"],
                "image_shape": state["image_shape"], "data_levels": state["data_levels"],
                "wall_s": state.get("wall_s"), **extra}
        (tmp / "state.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))


def wanted_ema_snapshots(exp: ExperimentConfig, folder: Path | None, steps_done: int) -> dict[int, Path]:
    """The EMA snapshots evaluate.checkpoints asks for ({step: file}); warns about missing ones
    (a diverged run stops early)."""
    wanted = exp.evaluate.checkpoints
    if wanted is None or folder is None:
        return {}
    found = ema_snapshot_steps(folder)
    steps = checkpoint_steps(exp.train) if wanted == "all" else list(wanted)
    missing = [s for s in steps if s not in found and s <= steps_done]
    if missing:
        print(f"warning: {exp.key}: no EMA snapshot for step(s) {missing} in {folder}",
              file=sys.stderr)
    return {s: found[s] for s in steps if s in found}


def read_model_info(model_dir: Path, exp: ExperimentConfig) -> dict[str, Any]:
    """models/<E>-<S>/state.json of `exp`: step, status, image shape, data levels, timings."""
    path = Path(model_dir) / "state.json"
    if not path.is_file():
        raise ModelError(f"{path}: trained model not found; make it with {train_command(exp)}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: corrupt ({exc}); rerun {train_command(exp)}") from None


def kept_ema_snapshots(model_dir: Path) -> dict[int, Path]:
    """{step: file} of the EMA snapshots kept in `models/<E>-<S>/ema_snapshots/` (may be empty)."""
    return ema_snapshot_steps(Path(model_dir) / SNAPSHOTS_DIR)


def load_model(exp: ExperimentConfig, model_dir: Path, weights: str = "ema",
               device: str | torch.device = "cpu",
               checkpoint_step: Optional[int] = None) -> torch.nn.Module:
    """The experiment's U-Net with the saved `ema` (default) or raw `model` weights, eval mode;
    with `checkpoint_step`, the EMA weights kept at that training step instead."""
    info = read_model_info(model_dir, exp)
    path = Path(model_dir) / f"{weights}.pt"
    if checkpoint_step is not None:
        path = Path(ema_snapshot_path(Path(model_dir) / SNAPSHOTS_DIR, checkpoint_step))
    try:
        state = torch_load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: weights not found; rerun "
                         + train_command(exp)) from None
    except Exception as exc:
        raise ModelError(f"{path}: corrupt or truncated weights ({type(exc).__name__}); rerun "
                         + train_command(exp)) from None
    model = build_model(exp, tuple(info["image_shape"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit the model of params.yaml "
                         f"({str(exc).splitlines()[0]}); rerun "
                         + train_command(exp)) from None
    return model.to(device).eval()


def is_ok(info: dict[str, Any]) -> bool:
    """Whether a model's state.json says it trained without diverging."""
    return info.get("status") == Status.OK


def load_weights(exp: ExperimentConfig, model_dir: Path, weights: str = "ema",
                 checkpoint_step: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The checked state dict of `load_model` (on the CPU): what a stage hands its workers."""
    return load_model(exp, model_dir, weights, "cpu", checkpoint_step).state_dict()
