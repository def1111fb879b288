"""Training noise: how far a score moves when only the training seed changes, and how a
single-seed run's interval takes it in.

A run's standard errors (`pipeline.measure.stats`) cover the noise of its samples and of its
bound's draws: new samples of the same model. Another training seed (or another CPU's kernels,
which round differently from the first step on) trains another model, and the score moves by
more. Over k runs that differ only in the seed, the sample variance s^2 of a score estimates
the whole variance of one run's value, tau^2 + se^2: the training part tau^2 and the sampling
part se^2 (the mean of the runs' own squared standard errors). So

    tau^2 = max(0, s^2 - mean(se_i^2))          with k - 1 degrees of freedom,

and a single-seed run of the same recipe has the standard error sqrt(se^2 + tau^2), its
degrees of freedom those of the sum (Welch-Satterthwaite): a t interval that is as wide as the
calibration is unsure. `tau^2` is zero where the seeds spread no more than their samples do.

`leave_one_out` checks a calibration on its own runs: each seed's value left out in turn must
lie in the 95 % prediction interval the other seeds give (`predicts`) for about 95 % of them,
and a run of another CPU the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from pipeline.measure.stats import LEVEL, Estimate


@dataclass(frozen=True)
class SeedSpread:
    """The training part of a score's variance from `seeds` runs: `variance` (tau^2, what an
    interval adds), and `between` (s^2, the seeds' sample variance it comes from) with its
    degrees of freedom `df` (seeds - 1): s^2 is the random part of the estimate, so it sets
    the degrees of freedom of an interval that adds tau^2."""

    variance: float
    df: float
    seeds: int
    between: float = math.nan

    @property
    def sd(self) -> float:
        return math.sqrt(self.variance)


def seed_spread(values: Sequence[float], ses: Sequence[float]) -> SeedSpread:
    """tau^2 = max(0, s^2 - mean(se^2)) of one score over runs that differ only in the seed
    (values and their sampling standard errors), with k - 1 degrees of freedom."""
    values = np.asarray(values, dtype=np.float64)
    ses = np.asarray(ses, dtype=np.float64)
    if values.shape != ses.shape:
        raise ValueError(f"a value per standard error, got {values.shape} and {ses.shape}")
    k = len(values)
    if k < 2:
        raise ValueError(f"the spread between seeds needs at least 2 runs, got {k}")
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(ses))):
        return SeedSpread(math.nan, k - 1, k, math.nan)
    between = float(values.var(ddof=1))
    return SeedSpread(max(0.0, between - float(np.mean(ses ** 2))), k - 1, k, between)


def _with_df(estimate: Estimate, total: float, random_parts: Sequence[tuple[float, float]]
             ) -> Estimate:
    """`estimate` with variance `total`, whose random parts are (variance estimate, df):
    Welch-Satterthwaite degrees of freedom."""
    if not math.isfinite(total):
        return Estimate(estimate.value, math.nan, estimate.df)
    parts = [(estimate.se ** 2, estimate.df), *random_parts]
    denominator = sum(v ** 2 / df for v, df in parts if math.isfinite(df) and v > 0)
    return Estimate(estimate.value, math.sqrt(total),
                    total ** 2 / denominator if denominator > 0 else math.inf)


def add_variance(estimate: Estimate, extra: Sequence[SeedSpread]) -> Estimate:
    """`estimate` with the training variance of each of `extra` added (the rows it compares):
    se^2 + sum tau^2. Its degrees of freedom are Welch-Satterthwaite's, each tau^2 counted by
    the s^2 it was estimated from (k - 1 degrees of freedom): with equal sampling errors the
    interval of one run is then exactly value +- t(k - 1) s, the classical one. A tau^2 of 0
    adds neither variance nor uncertainty."""
    used = [s for s in extra if s.variance > 0]
    total = estimate.se ** 2 + sum(s.variance for s in used)
    return _with_df(estimate, total, [(s.between, s.df) for s in used])


def predicts(others: Sequence[Estimate], new: Estimate, training: bool = True,
             level: float = LEVEL) -> Optional[bool]:
    """Whether a new run's value lies in the `level` prediction interval that runs `others` of
    the same recipe (other seeds) give: their mean, with the variance of that mean and of one
    new run (its sampling se^2, and with `training` the training variance tau^2 of `others`).
    None where a value is not finite. Without `training` the interval is what sampling noise
    alone would promise."""
    values = np.array([e.value for e in others], dtype=np.float64)
    ses = np.array([e.se for e in others], dtype=np.float64)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(ses))
            and math.isfinite(new.value) and math.isfinite(new.se)):
        return None
    k = len(values)
    spread = seed_spread(values, ses)
    sampling = float(np.mean(ses ** 2))
    difference = Estimate(new.value - float(values.mean()), new.se)
    if training:
        # var(new - mean) = (tau^2 + se_new^2) + (tau^2 + se^2) / k; s^2 estimates tau^2 + se^2
        tau2 = spread.variance
        total = new.se ** 2 + tau2 + (tau2 + sampling) / k
        random = spread.between * ((1 + 1 / k) if tau2 > 0 else 1 / k)
        wide = _with_df(difference, total, [(random, k - 1)])
    else:
        wide = Estimate(difference.value, math.sqrt(new.se ** 2 + sampling / k))
    low, high = wide.interval(level)
    return bool(low <= 0.0 <= high)


def leave_one_out(runs: Sequence[Estimate], training: bool = True,
                  level: float = LEVEL) -> tuple[int, int]:
    """(covered, checked): each run left out in turn and predicted from the others
    (`predicts`); a calibration whose intervals mean what they say covers about `level` of
    them (with 4 seeds, each prediction rests on 3)."""
    covered = checked = 0
    for i, new in enumerate(runs):
        hit = predicts([e for j, e in enumerate(runs) if j != i], new, training, level)
        if hit is not None:
            checked += 1
            covered += int(hit)
    return covered, checked
