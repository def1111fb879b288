"""The study's scores, each declared once: what a run's record holds, what Tables 1 and 2 show
and in which columns, how the findings compare two rows, what results/metrics.json headlines
and what the seed calibration reports all derive from `SCORES`.

A measured score is computed by the evaluate and reference stages (`pipeline.jobs.evaluate_job`
through `pipeline.measure.stats`, which implements each `estimator`) and written to
metrics/<E>-<S>.json as `<name>` and its standard error `<name>_se`. A derived score is
computed from a run's measured ones when its results are read (`pipeline.reporting.results`).
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SAMPLES, BOUND, DERIVED = "samples", "bound", "derived"  # what a score is measured on


@dataclass(frozen=True)
class Score:
    name: str                  # its key in metrics/<E>-<S>.json, the tables' csv and MLflow
    label: str                 # its name in the findings and the figures: "FID"
    lower_is_better: bool
    source: str                # SAMPLES (the run's samples), BOUND (its NLL bound) or DERIVED
    estimator: str             # how its standard error is made
    column: Optional[str] = None  # its column in Tables 1 and 2 (None: not a column of its own)
    digits: Optional[int] = 2  # decimals in the tables (None: three significant figures)
    tables: tuple[int, ...] = ()  # which of the paper's Tables 1 and 2 show it
    within: Optional[str] = None  # shown in that score's cell: the train bound in "NLL (Train)"
    compare: str = "difference"   # how two rows are compared: "difference", or "ratio" (log)
    headline: int = 0          # its place among each Table 2 row's numbers in
                               # results/metrics.json (1 first; 0: not there)
    real_data: bool = False    # also measured on real data (Table 1's reference row)
    calibrated: bool = True    # reported by the seed calibration (calibration/seeds.md)

    @property
    def measured(self) -> bool:
        return self.source != DERIVED


SCORES: tuple[Score, ...] = (
    Score("is_mean", "IS", False, SAMPLES, "delete-a-group jackknife over 50 groups of samples",
          column="IS", tables=(1, 2), headline=2, real_data=True),
    Score("fid", "FID", True, SAMPLES, "delete-a-group jackknife over 50 groups of samples",
          column="FID", tables=(1, 2), compare="ratio", headline=1, real_data=True),
    Score("nll_bpd", "NLL", True, BOUND, "sd / sqrt(n) of the test images' bounds",
          column="NLL Test (Train)", tables=(1, 2), headline=3),
    Score("nll_bpd_train", "NLL (train)", True, BOUND,
          "sd / sqrt(n) of the train images' bounds", tables=(1, 2), within="nll_bpd"),
    Score("kid_mean", "KID", True, SAMPLES,
          "jackknife over 50 random groups of the first 2000 samples", column="KID",
          digits=None, tables=(2,), real_data=True, calibrated=False),
    Score("precision", "precision", False, SAMPLES,
          "jackknife over 50 random groups of the first 2000 samples", column="Precision",
          tables=(1, 2), real_data=True, calibrated=False),
    Score("recall", "recall", False, SAMPLES,
          "jackknife over 50 random groups of the first 2000 samples", column="Recall",
          tables=(1, 2), real_data=True, calibrated=False),
    Score("nll_gap", "NLL gap", True, DERIVED,
          "the test and train bounds' standard errors, as independent estimates"),
    Score("log_fid", "log FID", True, DERIVED, "FID's relative standard error (delta method)"),
)
"""In the tables' column order. The derived: nll_gap, the test - train gap of the bound (one
model's two bounds: its training noise cancels in the gap, so it is a score of its own, not
the difference of two rows' scores); log_fid: FID's noise, between samples and between seeds,
grows with the score (a row at FID 180 spreads 35x as far as one at 8), so rows are compared
by their ratio of FIDs."""

BY_NAME = {score.name: score for score in SCORES}
MEASURED = tuple(s.name for s in SCORES if s.measured)
ROW_SCORES = tuple(s.name for s in SCORES)


def score(name: str) -> Score:
    """The declaration of score `name`."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown score '{name}'; known: {', '.join(BY_NAME)}") from None


def in_table(table: int) -> tuple[Score, ...]:
    """The scores Table `table` (1 or 2) holds, in column order (those `within` another too)."""
    return tuple(s for s in SCORES if table in s.tables)


def headline(real_data: bool = False) -> tuple[str, ...]:
    """The numbers of each Table 2 row in results/metrics.json (or of the real data's row), in
    their order there: FID, IS, NLL, the first columns of `dvc exp show`."""
    chosen = [s for s in SCORES if s.headline and (s.real_data or not real_data)]
    return tuple(s.name for s in sorted(chosen, key=lambda s: s.headline))
