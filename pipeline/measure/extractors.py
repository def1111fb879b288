"""Feature extractors: the networks whose features and logits FID, IS and KID are computed from.

Ho et al. (2020) report FID (Heusel et al. 2017) and IS (Salimans et al. 2016) on CIFAR10 with
the Inception-v3 network; torch-fidelity's `inception-v3-compat` reproduces the TensorFlow
numbers and is what the real study uses (with a local weights file when offline).

The embedded default study runs on scikit-learn's 8x8 grey digits, where Inception features mean
nothing. There, the features come from the small CNN of `pipeline.measure.digits_classifier` (trained in
its own stage), wrapped here as the torch-fidelity extractor `digits-classifier`
(`DigitsFeatureExtractor`). `resolve_extractor` picks a study's extractor and checks its
weights, in one place; `FeatureNetwork` runs it over images (the evaluate stage's chunks), and
the scores are computed from those features by `pipeline.measure.stats`; `fidelity_of` does
both for two image sets in this process.

torch-fidelity hands a feature extractor 3-channel uint8 NCHW batches, so every input goes
through `_UInt8ImageDataset`, which expands grey images to 3 channels.

Nothing here does work at import time: extractors are registered on first use.
"""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.core.config import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR
from pipeline.core.dataset_specs import DATASET_SPECS
from pipeline.core.errors import UserError
from pipeline.data.datasets import uint8_images
from pipeline.measure.digits_classifier import CLASSIFIER_REMAKE, load_classifier, to_unit_grey
from pipeline.measure.stats import (KID_MAX_IMAGES, FeatureMoments, KernelReference,
                                    frechet_distance, inception_score_of, kid_subset)

INCEPTION_WEIGHTS_FILE = os.path.basename(URL_INCEPTION_V3)  # weights-inception-2015-12-05-6726825d.pth



class MetricsError(UserError, RuntimeError):
    """A metric cannot be computed: missing or unreadable weights, unusable inputs.

    The message names the file or the params.yaml key at fault and how to fix it.
    """


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


# --------------------------------------------------------------------------------------------
# FID / IS / KID
# --------------------------------------------------------------------------------------------


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


class FeatureNetwork:
    """A study's feature extractor, built once (in a worker) and run on uint8 N x C x H x W
    images: the layers that torch-fidelity's `extractor` uses for FID / KID and for IS (`feat`
    and `logits_unbiased` of the digits classifier; `2048` and `logits_unbiased` of
    inception-v3-compat), in batches of `batch_size`, as float32 numpy arrays (as computed)."""

    def __init__(self, extractor: str, weights_path: str | None, device: str = "cpu",
                 batch_size: int = 256):
        from torch_fidelity.utils import create_feature_extractor

        ensure_registered(extractor)
        cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
        self.layers = (cls.get_default_feature_layer_for_metric("fid"),
                       cls.get_default_feature_layer_for_metric("isc"))
        self.on_gpu = torch.device(device).type == "cuda"
        self.batch_size = batch_size
        self.network = create_feature_extractor(
            extractor, list(dict.fromkeys(self.layers)), cuda=self.on_gpu,
            feature_extractor_weights_path=weights_path, verbose=False)

    @classmethod
    def from_bytes(cls, extractor: str, weights: bytes | None,
                   device: str = "cpu") -> "FeatureNetwork":
        """The network with its weights handed over as bytes (a worker of another node cannot
        read the driver's file): written to a temporary file that torch-fidelity loads, and
        removed once it has."""
        if weights is None:
            return cls(extractor, None, device)
        with tempfile.TemporaryDirectory(prefix="ddpm-extractor-") as folder:
            path = Path(folder) / "weights.pt"
            path.write_bytes(weights)
            return cls(extractor, str(path), device)

    def __call__(self, images_uint8: Any) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) of the images."""
        from torch_fidelity.utils import get_featuresdict_from_dataset

        images = uint8_images(images_uint8)
        features = get_featuresdict_from_dataset(_UInt8ImageDataset(images), self.network,
                                                 self.batch_size, self.on_gpu, True, False)
        return tuple(features[layer].float().numpy() for layer in self.layers)


def fidelity_of(samples_uint8: Any, reference_uint8: Any, *, extractor: str,
                weights_path: str | None, is_splits: int = 1, device: str = "cpu",
                download: bool = False) -> dict[str, float]:
    """{"fid", "is_mean", "kid_mean"} of samples against reference images, computed here
    through the study's one path (`pipeline.measure.stats`: FID from feature sums, IS from class
    probability sums, KID over at most KID_MAX_IMAGES images each side); values only, no
    standard errors. uint8 N x C x H x W images (C = 1 or 3), at least 2 on each side."""
    samples = uint8_images(samples_uint8, "samples")
    reference = uint8_images(reference_uint8, "reference images")
    if len(samples) < 2 or len(reference) < 2:
        raise MetricsError(f"FID / KID need at least 2 images on each side, got {len(samples)} "
                           f"samples and {len(reference)} reference images")
    network = FeatureNetwork(extractor, _weights_for(extractor, weights_path, download), device)
    features, logits = network(samples)
    reference_features, _ = network(reference)
    kernel = KernelReference(reference_features[kid_subset(len(reference_features))])
    k_xx, sums = kernel.prepare(features[:KID_MAX_IMAGES])
    return {"fid": frechet_distance(FeatureMoments.of(features),
                                    FeatureMoments.of(reference_features)),
            "is_mean": inception_score_of(logits, is_splits),
            "kid_mean": kernel.distance(k_xx, sums, np.arange(len(k_xx)))}


def register_extractor_path(spec: str) -> str:
    """Import 'package.module:ClassName' (a FeatureExtractorBase subclass) and register it with
    torch-fidelity under `spec`; returns the name."""
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


def extractor_name(dataset: str, feature_extractor: str | None = None) -> str:
    """The torch-fidelity feature extractor that measures a study: evaluate.feature_extractor if
    set, else the one for its dataset (the digits classifier for digits, inception-v3-compat
    otherwise)."""
    if feature_extractor is not None:
        return feature_extractor
    try:
        return DATASET_SPECS[dataset].extractor
    except KeyError:
        raise MetricsError(f"no feature extractor for dataset '{dataset}'; "
                           f"known: {', '.join(DATASET_SPECS)}") from None


def resolve_extractor(dataset: str, evaluate, classifier_path: str | Path,
                      download: bool) -> tuple[str, str | None]:
    """(extractor name, weights file) of a study (`evaluate`: its EvaluateConfig), checked before
    any work: the digits classifier at `classifier_path` loads, the inception-v3-compat weights
    are found (None: torch-fidelity downloads them), a 'package.module:Class' extractor imports
    and is registered. MetricsError, naming the file or key and the fix, otherwise."""
    name = extractor_name(dataset, evaluate.feature_extractor)
    if name == DIGITS_EXTRACTOR:
        return name, _weights_for(name, str(classifier_path), download)
    if name == INCEPTION_EXTRACTOR:
        return name, _inception_weights(evaluate.inception_weights, download)
    return register_extractor_path(name), None


def ensure_registered(name: str) -> None:
    """Register extractor `name` with torch-fidelity in this process (a Ray worker), as
    `resolve_extractor` did in the driver."""
    if name == DIGITS_EXTRACTOR:
        register_digits_extractor()
    elif name not in FEATURE_EXTRACTORS_REGISTRY:
        register_extractor_path(name)


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
                               f"(feature_extractor_weights_path); make them with "
                               f"{CLASSIFIER_REMAKE}")
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
        grey = to_unit_grey(x)
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


def register_digits_extractor() -> str:
    """Register `DigitsFeatureExtractor` as 'digits-classifier' (idempotent); return the name."""
    register_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)
    return DIGITS_EXTRACTOR
