"""Figures people look at: sample grids, progressive generation (Ho et al. Fig. 6), loss curves.

Matplotlib with the non-interactive Agg backend; every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.io import atomic_path
from pipeline.sampling import grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_sample_grid(images: np.ndarray, path: Path, nrow: int, title: Optional[str] = None,
                     min_pixels: int = 640) -> None:
    """A grid of uint8 N x C x H x W images, nearest-neighbour upscaled to be readable."""
    from PIL import Image

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


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
