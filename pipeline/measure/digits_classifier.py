"""The digits classifier: the feature extractor of FID / IS / KID on the embedded digits.

Inception features mean nothing on scikit-learn's 8x8 grey digits. There, a small CNN trained
on the digits train split (the `classifier` stage) is the feature extractor `digits-classifier`
(registered with torch-fidelity by `pipeline.measure.extractors`): its penultimate layer (`feat`)
plays the role of
Inception's pool3 features for FID and KID, and its logits play the role of Inception's logits
for IS. Its weights file is written by `save_classifier` and read by `load_classifier`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.errors import UserError, remake
from pipeline.core.io import atomic_path, torch_load
from pipeline.data.datasets import uint8_images


class ClassifierError(UserError, RuntimeError):
    """The digits classifier's weights are missing, unreadable or not a classifier's; the message
    names the file and the command that remakes it."""


CLASSIFIER_REMAKE = "`dvc repro classifier` (or `python -m stages.classifier`)"
CLASSIFIER_FILE = "classifier.pt"  # in the classifier stage's folder, models/classifier/


def classifier_path(models_dir: str | Path) -> Path:
    """The digits classifier's weights file among the study's models (`models/`)."""
    return Path(models_dir) / "classifier" / CLASSIFIER_FILE


_CHECKPOINT_FORMAT = "ddpm-study/digits-classifier"


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 grey digits: three 3x3 conv layers, a dense `feat` layer, 10 logits.

    Input: float images (B, 1, image_size, image_size) with values in [0, 1].
    """

    def __init__(self, image_size: int = 8, width: int = 16, feat_dim: int = 128,
                 num_classes: int = 10):
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {image_size}")
        self.hparams = dict(image_size=image_size, width=width, feat_dim=feat_dim,
                            num_classes=num_classes)
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (image_size // 4) ** 2
        self.feat = nn.Sequential(nn.Flatten(), nn.Linear(flat, feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, num_classes)

    @property
    def image_size(self) -> int:
        return self.hparams["image_size"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feat_dim): the analogue of Inception's pool3 for FID / KID."""
        return self.feat(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_unit_grey(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, 1, H, W) in [0, 1], averaging colour channels."""
    return images_uint8.float().mean(dim=1, keepdim=True) / 255.0


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by an independent integer offset in [-max_shift, max_shift]^2."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator)
    rows = offsets[0][:, None] + torch.arange(height)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(width)  # (B, W)
    index = torch.arange(batch)[:, None, None]
    return padded[index, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@contextlib.contextmanager
def _intra_op_threads(num_threads: int):
    """Run torch ops on `num_threads` threads, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_digits_classifier(train_images: Any, train_labels: Any, *, steps: int, seed: int,
                            batch_size: int = 128, lr: float = 2e-3,
                            weight_decay: float = 1e-4) -> DigitsClassifier:
    """Train the digits feature extractor with Adam (cosine-decayed lr) and +-1 pixel shifts.

    train_images: uint8 (N, 1, H, W); train_labels: integer class labels (N,). Deterministic for
    a given seed: initialization runs under a forked, seeded global RNG, and minibatches and
    shifts are drawn from an explicit generator. Training runs on one CPU thread: on 8x8 inputs
    intra-op parallelism costs more than it saves (several times slower on a busy 2-core
    machine). Returns the model in eval mode, on the CPU.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    images = to_unit_grey(uint8_images(train_images, "train_images"))
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    if labels.shape != (len(images),):
        raise ValueError(f"train_labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    num_classes = max(10, int(labels.max()) + 1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(image_size=images.shape[-1], num_classes=num_classes)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    model.train()
    with _intra_op_threads(1):
        for _ in range(steps):
            index = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
            x = _random_shift(images[index], generator)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def classifier_predict(model: DigitsClassifier, images: Any, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, num_classes) of uint8 images (N, C, H, W)."""
    images = uint8_images(images)
    model.eval()
    return torch.cat([model(to_unit_grey(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])


def classifier_accuracy(model: DigitsClassifier, images: Any, labels: Any) -> float:
    """Top-1 accuracy of the classifier on uint8 images (N, C, H, W) with integer labels."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    predicted = classifier_predict(model, images).argmax(dim=1)
    return float((predicted == labels).float().mean())


def save_classifier(model: DigitsClassifier, path: str | Path) -> None:
    """Write the classifier (state_dict + architecture hyper-parameters) atomically."""
    checkpoint = {
        "format": _CHECKPOINT_FORMAT,
        "hparams": dict(model.hparams),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    buffer = io.BytesIO()  # saved to a buffer, the zip's entries are named alike in every run
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_classifier(path: str | Path) -> DigitsClassifier:
    """Read a classifier written by `save_classifier`; ClassifierError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"{path}: digits classifier weights not found; make them with "
                              f"{CLASSIFIER_REMAKE}")
    try:
        checkpoint = torch_load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, not a torch file at all
        raise ClassifierError(f"{path}: cannot read the digits classifier weights (truncated or "
                              f"corrupt: {type(exc).__name__}); "
                              f"{remake(CLASSIFIER_REMAKE, 'them')}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise ClassifierError(f"{path}: not a digits classifier checkpoint; "
                              f"{remake(CLASSIFIER_REMAKE)}")
    try:
        model = DigitsClassifier(**checkpoint["hparams"])
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as exc:
        raise ClassifierError(f"{path}: the digits classifier weights do not fit the network "
                              f"({type(exc).__name__}: {exc}); "
                              f"{remake(CLASSIFIER_REMAKE, 'them')}") from None
    return model.eval()
