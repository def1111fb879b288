"""How sure the study's numbers are: standard errors and intervals for FID / IS / KID, the NLL
bound, and differences between runs.

Every score is an `Estimate` (value, standard error, degrees of freedom) with a 95 % interval:

- FID, IS and KID of N generated images are N-sample scores: FID and IS are biased at small N
  (for real digits, 400 images score FID 4 against the rest of the data), so the study compares
  them at equal N, against a real-data reference drawn at the same N. Their standard error is
  the delete-a-group jackknife over the generated images (the reference images fixed): it is
  the variance of the N-sample score over new draws of N samples. The bootstrap was tried and
  set aside: at N = 400 in 128 feature dimensions a resample's repeated images shift and spread
  FID far more than new images do (measured: bootstrap sd 3.3x the true sd of FID over fresh
  draws, jackknife 1.2x), so its intervals mean little there.
- The NLL bound is a mean over images: standard error sd / sqrt(n), and two runs scored on the
  same images are compared image by image (`paired_difference`), which removes the spread
  between images from their difference.
- With several training seeds a run's score is the mean over seeds and its standard error the
  spread between seeds (`combine_seeds`, a t interval with k - 1 degrees of freedom), which
  includes the sampling noise of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

LEVEL = 0.95            # of every interval the study reports
JACKKNIFE_GROUPS = 50   # delete-a-group jackknife: leave out one of this many groups at a time
KID_MAX_IMAGES = 2000   # KID over all pairs of at most this many images on each side


@dataclass(frozen=True)
class Estimate:
    """A score, its standard error and the degrees of freedom of its t interval (inf: normal)."""

    value: float
    se: float
    df: float = math.inf

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        if not (math.isfinite(self.value) and math.isfinite(self.se)):
            return math.nan, math.nan
        half = critical_value(level, self.df) * self.se
        return self.value - half, self.value + half

    def __sub__(self, other: "Estimate") -> "Estimate":
        """The difference of two independent estimates (Welch-Satterthwaite degrees of freedom)."""
        se = math.hypot(self.se, other.se)
        return Estimate(self.value - other.value, se, welch_df(self, other))

    def log(self) -> "Estimate":
        """log(value), standard error by the delta method (for positive scores: FID)."""
        if self.value <= 0:
            return Estimate(math.nan, math.nan, self.df)
        return Estimate(math.log(self.value), self.se / self.value, self.df)


def critical_value(level: float, df: float) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom."""
    from scipy import stats

    q = (1 + level) / 2
    return float(stats.norm.ppf(q) if math.isinf(df) else stats.t.ppf(q, df))


def welch_df(a: Estimate, b: Estimate) -> float:
    """Welch-Satterthwaite degrees of freedom of a - b (inf when both are normal)."""
    if math.isinf(a.df) and math.isinf(b.df):
        return math.inf
    va, vb = a.se ** 2, b.se ** 2
    denominator = (va ** 2 / a.df if math.isfinite(a.df) else 0.0) + \
        (vb ** 2 / b.df if math.isfinite(b.df) else 0.0)
    return (va + vb) ** 2 / denominator if denominator > 0 else math.inf


def jackknife(statistic: Callable[[np.ndarray], float], n: int,
              groups: int = JACKKNIFE_GROUPS, seed: int = 0) -> Estimate:
    """statistic(all indices) and its delete-a-group jackknife standard error: the n items cut
    into min(n, groups) random groups, the statistic recomputed without each,
    se^2 = (G - 1) / G * sum_g (theta_(g) - mean)^2."""
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, min(n, groups))
    everything = np.arange(n)
    value = float(statistic(everything))
    left_out = np.array([statistic(np.setdiff1d(everything, part)) for part in parts])
    g = len(parts)
    se = math.sqrt((g - 1) / g * np.sum((left_out - left_out.mean()) ** 2)) if g > 1 else math.nan
    return Estimate(value, se)


# --------------------------------------------------------------------------------------------
# FID / IS / KID from features
# --------------------------------------------------------------------------------------------


class FrechetReference:
    """The reference side of FID: the mean and covariance of its features."""

    def __init__(self, features: np.ndarray):
        from torch_fidelity.metric_fid import fid_features_to_statistics

        self.features = np.asarray(features)
        self.stats = fid_features_to_statistics(torch.as_tensor(self.features))

    def distance(self, features: np.ndarray) -> float:
        """FID of `features` against this reference (torch-fidelity's computation)."""
        from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_features_to_statistics,
                                               fid_statistics_to_metric)

        stats = fid_features_to_statistics(torch.as_tensor(np.asarray(features)))
        return fid_statistics_to_metric(stats, self.stats, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: np.ndarray, splits: int = 1) -> float:
    """Inception Score of `logits` (torch-fidelity's computation), the mean over `splits`
    consecutive splits (1: all images together, the least biased at small N)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits))
    splits = max(1, min(splits, len(logits)))
    return isc_features_to_metric(logits, splits, False)[KEY_METRIC_ISC_MEAN]


class KernelReference:
    """The reference side of KID: torch-fidelity's cubic polynomial kernel over all pairs of at
    most KID_MAX_IMAGES reference images (a seeded subset of more)."""

    def __init__(self, features: np.ndarray, seed: int = 2020):
        y = np.asarray(features, dtype=np.float64)
        if len(y) > KID_MAX_IMAGES:
            y = y[np.sort(np.random.default_rng(seed).permutation(len(y))[:KID_MAX_IMAGES])]
        self.y = y
        k_yy = self.kernel(y, y)
        self.yy = (k_yy.sum() - np.trace(k_yy)) / (len(y) * (len(y) - 1))

    @staticmethod
    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        from torch_fidelity.metric_kid import kernel_poly

        return kernel_poly(a, b, kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                           kid_kernel_poly_coef0=1)

    def prepare(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sample side's kernel matrix and its row sums against the reference."""
        x = np.asarray(features, dtype=np.float64)
        return self.kernel(x, x), self.kernel(x, self.y).sum(axis=1)

    def distance(self, k_xx: np.ndarray, xy_sums: np.ndarray, index: np.ndarray) -> float:
        """Unbiased MMD^2 of the samples `index` (KID), from `prepare`'s matrices."""
        sub = k_xx[np.ix_(index, index)]
        n, m = len(index), len(self.y)
        xx = (sub.sum() - np.trace(sub)) / (n * (n - 1))
        return float(xx + self.yy - 2 * xy_sums[index].sum() / (n * m))


def fidelity_scores(features: np.ndarray, logits: np.ndarray, frechet: FrechetReference,
                    kernel: KernelReference, *, is_splits: int = 1,
                    seed: int = 0) -> dict[str, Estimate]:
    """{"fid", "is", "kid"} of the generated images' features and logits, each with its
    jackknife standard error over the generated images."""
    features, logits = np.asarray(features), np.asarray(logits)
    n = len(features)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:KID_MAX_IMAGES])
    k_xx, xy_sums = kernel.prepare(features[keep])
    return {
        "fid": jackknife(lambda i: frechet.distance(features[i]), n, seed=seed),
        "is": jackknife(lambda i: inception_score(logits[i], is_splits), n, seed=seed),
        "kid": jackknife(lambda i: kernel.distance(k_xx, xy_sums, i), len(keep), seed=seed),
    }


# --------------------------------------------------------------------------------------------
# Means over images; differences; several seeds
# --------------------------------------------------------------------------------------------


def mean_estimate(values: Sequence[float]) -> Estimate:
    """The mean of per-image values and its standard error sd / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate(float(values.mean()), se)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """mean(a - b) of two runs' per-image values on the same images, with its standard error."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same images, got {a.shape} and {b.shape}")
    return mean_estimate(a - b)


def combine_seeds(per_seed: Sequence[Estimate]) -> Estimate:
    """The mean over training seeds: one seed, its own estimate; k >= 2, the standard error
    sd / sqrt(k) of the k values with k - 1 degrees of freedom."""
    if len(per_seed) == 1:
        return per_seed[0]
    values = np.array([e.value for e in per_seed])
    k = len(values)
    return Estimate(float(values.mean()), float(values.std(ddof=1) / math.sqrt(k)), k - 1)
