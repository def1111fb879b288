"""plots/loss/<experiment>-<seed>.csv: a run's training loss by step, written by the train stage
(`save_loss_curve`), read by `tabulate` (`load_loss_curve`) for results/loss_curves.png and for
plots/loss.csv, every run's curve in the one file DVC charts.

    step,loss
    50,0.08574053391814232

One row per logged step; the loss as Python's repr of the float, so it reads back exactly. A
diverged run's last rows hold `nan` or `inf`; the reader drops them.

Kept apart from the other results files so the train stage's imports (and its DVC deps) gain
this file only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from pipeline.core.errors import UserError
from pipeline.core.io import write_text

HEADER = "step,loss"


def loss_curve_path(plots_dir: str | Path, run_key: str) -> Path:
    """The loss curve of run `run_key` (<experiment>-<seed>) in the plots folder (plots/loss)."""
    return Path(plots_dir) / f"{run_key}.csv"


class LossCurveError(UserError, ValueError):
    """A loss curve file that cannot be read; the message names the file and what is wrong."""


def save_loss_curve(path: str | Path, history: Iterable[tuple[int, float]]) -> None:
    """Write (step, loss) pairs atomically; the loss as its repr, non-finite values included."""
    write_text(path, f"{HEADER}\n" + "".join(f"{s},{v!r}\n" for s, v in history))


def load_loss_curve(path: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of `save_loss_curve`'s file, rows with a non-finite loss left out."""
    steps: list[int] = []
    losses: list[float] = []
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise LossCurveError(f"{path}: not a loss curve (first line {lines[:1]}, expected "
                             f"{HEADER!r})")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            step, loss = line.split(",")
            value, step = float(loss), int(step)
        except ValueError as exc:
            raise LossCurveError(f"{path}: not a loss curve (line {number}: {exc})") from None
        if math.isfinite(value):
            steps.append(step)
            losses.append(value)
    return steps, losses
