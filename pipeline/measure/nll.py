"""The NLL in bits/dim (the variational bound of Ho et al. 2020 Eq. 5) of many images, in parts
of images x terms: the unit of work of a worker, assembled into one value per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.progress import progress_bar
from pipeline.data.datasets import to_model_range, uint8_images
from pipeline.diffusion.likelihood import summarize_nll
from pipeline.diffusion.seeding import item_generators
from pipeline.model.precision import matmul_precision

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
