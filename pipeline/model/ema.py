"""The exponential moving average of the U-Net's weights (Ho et al. 2020 App. B: decay 0.9999),
and its snapshots by training step in a model's folder or in storage.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from pipeline.core.io import write_to_storage


def ema_decay_at(num_averaged: int, decay: float, warmup: bool = True) -> float:
    """The EMA's decay at the update after `num_averaged` earlier ones: `decay`, or with the
    warm-up min(decay, (1 + n) / (10 + n)) (the `num_updates` rule of TensorFlow's
    ExponentialMovingAverage), so that a short run's average does not keep a large share of the
    initial, untrained weights: with decay 0.995 and no warm-up, 13.5 % of them after 400 steps."""
    if not warmup:
        return decay
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def ema_initial_weight(updates: int, decay: float, warmup: bool = True) -> float:
    """The weight of the first update's parameters in the EMA after `updates` updates: the
    product of the decays of updates 2..k (`AveragedModel` copies the first one)."""
    return math.prod(ema_decay_at(n, decay, warmup) for n in range(1, updates))


def make_ema(model: torch.nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """Exponential moving average of the weights, theta_ema <- d theta_ema + (1 - d) theta
    (Ho et al. 2020 App. B: d = 0.9999), d from `ema_decay_at`, via torch's AveragedModel
    (which starts from a copy of the first update's weights and counts its updates, so the
    warm-up carries on across a resume)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor) -> None:
        weight = 1.0 - ema_decay_at(int(num_averaged), decay, warmup)
        torch._foreach_lerp_(averaged, current, weight)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def ema_weights(ema_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The U-Net state dict inside an `AveragedModel` state dict (drops `n_averaged`)."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


def ema_snapshot_path(folder: str | Path, step: int) -> str:
    """Where the EMA weights at training step `step` are kept: <folder>/ema_<step>.pt (`folder`
    a local path or a storage URI)."""
    return f"{str(folder).rstrip('/')}/ema_{step}.pt"


def ema_snapshot_steps(folder: str | Path) -> dict[int, Path]:
    """{step: path} of the EMA snapshots in `folder` (empty if there is none)."""
    found = {}
    for path in Path(folder).glob("ema_*.pt"):
        suffix = path.stem[len("ema_"):]
        if suffix.isdigit():
            found[int(suffix)] = path
    return dict(sorted(found.items()))


def save_ema_snapshot(ema: AveragedModel, location: str | Path) -> None:
    """Write the EMA weights (a plain U-Net state dict, as models/<E>/ema.pt) atomically, to a
    local path or into storage (`pipeline.core.io.write_to_storage`)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in ema_weights(ema.state_dict()).items()}, buffer)
    write_to_storage(location, buffer.getvalue())
