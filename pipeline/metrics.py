"""Sample-quality metrics: FID / Inception Score / KID through torch-fidelity.

Ho et al. (2020) report FID (Heusel et al. 2017) and IS (Salimans et al. 2016) on CIFAR10 with
the Inception-v3 network; torch-fidelity's `inception-v3-compat` reproduces the TensorFlow
numbers and is what the real study uses (with a local weights file when offline).

The embedded default study runs on scikit-learn's 8x8 grey digits, where Inception features mean
nothing. There, FID / IS / KID use a small CNN classifier trained on the digits train split
(`pipeline.classifier`, its own pipeline stage), registered with torch-fidelity as the feature
extractor `digits-classifier`. `resolve_extractor` picks a study's extractor and checks its
weights, in one place.

torch-fidelity hands a feature extractor 3-channel uint8 NCHW batches, so every input goes
through `_UInt8ImageDataset`, which expands grey images to 3 channels.

Nothing here does work at import time: extractors are registered on first use.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.errors import UserError

DIGITS_EXTRACTOR = "digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = os.path.basename(URL_INCEPTION_V3)  # weights-inception-2015-12-05-6726825d.pth

# Which feature extractor measures which dataset (params.yaml `data.dataset`).
FIDELITY_EXTRACTORS = {
    "digits": DIGITS_EXTRACTOR,
    "cifar10": INCEPTION_EXTRACTOR,
    "folder": INCEPTION_EXTRACTOR,
}


class MetricsError(UserError, RuntimeError):
    """A metric cannot be computed: missing or unreadable weights, unusable inputs.

    The message names the file or the params.yaml key at fault and how to fix it.
    """


def uint8_images(images: Any, what: str = "images") -> torch.Tensor:
    """A uint8 (N, C, H, W) tensor from a numpy array or tensor, checked."""
    tensor = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if tensor.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {tensor.dtype}")
    if tensor.dim() != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be N x C x H x W with C = 1 or 3, got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


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
        from pipeline.classifier import CLASSIFIER_REMAKE, load_classifier, register_digits_extractor

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

    def __call__(self, images_uint8: Any) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) of the images."""
        from torch_fidelity.utils import get_featuresdict_from_dataset

        images = uint8_images(images_uint8)
        features = get_featuresdict_from_dataset(_UInt8ImageDataset(images), self.network,
                                                 self.batch_size, self.on_gpu, True, False)
        return tuple(features[layer].float().numpy() for layer in self.layers)


def extract_features(images_uint8: Any, *, extractor: str, weights_path: str | None,
                     batch_size: int = 256, device: str = "cpu",
                     download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(FID / KID features, IS logits) of uint8 N x C x H x W images in this process, with the
    extractor's weights resolved and checked first (`FeatureNetwork`)."""
    network = FeatureNetwork(extractor, _weights_for(extractor, weights_path, download), device,
                             batch_size)
    return network(images_uint8)


def fidelity_of(samples_uint8: Any, reference_uint8: Any, *, extractor: str,
                weights_path: str | None, is_splits: int = 1, device: str = "cpu",
                download: bool = False) -> dict[str, float]:
    """{"fid", "is_mean", "kid_mean"} of samples against reference images, computed here
    through the study's one path (`pipeline.stats`: FID from feature sums, IS from class
    probability sums, KID over at most KID_MAX_IMAGES images each side); values only, no
    standard errors. uint8 N x C x H x W images (C = 1 or 3), at least 2 on each side."""
    from pipeline.stats import (KID_MAX_IMAGES, FeatureMoments, KernelReference,
                                frechet_distance, inception_score_of, kid_subset)

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


# --------------------------------------------------------------------------------------------
# NLL in bits/dim (the variational bound of Ho et al. 2020 Eq. 5), in parts
# --------------------------------------------------------------------------------------------


NLL_CALLS_PER_PART = 25  # network calls of one part of the bound: the unit of work of a worker


@dataclass(frozen=True)
class NllPart:
    """A part of the bound of a set of images: images `first` .. `first + count - 1`, terms
    `term_first` .. `term_first + term_count - 1` of the method's term order (exact: t = T-1
    down to 0; stratified: strata 0..K-1), and L_T where `term_first` is 0."""

    first: int
    count: int
    term_first: int
    term_count: int


def nll_layout(num_images: int, batch_size: int) -> tuple[int, int]:
    """(images, terms) per network call: `batch_size` (image, term) pairs, as many images as
    fit (all of them, or `batch_size`), the rest of the batch filled with terms."""
    images_per_call = max(1, min(batch_size, num_images))
    return images_per_call, max(1, batch_size // images_per_call)


def nll_parts(num_images: int, num_terms: int, batch_size: int,
              calls_per_part: int = NLL_CALLS_PER_PART) -> list[NllPart]:
    """The parts of the bound of `num_images` images with `num_terms` terms each: blocks of the
    images of one network call x blocks of `calls_per_part` calls' terms, images outermost.
    They depend on the sizes alone, so each image's network calls (and so its floats) are the
    same whoever computes which part, in whatever order."""
    images_per_call, terms_per_call = nll_layout(num_images, batch_size)
    terms_per_part = terms_per_call * calls_per_part
    return [NllPart(first, min(images_per_call, num_images - first), term_first,
                    min(terms_per_part, num_terms - term_first))
            for first in range(0, num_images, images_per_call)
            for term_first in range(0, num_terms, terms_per_part)]


def nll_term_order(diffusion: Any, method: str, num_strata: int) -> list[int]:
    """The terms of `method` in the order they are summed: timesteps T-1..0, or strata."""
    if method == "exact":
        return list(range(diffusion.num_timesteps - 1, -1, -1))
    return list(range(diffusion.num_bound_terms(method, num_strata)))


def nll_part(model: Any, diffusion: Any, images_uint8: Any, part: NllPart, *,
             method: str, num_strata: int, terms_per_call: int, seed: int,
             device: str | torch.device = "cpu") -> np.ndarray:
    """The part `part` of the bound of each of its images (`images_uint8` are all the images,
    or just the part's), in bits/dim, float64: the sum of its terms, plus L_T where it holds
    term 0, `terms_per_call` terms of its images per network call (`nll_layout` of the whole
    set). Term j of image i draws its x_t from a generator of its own, seeded by ("nll",
    seed, i * J + j) (J terms per image), so a part's values do not depend on the others.
    Always strict float32 (`matmul_precision("fp32")`: no TF32 on GPU)."""
    from pipeline.data import to_model_range
    from pipeline.precision import matmul_precision
    from pipeline.seeding import item_generators

    images = uint8_images(images_uint8)
    if len(images) > part.count:
        images = images[part.first:part.first + part.count]
    order = nll_term_order(diffusion, method, num_strata)
    position = {term: j for j, term in enumerate(order)}
    num_terms = len(order)
    terms = order[part.term_first:part.term_first + part.term_count]
    indices = range(part.first, part.first + part.count)

    def generators(term: int):
        return item_generators("nll", seed, [i * num_terms + position[term] for i in indices],
                               device)

    x0 = to_model_range(images.to(device), diffusion.data_levels)
    with matmul_precision("fp32"):
        if method == "exact":
            bpd = diffusion.nll_bpd(model, x0, generator=generators, terms=terms,
                                    terms_per_call=terms_per_call)
        else:
            bpd = diffusion.nll_bpd_stratified(model, x0, num_strata, generator=generators,
                                               strata=terms, terms_per_call=terms_per_call)
        if part.term_first == 0:
            bpd = diffusion.prior_bpd(x0.double()) + bpd
    return bpd.cpu().numpy()


def assemble_nll(parts: list[NllPart], values: list[np.ndarray], num_images: int) -> np.ndarray:
    """Each image's bound from its parts' values (`values[k]` of `parts[k]`), summed in term
    order: the same floats whichever worker made which part."""
    per_image = np.zeros(num_images, dtype=np.float64)
    for part, value in sorted(zip(parts, values), key=lambda pv: (pv[0].first,
                                                                   pv[0].term_first)):
        per_image[part.first:part.first + part.count] += value
    return per_image


def nll_bpd(model: Any, diffusion: Any, images_uint8: Any, *, method: str = "exact",
            num_strata: int = 50, batch_size: int = 200, seed: int = 0,
            device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """Mean negative log-likelihood bound in bits/dim over `images_uint8`, with its standard
    error (over images, plus the timestep draws for the stratified estimator), and the bound of
    each image (`per_image`, float64 numpy), computed here part by part (`nll_parts`): the
    same numbers as the evaluate stage's workers give.

    method `exact` evaluates every one of the T terms per image; `stratified` the unbiased
    K-timestep estimator (`GaussianDiffusion.nll_bpd_stratified`). `batch_size` is the
    network's batch: (image, timestep) pairs per call, so 100 images with batch_size 800 are
    evaluated at 8 timesteps per call.
    """
    from pipeline.diffusion import summarize_nll
    from pipeline.progress import progress_bar

    images = uint8_images(images_uint8)
    parts = nll_parts(len(images), diffusion.num_bound_terms(method, num_strata), batch_size)
    _, terms_per_call = nll_layout(len(images), batch_size)
    values = [nll_part(model, diffusion, images, part, method=method, num_strata=num_strata,
                       terms_per_call=terms_per_call, seed=seed, device=device)
              for part in progress_bar(parts, total=len(parts), desc=f"nll ({method})",
                                       enabled=progress)]
    per_image = assemble_nll(parts, values, len(images))
    mean, se = summarize_nll(torch.from_numpy(per_image))
    return {"nll_bpd": mean, "nll_bpd_se": se, "per_image": per_image}


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


def extractor_name(dataset: str, feature_extractor: str | None = None) -> str:
    """The torch-fidelity feature extractor that measures a study: evaluate.feature_extractor if
    set, else the one for its dataset (the digits classifier for digits, inception-v3-compat
    otherwise)."""
    if feature_extractor is not None:
        return feature_extractor
    try:
        return FIDELITY_EXTRACTORS[dataset]
    except KeyError:
        raise MetricsError(f"no feature extractor for dataset '{dataset}'; "
                           f"known: {', '.join(FIDELITY_EXTRACTORS)}") from None


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
        from pipeline.classifier import register_digits_extractor

        register_digits_extractor()
    elif name not in FEATURE_EXTRACTORS_REGISTRY:
        register_extractor_path(name)
