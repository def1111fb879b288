"""Sample-quality metrics: FID / Inception Score / KID through torch-fidelity.

Ho et al. (2020) report FID (Heusel et al. 2017) and IS (Salimans et al. 2016) on CIFAR10 with
the Inception-v3 network; torch-fidelity's `inception-v3-compat` reproduces the TensorFlow
numbers and is what the real study uses (with a local weights file when offline).

The embedded default study runs on scikit-learn's 8x8 grey digits, where Inception features mean
nothing. There, FID / IS / KID use a small CNN classifier trained on the digits train split (its
own pipeline stage) and registered with torch-fidelity as the feature extractor
`digits-classifier`: its penultimate layer (`feat`) plays the role of Inception's pool3 features
for FID and KID, and its logits play the role of Inception's logits for IS.

torch-fidelity hands a feature extractor 3-channel uint8 NCHW batches, so every input goes
through `_UInt8ImageDataset`, which expands grey images to 3 channels.

Nothing here does work at import time: extractors are registered on first use.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.errors import UserError
from pipeline.io import atomic_path

DIGITS_EXTRACTOR = "digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = os.path.basename(URL_INCEPTION_V3)  # weights-inception-2015-12-05-6726825d.pth

# Which feature extractor measures which dataset (params.yaml `data.dataset`).
FIDELITY_EXTRACTORS = {
    "digits": DIGITS_EXTRACTOR,
    "cifar10": INCEPTION_EXTRACTOR,
    "folder": INCEPTION_EXTRACTOR,
}

CLASSIFIER_REMAKE = "`dvc repro classifier` (or `python -m stages.classifier`)"
_CHECKPOINT_FORMAT = "ddpm-study/digits-classifier"


class MetricsError(UserError, RuntimeError):
    """A metric cannot be computed: missing or unreadable weights, unusable inputs.

    The message names the file or the params.yaml key at fault and how to fix it.
    """


# --------------------------------------------------------------------------------------------
# The digits classifier (feature extractor of the embedded default study)
# --------------------------------------------------------------------------------------------


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


def _uint8_images(images: Any, what: str = "images") -> torch.Tensor:
    """A uint8 (N, C, H, W) tensor from a numpy array or tensor, checked."""
    tensor = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if tensor.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {tensor.dtype}")
    if tensor.dim() != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be N x C x H x W with C = 1 or 3, got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


def _to_unit_grey(images_uint8: torch.Tensor) -> torch.Tensor:
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
    images = _to_unit_grey(_uint8_images(train_images, "train_images"))
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
    images = _uint8_images(images)
    model.eval()
    return torch.cat([model(_to_unit_grey(images[i:i + batch_size]))
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
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_classifier(path: str | Path) -> DigitsClassifier:
    """Read a classifier written by `save_classifier`; MetricsError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: digits classifier weights not found; make them with "
                           f"{CLASSIFIER_REMAKE}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, not a torch file at all
        raise MetricsError(f"{path}: cannot read the digits classifier weights (truncated or "
                           f"corrupt: {type(exc).__name__}); remake them with {CLASSIFIER_REMAKE}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise MetricsError(f"{path}: not a digits classifier checkpoint; remake it with "
                           f"{CLASSIFIER_REMAKE}")
    try:
        model = DigitsClassifier(**checkpoint["hparams"])
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as exc:
        raise MetricsError(f"{path}: the digits classifier weights do not fit the network "
                           f"({type(exc).__name__}: {exc}); remake them with {CLASSIFIER_REMAKE}") from None
    return model.eval()


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a trained `DigitsClassifier`.

    Features: `feat` (penultimate layer; FID and KID), `logits` and `logits_unbiased` (logits
    without the output bias, the convention of inception-v3-compat; IS). The weights come from
    torch-fidelity's `feature_extractor_weights_path`.
    """

    def __init__(self, name: str, features_list: Sequence[str],
                 feature_extractor_weights_path: str | None = None, **kwargs: Any):
        super().__init__(name, list(features_list))
        if feature_extractor_weights_path is None:
            raise MetricsError(f"feature extractor '{name}' needs the digits classifier weights "
                               f"(feature_extractor_weights_path); make them with {CLASSIFIER_REMAKE}")
        self.classifier = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("feat", "logits_unbiased", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 B x 3 x H x W images, got {x.dtype} {tuple(x.shape)}")
        grey = _to_unit_grey(x)
        size = self.classifier.image_size
        if grey.shape[-2:] != (size, size):
            grey = F.interpolate(grey, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)
        feat = self.classifier.features(grey)
        head = self.classifier.head
        logits_unbiased = feat @ head.weight.T
        computed = {"feat": feat, "logits_unbiased": logits_unbiased,
                    "logits": logits_unbiased + head.bias}
        return tuple(computed[name].float() for name in self.features_list)


def register_extractor(name: str, cls: type) -> None:
    """Register a feature extractor with torch-fidelity; calling it again is a no-op.

    A class of the same module and name replaces an earlier one (a reloaded module); a different
    class under a taken name is an error.
    """
    current = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if current is cls:
        return
    if current is not None:
        same = (current.__module__, current.__qualname__) == (cls.__module__, cls.__qualname__)
        if not same:
            raise MetricsError(f"feature extractor name '{name}' is already taken by "
                               f"{current.__module__}.{current.__qualname__}")
        del FEATURE_EXTRACTORS_REGISTRY[name]
    torch_fidelity.register_feature_extractor(name, cls)


def register_digits_extractor() -> str:
    """Register `DigitsFeatureExtractor` as 'digits-classifier' (idempotent); return the name."""
    register_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)
    return DIGITS_EXTRACTOR


# --------------------------------------------------------------------------------------------
# FID / IS / KID
# --------------------------------------------------------------------------------------------


def fidelity_extractor_for(dataset: str) -> str:
    """The torch-fidelity feature extractor that measures `dataset` (params `data.dataset`)."""
    try:
        return FIDELITY_EXTRACTORS[dataset]
    except KeyError:
        raise MetricsError(f"no feature extractor for dataset '{dataset}'; "
                           f"known: {', '.join(FIDELITY_EXTRACTORS)}") from None


class _UInt8ImageDataset(Dataset):
    """Images as torch-fidelity reads them: 3-channel uint8 CHW tensors (grey expanded)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _network_reachable(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _inception_weights(weights_path: str | None, download: bool) -> str | None:
    """Resolve the inception-v3-compat weights file, or raise MetricsError before any work.

    Order: the configured file; torch hub's cache (where torch-fidelity downloads to); a download
    by torch-fidelity (returns None) when allowed and the network answers.
    """
    where = (f"download {URL_INCEPTION_V3} on a machine with network access and set "
             f"evaluate.inception_weights in params.yaml to its path")
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise MetricsError(f"evaluate.inception_weights: {weights_path}: file not found; {where}")
        return str(weights_path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    if download and _network_reachable():
        return None
    reason = "downloading is off" if not download else "the network is unreachable"
    raise MetricsError(f"evaluate.inception_weights is not set, {INCEPTION_WEIGHTS_FILE} is not in "
                       f"torch hub's cache ({cached.parent}) and {reason}; {where}")


def _weights_for(extractor: str, weights_path: str | None, download: bool) -> str | None:
    if extractor == DIGITS_EXTRACTOR:
        register_digits_extractor()
        if weights_path is None:
            raise MetricsError(f"FID / IS on digits need the digits classifier weights; make them "
                               f"with {CLASSIFIER_REMAKE}")
        load_classifier(weights_path)  # fail here, naming the file, before any work
        return str(weights_path)
    if extractor == INCEPTION_EXTRACTOR:
        return _inception_weights(weights_path, download)
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise MetricsError(f"feature extractor '{extractor}' is not registered with torch-fidelity; "
                           f"known: {', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    return None if weights_path is None else str(weights_path)


def compute_fidelity(samples_uint8: Any, reference_uint8: Any, *, extractor: str,
                     weights_path: str | None, is_splits: int = 10, kid_subset_size: int = 100,
                     batch_size: int = 256, device: str = "cpu", download: bool = False,
                     kid_subsets: int = 100, seed: int = 2020,
                     verbose: bool = False) -> dict[str, float]:
    """FID and KID of samples against reference images, and the samples' Inception Score.

    samples_uint8, reference_uint8: uint8 N x C x H x W (C = 1 or 3). `extractor` is a
    torch-fidelity feature extractor name ('digits-classifier', 'inception-v3-compat' or any
    registered one), each metric on that extractor's default feature layer. IS splits are
    clipped to the number of samples and the KID subset size to the smaller set, so small runs
    work. `download` lets torch-fidelity fetch the Inception weights when no local file is found.

    Returns {'fid', 'is_mean', 'is_std', 'kid_mean', 'kid_std'} as floats.
    """
    samples = _uint8_images(samples_uint8, "samples")
    reference = _uint8_images(reference_uint8, "reference images")
    if len(samples) < 2 or len(reference) < 2:
        raise MetricsError(f"FID / KID need at least 2 images on each side, got {len(samples)} "
                           f"samples and {len(reference)} reference images")
    resolved_weights = _weights_for(extractor, weights_path, download)
    on_gpu = torch.device(device).type == "cuda"
    metrics = torch_fidelity.calculate_metrics(
        input1=_UInt8ImageDataset(samples),
        input2=_UInt8ImageDataset(reference),
        isc=True, fid=True, kid=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=resolved_weights,
        isc_splits=max(1, min(is_splits, len(samples))),
        kid_subsets=kid_subsets,
        kid_subset_size=min(kid_subset_size, len(samples), len(reference)),
        batch_size=batch_size,
        cuda=on_gpu,
        rng_seed=seed,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
        verbose=verbose,
    )
    return {
        "fid": float(metrics[torch_fidelity.KEY_METRIC_FID]),
        "is_mean": float(metrics[torch_fidelity.KEY_METRIC_ISC_MEAN]),
        "is_std": float(metrics[torch_fidelity.KEY_METRIC_ISC_STD]),
        "kid_mean": float(metrics[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid_std": float(metrics[torch_fidelity.KEY_METRIC_KID_STD]),
    }


def extract_features(images_uint8: Any, *, extractor: str, weights_path: str | None,
                     batch_size: int = 256, device: str = "cpu",
                     download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(FID / KID features, IS logits) of uint8 N x C x H x W images: the layers that
    torch-fidelity's `extractor` uses for FID and for IS (`feat` and `logits_unbiased` of the
    digits classifier; `2048` and `logits_unbiased` of inception-v3-compat), as float64."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    images = _uint8_images(images_uint8)
    resolved_weights = _weights_for(extractor, weights_path, download)
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    layers = (cls.get_default_feature_layer_for_metric("fid"),
              cls.get_default_feature_layer_for_metric("isc"))
    on_gpu = torch.device(device).type == "cuda"
    network = create_feature_extractor(extractor, list(dict.fromkeys(layers)), cuda=on_gpu,
                                       feature_extractor_weights_path=resolved_weights,
                                       verbose=False)
    features = get_featuresdict_from_dataset(_UInt8ImageDataset(images), network, batch_size,
                                             on_gpu, True, False)
    return tuple(features[layer].double().numpy() for layer in layers)


# --------------------------------------------------------------------------------------------
# NLL in bits/dim (the variational bound of Ho et al. 2020 Eq. 5)
# --------------------------------------------------------------------------------------------


def nll_bpd(model: Any, diffusion: Any, images_uint8: Any, *, method: str = "exact",
            num_strata: int = 50, batch_size: int = 200, seed: int = 0,
            device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """Mean negative log-likelihood bound in bits/dim over `images_uint8`, with its standard
    error (over images, plus the timestep draws for the stratified estimator), and the bound of
    each image (`per_image`, float64 numpy).

    method `exact` evaluates every one of the T terms per image; `stratified` the unbiased
    K-timestep estimator (`GaussianDiffusion.nll_bpd_stratified`). `batch_size` is the
    network's batch: (image, timestep) pairs per call, so 100 images with batch_size 800 are
    evaluated at 8 timesteps per call. Always strict float32 (`matmul_precision("fp32")`: no
    TF32 on GPU), whatever precision trained the model.
    """
    from pipeline.data import to_model_range
    from pipeline.diffusion import summarize_nll
    from pipeline.precision import matmul_precision

    if method not in ("exact", "stratified"):
        raise ValueError(f"unknown NLL method '{method}'; choose exact or stratified")
    images = _uint8_images(images_uint8)
    generator = torch.Generator(device=device).manual_seed(seed)
    per_image = []
    images_per_call = max(1, min(batch_size, len(images)))
    terms_per_call = max(1, batch_size // images_per_call)
    for first in range(0, len(images), images_per_call):
        x0 = to_model_range(images[first:first + images_per_call].to(device),
                            diffusion.data_levels)
        with matmul_precision("fp32"):
            if method == "exact":
                bpd = diffusion.nll_bpd(model, x0, generator=generator, progress=progress,
                                        terms_per_call=terms_per_call)
            else:
                bpd = diffusion.nll_bpd_stratified(model, x0, num_strata, generator=generator,
                                                   terms_per_call=terms_per_call)
        per_image.append(bpd.double().cpu())
    values = torch.cat(per_image)
    mean, se = summarize_nll(values)
    return {"nll_bpd": mean, "nll_bpd_se": se, "per_image": values.numpy()}


def check_inception_weights(weights_path: str | None, download: bool) -> str:
    """The inception-v3-compat weights file to use, or MetricsError saying where to put it."""
    found = _inception_weights(weights_path, download)
    return found if found is not None else "(downloaded by torch-fidelity)"


def register_extractor_path(spec: str) -> str:
    """Import 'package.module:ClassName' (a FeatureExtractorBase subclass) and register it with
    torch-fidelity under `spec`; returns the name."""
    import importlib

    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise MetricsError(f"evaluate.feature_extractor: cannot import '{spec}' ({exc}); give "
                           "'package.module:ClassName' of a module on the Python path") from None
    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractorBase)):
        raise MetricsError(f"evaluate.feature_extractor: '{spec}' is not a torch-fidelity "
                           "FeatureExtractorBase subclass")
    register_extractor(spec, cls)
    return spec


def study_extractor(dataset: str, inception_weights: str | None, classifier_path: str | Path,
                    feature_extractor: str | None = None) -> tuple[str, str | None]:
    """(torch-fidelity extractor name, weights path) for a study: evaluate.feature_extractor if
    set, else the digits classifier (made by the `classifier` stage) for digits and
    inception-v3-compat otherwise."""
    extractor = feature_extractor or fidelity_extractor_for(dataset)
    if extractor == DIGITS_EXTRACTOR:
        return extractor, str(classifier_path)
    if extractor == INCEPTION_EXTRACTOR:
        return extractor, inception_weights
    return register_extractor_path(extractor), None
