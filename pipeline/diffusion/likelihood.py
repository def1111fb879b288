"""The densities the variational bound is made of, in nats, and its summary in bits/dim: the KL
of two Gaussians, the discretized Gaussian decoder of Ho et al. 2020 Eq. 13, and the mean of
per-image bounds with its standard error."""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) in nats, elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor,
                                        num_levels: int = 256) -> torch.Tensor:
    """log P(x) under N(means, exp(log_scales)^2) discretized to the data's `num_levels` evenly
    spaced levels on [-1, 1] (x on those levels), in nats.

    The decoder L_0 of Ho et al. 2020 Eq. 13, which has 256 levels: bin edges at
    x +- 1 / (num_levels - 1), the edge bins open (-inf at the bottom, +inf at the top), so the
    probabilities of the levels sum to 1. Uses the exact normal CDF through log_ndtr and
    log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))), mirrored into the
    lower tail for bins above the mean, so it stays accurate far in either tail. Elementwise.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    x, means, log_scales = (v.to(work) for v in torch.broadcast_tensors(x, means, log_scales))
    half_bin = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scales)
    upper = (x - means + half_bin) * inv_scale
    lower = (x - means - half_bin) * inv_scale
    # For a bin above the mean, use the mirrored (lower-tail) CDFs: Phi(b) - Phi(a) = Phi(-a) - Phi(-b).
    flip = (lower + upper) > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_cdf_hi = torch.special.log_ndtr(hi)
    log_cdf_lo = torch.special.log_ndtr(lo)
    log_mid = log_cdf_hi + _log1mexp(torch.clamp(log_cdf_lo - log_cdf_hi, max=-1e-30))
    log_cdf_upper = torch.special.log_ndtr(upper)  # P(X < x + half bin): the bottom bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # P(X > x - half bin): the top bin
    bottom = x < -1.0 + half_bin
    top = x > 1.0 - half_bin
    return torch.where(bottom, log_cdf_upper, torch.where(top, log_sf_lower, log_mid))


def summarize_nll(per_image_bpd: torch.Tensor) -> tuple[float, float]:
    """Mean bits/dim over images and its standard error (std / sqrt(n))."""
    values = per_image_bpd.double()
    n = values.numel()
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), stderr
