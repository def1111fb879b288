"""How sure the study's numbers are: standard errors and intervals for FID / IS / KID,
precision and recall, the NLL bound, and differences between runs.

Every score is an `Estimate` (value, standard error, degrees of freedom) with a 95 % interval:

- FID, IS and KID of N generated images are N-sample scores: FID and IS are biased at small N
  (for real digits, 400 images score FID 4 against the rest of the data), so the study compares
  them at equal N, against a real-data reference drawn at the same N. Their standard error is
  the delete-a-group jackknife over the generated images (the reference images fixed): it is
  the variance of the N-sample score over new draws of N samples. The bootstrap was tried and
  set aside: at N = 400 in 128 feature dimensions a resample's repeated images shift and spread
  FID far more than new images do (measured: bootstrap sd 3.3x the true sd of FID over fresh
  draws, jackknife 1.2x), so its intervals mean little there.
- Precision and recall (Kynkäänniemi et al. 2019, torch-fidelity's `metric_prc`): the share of
  generated images inside the real images' k-NN balls (k = 3), and of real images inside the
  generated images'. Both sets are of equal size, the first min(N, 2000) generated images and
  as many real ones (`precision_recall_reference`); their standard error is the jackknife over
  random groups of the generated images, recomputing the generated balls without each group.
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
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

LEVEL = 0.95            # of every interval the study reports
JACKKNIFE_GROUPS = 50   # delete-a-group jackknife: leave out one of this many groups at a time
KID_MAX_IMAGES = 2000   # KID over all pairs of at most this many images on each side
PRC_NEIGHBORHOOD = 3    # precision and recall: each image's ball reaches its 3rd nearest neighbour


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


def delete_a_group(statistic: Callable[[np.ndarray], float], groups: int) -> Estimate:
    """statistic(every group) and its delete-a-group jackknife standard error: `statistic`
    takes the indices of the groups it keeps, and is recomputed without each group in turn,
    se^2 = (G - 1) / G * sum_g (theta_(g) - mean)^2."""
    everything = np.arange(groups)
    value = float(statistic(everything))
    if groups < 2:
        return Estimate(value, math.nan)
    left_out = np.array([statistic(np.delete(everything, g)) for g in range(groups)])
    se = math.sqrt((groups - 1) / groups * np.sum((left_out - left_out.mean()) ** 2))
    return Estimate(value, se)


def jackknife(statistic: Callable[[np.ndarray], float], n: int,
              groups: int = JACKKNIFE_GROUPS, seed: int = 0) -> Estimate:
    """statistic(all indices) and its delete-a-group jackknife standard error: the n items cut
    into min(n, groups) random groups (`delete_a_group`); `statistic` takes item indices."""
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, min(n, groups))
    return delete_a_group(lambda kept: statistic(np.sort(np.concatenate([parts[g] for g in kept]))),
                          len(parts))


def group_bounds(n: int, groups: int = JACKKNIFE_GROUPS) -> np.ndarray:
    """The edges of min(n, groups) contiguous groups of n items (sizes differ by at most one):
    group g holds items bounds[g] .. bounds[g + 1] - 1. The jackknife groups of a run's samples,
    whose images are independent draws (each has its own seed), so contiguous groups are
    random groups."""
    g = max(1, min(n, groups))
    return np.array([i * n // g for i in range(g + 1)], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# FID / IS / KID from features, through sums that merge across chunks and workers
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureMoments:
    """The sums FID needs of a set of images' features f (EDM's fid.py keeps the same): their
    count, sum f and sum f f^T, in float64. Two sets merge by adding, so the sums of chunks
    made on different workers give the set's FID, and leaving a group's sums out gives the
    delete-a-group jackknife."""

    count: int
    feature_sum: np.ndarray  # (D,)
    outer_sum: np.ndarray  # (D, D)

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureMoments":
        f = np.asarray(features, dtype=np.float64)
        return cls(len(f), f.sum(axis=0), f.T @ f)

    def __add__(self, other: "FeatureMoments") -> "FeatureMoments":
        return FeatureMoments(self.count + other.count, self.feature_sum + other.feature_sum,
                              self.outer_sum + other.outer_sum)

    def frechet_statistics(self) -> dict[str, np.ndarray]:
        """{"mu", "sigma"}: the mean and the (n - 1)-normalized covariance, as torch-fidelity
        computes them from the features themselves."""
        mu = self.feature_sum / self.count
        sigma = (self.outer_sum - self.count * np.outer(mu, mu)) / (self.count - 1)
        return {"mu": mu, "sigma": sigma}


@dataclass
class LogitMoments:
    """The sums the Inception Score needs of a set of images' class probabilities
    p(y|x) = softmax(logits): their count, sum_x p(y|x) and sum_x sum_y p log p, in float64;
    merged by adding, like `FeatureMoments`."""

    count: int
    prob_sum: np.ndarray  # (C,)
    plogp_sum: float

    @classmethod
    def of(cls, logits: np.ndarray) -> "LogitMoments":
        z = torch.as_tensor(np.asarray(logits)).double()
        p, log_p = z.softmax(dim=1), z.log_softmax(dim=1)
        return cls(len(z), p.sum(dim=0).numpy(), float((p * log_p).sum()))

    def __add__(self, other: "LogitMoments") -> "LogitMoments":
        return LogitMoments(self.count + other.count, self.prob_sum + other.prob_sum,
                            self.plogp_sum + other.plogp_sum)

    def inception_score(self) -> float:
        """exp(E_x KL(p(y|x) || p(y))) = exp(mean_x sum_y p log p - sum_y p(y) log p(y)),
        torch-fidelity's formula, with p(y) the mean of p(y|x) over the set."""
        mean_p = self.prob_sum / self.count
        return float(np.exp(self.plogp_sum / self.count - np.sum(mean_p * np.log(mean_p))))


def total(parts: Sequence):
    """The merged sums of `parts` (FeatureMoments or LogitMoments)."""
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def frechet_distance(a: FeatureMoments, b: FeatureMoments) -> float:
    """FID between two sets of features from their sums (torch-fidelity's computation from
    their means and covariances): the study's one FID."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return fid_statistics_to_metric(a.frechet_statistics(), b.frechet_statistics(),
                                    verbose=False)[KEY_METRIC_FID]


def inception_score(parts: Sequence[LogitMoments], splits: int = 1) -> float:
    """Inception Score of the images of `parts` (in order), the mean over `splits` consecutive
    runs of parts (1: all images together, the least biased at small N)."""
    splits = max(1, min(splits, len(parts)))
    return float(np.mean([total([parts[i] for i in run]).inception_score()
                          for run in np.array_split(np.arange(len(parts)), splits)]))


def inception_score_of(logits: np.ndarray, splits: int = 1) -> float:
    """Inception Score of per-image `logits`: `splits` consecutive splits of the images."""
    logits = np.asarray(logits)
    splits = max(1, min(splits, len(logits)))
    return inception_score([LogitMoments.of(part) for part in np.array_split(logits, splits)],
                           splits)


class KernelReference:
    """The reference side of KID: torch-fidelity's cubic polynomial kernel over all pairs of at
    most KID_MAX_IMAGES reference images (`kid_subset` of more)."""

    def __init__(self, features: np.ndarray):
        y = np.asarray(features, dtype=np.float64)
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


def kid_subset(n: int, seed: int = 2020) -> np.ndarray:
    """The images of a reference set of n that KID compares with: all of them, or a seeded
    random KID_MAX_IMAGES of more, in order."""
    if n <= KID_MAX_IMAGES:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:KID_MAX_IMAGES])


@dataclass
class FeatureGroups:
    """What FID, IS and KID need of a run's N images, in the jackknife groups of
    `group_bounds(N)`: each group's `FeatureMoments` and `LogitMoments`, and the features of
    the first KID_MAX_IMAGES images (KID compares all their pairs)."""

    features: list[FeatureMoments]
    logits: list[LogitMoments]
    kid_features: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray, logits: np.ndarray,
           groups: int = JACKKNIFE_GROUPS) -> "FeatureGroups":
        """From per-image features and logits (in memory)."""
        bounds = group_bounds(len(features), groups)
        spans = list(zip(bounds[:-1], bounds[1:]))
        return cls([FeatureMoments.of(features[a:b]) for a, b in spans],
                   [LogitMoments.of(logits[a:b]) for a, b in spans],
                   np.asarray(features[:KID_MAX_IMAGES], dtype=np.float64))

    @property
    def count(self) -> int:
        return sum(m.count for m in self.features)


def fidelity_scores(groups: FeatureGroups, reference: FeatureMoments, kernel: KernelReference,
                    *, is_splits: int = 1, seed: int = 0) -> dict[str, Estimate]:
    """{"precision", "recall", "fid", "is_mean", "kid_mean"} (`pipeline.core.scores`' names)
    of a run's images against the reference (`reference`: its feature
    sums; `kernel`: its KID side, whose images precision and recall compare with too), each
    with its delete-a-group jackknife standard error (FID and IS over `groups`' groups, KID,
    precision and recall over random groups of its first images)."""
    k_xx, xy_sums = kernel.prepare(groups.kid_features)
    prc = precision_recall_estimates(groups.kid_features, kernel.y, seed=seed)
    return {**prc,
        "fid": delete_a_group(lambda kept: frechet_distance(
            total([groups.features[g] for g in kept]), reference), len(groups.features)),
        "is_mean": delete_a_group(lambda kept: inception_score(
            [groups.logits[g] for g in kept], is_splits), len(groups.logits)),
        "kid_mean": jackknife(lambda i: kernel.distance(k_xx, xy_sums, i), len(k_xx),
                              seed=seed),
    }


def precision_recall_reference(real: np.ndarray, n: int, seed: int = 2019) -> np.ndarray:
    """The real images that precision and recall compare n generated images with: all of
    `real` if it holds n or fewer, else a seeded random n of them, in order (the k-NN balls
    shrink as a set grows, so both sets are of one size)."""
    real = np.asarray(real, dtype=np.float64)
    if len(real) <= n:
        return real
    return real[np.sort(np.random.default_rng(seed).permutation(len(real))[:n])]


def precision_recall(generated: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of `generated` against `real` features, torch-fidelity's k-NN
    estimate with k = PRC_NEIGHBORHOOD."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    precision, recall = calculate_precision_recall_full(
        torch.from_numpy(np.asarray(generated, np.float64)),
        torch.from_numpy(np.asarray(real, np.float64)), neighborhood=PRC_NEIGHBORHOOD)
    # each is a share of images, which torch-fidelity averages in float32: back to the count's
    return round(precision * len(generated)) / len(generated), round(recall * len(real)) / len(real)


def precision_recall_estimates(generated: np.ndarray, real: np.ndarray,
                               seed: int = 0) -> dict[str, Estimate]:
    """{"precision", "recall"} of `generated` against as many of `real`
    (`precision_recall_reference`), each with the jackknife standard error over random groups
    of the generated images (both from one computation per group left out)."""
    generated = np.asarray(generated, dtype=np.float64)
    real = precision_recall_reference(real, len(generated))
    if len(generated) < PRC_NEIGHBORHOOD + 2 or len(real) < PRC_NEIGHBORHOOD + 1:  # no balls
        return {name: Estimate(math.nan, math.nan) for name in ("precision", "recall")}
    computed: dict[bytes, tuple[float, float]] = {}

    def both(index: np.ndarray) -> tuple[float, float]:
        key = index.tobytes()
        if key not in computed:
            computed[key] = precision_recall(generated[index], real)
        return computed[key]

    return {name: jackknife(lambda i, k=k: both(i)[k], len(generated), seed=seed)
            for k, name in enumerate(("precision", "recall"))}


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


def estimate(row: Mapping[str, Any], score: str) -> Estimate:
    """The `Estimate` of `score` in a row of `aggregate` (or of `load_runs`); NaN where the row
    lacks it (not measured)."""
    return Estimate(float(row.get(score, math.nan)), float(row.get(f"{score}_se", math.nan)),
                    float(row.get(f"{score}_df", math.inf)))
