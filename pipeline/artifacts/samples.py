"""A run's samples, `samples/<E>-<S>/samples.npz`: its writer (`save_samples`) beside its
reader (`load_samples`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.artifacts.models import ModelError
from pipeline.core.config import ExperimentConfig
from pipeline.core.errors import remake

SAMPLES_FILE = "samples.npz"


def save_samples(folder: Path, images: Optional[np.ndarray], status: str,
                 image_shape: tuple[int, ...]) -> Path:
    """samples/<E>-<S>/samples.npz: `images` (uint8 N x C x H x W; none for an unstable model)
    and the model's `status`."""
    images = np.zeros((0, *image_shape), np.uint8) if images is None else images
    path = Path(folder) / SAMPLES_FILE
    np.savez(path, images=images, status=np.array(status))
    return path


def load_samples(folder: Path, exp: ExperimentConfig) -> tuple[np.ndarray, str]:
    """(images, status) from `save_samples`' file, with an error naming the command that
    remakes it if it is missing, corrupt or not uint8 N x C x H x W."""
    path = Path(folder) / SAMPLES_FILE
    command = (f"`dvc repro sample@{exp.key}` (or `python -m stages.sample --experiment "
               f"{exp.name} --seed {exp.seed}`)")
    if not path.is_file():
        raise ModelError(f"{path}: samples not found; make them with {command}")
    try:
        with np.load(path) as f:
            images, status = f["images"], str(f["status"])
    except Exception as exc:
        raise ModelError(f"{path}: corrupt or truncated samples ({type(exc).__name__}); "
                         f"{remake(command, 'them')}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ModelError(f"{path}: expected uint8 N x C x H x W images; "
                         f"{remake(command, 'them')}")
    return images, status
