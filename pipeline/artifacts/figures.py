"""Figures people look at: sample grids, progressive generation (Ho et al. Fig. 6), loss curves,
FID and NLL over training.

Matplotlib with the non-interactive Agg backend; every file is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from pipeline.core.io import atomic_path
from pipeline.core.status import Status
from pipeline.core.sweep_axes import SWEEP_AXES, SweepAxis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """Tile uint8 N x C x H x W images into one H' x W' x C array, `nrow` per row, 1px gaps."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = \
            images[i].transpose(1, 2, 0)
    return canvas


def save_sample_grid(images: np.ndarray, path: Path, nrow: int, title: Optional[str] = None,
                     min_pixels: int = 640) -> None:
    """A grid of uint8 N x C x H x W images, nearest-neighbour upscaled to be readable."""
    tile = grid(images, nrow)
    scale = max(1, min_pixels // max(tile.shape[:2]))
    tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
    mode = "L" if tile.shape[2] == 1 else "RGB"
    image = Image.fromarray(tile[:, :, 0] if mode == "L" else tile, mode)
    if title:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 7.4), dpi=100)
        ax.imshow(np.asarray(image), cmap="gray" if mode == "L" else None,
                  interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(title, fontsize=11)
        ax.axis("off")
        _save(fig, path, plt)
        return
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_progressive(progressive: np.ndarray, timesteps: Sequence[int], path: Path,
                     title: str) -> None:
    """Predicted x0 of K samples (rows) at S times (columns, t from T down to 1): Fig. 6."""
    plt = _pyplot()
    k, s = progressive.shape[:2]
    fig, axes = plt.subplots(k, s, figsize=(1.1 * s, 1.1 * k + 0.6), dpi=100, squeeze=False)
    for i in range(k):
        for j in range(s):
            img = progressive[i, j].transpose(1, 2, 0)
            ax = axes[i, j]
            if img.shape[2] == 1:
                ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t={timesteps[j] + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, plt)


def save_placeholder(path: Path, message: str) -> None:
    """A figure that says why there is nothing to show (e.g. a diverged run)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 2), dpi=100)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, wrap=True)
    ax.axis("off")
    _save(fig, path, plt)


def save_image_panels(panels: Sequence[tuple[str, Path]], path: Path, columns: int = 3,
                      title: Optional[str] = None) -> None:
    """Several images (e.g. the runs' sample grids) side by side, one titled panel each."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows + 0.4), dpi=100,
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image_path) in zip(axes.ravel(), panels):
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert("RGB"))
        ax.imshow(pixels, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path, plt)


def save_loss_curves(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path,
                     title: str = "training loss") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite loss curves", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3)
    _save(fig, path, plt)


def save_scores_over_training(steps: Sequence[int], fid: Sequence[float],
                              nll_bpd: Sequence[float], path: Path, title: str,
                              best_step: Optional[int] = None,
                              note: Optional[str] = None) -> None:
    """FID (left axis) and the NLL bound in bits/dim (right axis) by training step, the step
    with the best FID marked (the checkpoint the paper reports)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if len(steps):
        ax.plot(steps, fid, "o-", color="tab:blue", label="FID")
        right = ax.twinx()
        right.plot(steps, nll_bpd, "s--", color="tab:orange", label="NLL (bits/dim)")
        right.set_ylabel("NLL bound (bits/dim)", color="tab:orange")
        right.tick_params(axis="y", colors="tab:orange")
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", alpha=0.5, linestyle=":")
            ax.annotate(f"best FID at step {best_step}", xy=(best_step, min(fid)),
                        xytext=(4, 8), textcoords="offset points", fontsize=8,
                        color="tab:green")
        if len(steps) == 1:  # one point (the final model): say its values, the markers overlap
            ax.annotate(f"FID {fid[0]:.4g}, NLL {nll_bpd[0]:.4g} bits/dim", xy=(steps[0], fid[0]),
                        xytext=(8, -16), textcoords="offset points", fontsize=9)
        lines = ax.get_lines()[:1] + right.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no scores (the model diverged)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("FID", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    ax.set_title(title, fontsize=10)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.35")
    ax.grid(alpha=0.3)
    _save(fig, path, plt)


def save_sampling_steps(frame, path: Path,
                        title: str = "sample quality against sampling steps") -> None:
    """Two panels from `pipeline.reporting.steps_table`'s raw rows (run, sampler, steps, each
    score with `_low` / `_high`): FID, and precision and recall, against the number of sampling
    steps (log scale); DDIM as a line per run with its 95 % intervals, ancestral sampling at
    all T steps as a star."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    if len(frame) == 0:
        left.text(0.5, 0.5, "no run measured (sampling_steps.experiments is empty, or the runs "
                  "diverged)", ha="center", va="center", transform=left.transAxes, fontsize=8)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (run, rows) in enumerate(frame.groupby("run", sort=False)):
        colour = colours[k % len(colours)]
        for ax, scores in ((left, ("fid",)), (right, ("precision", "recall"))):
            for score, style in zip(scores, ("-", "--")):
                for sampler, marker in (("ddim", "o"), ("ancestral", "*")):
                    part = rows[rows["sampler"] == sampler]
                    if part.empty:
                        continue
                    error = np.abs(part[[f"{score}_low", f"{score}_high"]].to_numpy().T
                                   - part[score].to_numpy())
                    label = " ".join([run, *([score] if len(scores) > 1 else []), sampler])
                    ax.errorbar(part["steps"], part[score], yerr=error, fmt=marker + style,
                                color=colour, capsize=3, markersize=9 if marker == "*" else 5,
                                label=label)
    ticks = sorted(set(int(v) for v in frame["steps"])) if len(frame) else []
    for ax, label in ((left, "FID"), (right, "precision / recall")):
        ax.set_xscale("log")
        if ticks:  # the measured counts, as numbers
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        if ax.get_lines():
            ax.legend(fontsize=7, loc="best")
    right.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, plt)


def save_sweep_heatmap(cells, path: Path, title: Optional[str] = None,
                       axes: Sequence[SweepAxis] = SWEEP_AXES) -> None:
    """Heat map of the sweep's FID from `pipeline.reporting.sweep_report.sweep_raw`: the first
    axis's values (schedules) are the rows, the other axes' (weightings) the columns, joined
    with " / " where there are several. Each cell is annotated with its FID and NLL (bits/dim);
    cells stopped at a rung (NLL only) and unstable cells ("–") are grey."""
    plt = _pyplot()
    names = [axis.name for axis in axes]
    title = title or f"sweep: FID by {' x '.join(names)}"
    row_of = [str(v) for v in cells[names[0]]]
    column_of = [" / ".join(map(str, c)) for c in zip(*(cells[n] for n in names[1:]))]
    schedules = list(dict.fromkeys(row_of))
    weightings = list(dict.fromkeys(column_of))
    fid = np.full((len(schedules), len(weightings)), np.nan)
    notes = [[""] * len(weightings) for _ in schedules]
    for row, first, rest in zip(cells.to_dict("records"), row_of, column_of):
        i, j = schedules.index(first), weightings.index(rest)
        if row["status"] == Status.OK and np.isfinite(row["fid"]):
            fid[i, j] = row["fid"]
            nll = f"\n{row['nll_bpd']:.2f} bpd" if np.isfinite(row["nll_bpd"]) else ""
            notes[i][j] = f"{row['fid']:.1f}{nll}"
        elif row["status"] == Status.STOPPED:
            nll = f"\n{row['nll_bpd']:.2f} bpd" if np.isfinite(row["nll_bpd"]) else ""
            notes[i][j] = f"stopped{nll}"
        else:
            notes[i][j] = "–"
    fig, ax = plt.subplots(figsize=(1.5 * len(weightings) + 2.5, 0.9 * len(schedules) + 1.6),
                           dpi=100)
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="#d9d9d9")
    finite = fid[np.isfinite(fid)]
    image = ax.imshow(np.ma.masked_invalid(fid), cmap=cmap, aspect="auto",
                      vmin=finite.min() if finite.size else None,
                      vmax=finite.max() if finite.size else None)
    for i in range(len(schedules)):
        for j in range(len(weightings)):
            value = fid[i, j]
            dark = np.isfinite(value) and finite.size and \
                value > finite.min() + 0.5 * (finite.max() - finite.min())
            ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(weightings)), weightings)
    ax.set_yticks(range(len(schedules)), schedules)
    ax.set_xlabel(" / ".join(axis.label for axis in axes[1:]))
    ax.set_ylabel(axes[0].label)
    ax.set_title(title)
    if finite.size:
        fig.colorbar(image, ax=ax, label="FID (lower is better)")
    _save(fig, path, plt)


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
