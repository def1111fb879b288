"""Which of the paper's claims the measured study reproduces: the findings table.

Each qualitative claim of Ho et al. (2020) Tables 1-2 is judged from our scores and their
uncertainty (`pipeline.measure.stats`), by a rule fixed before any result is seen:

- "A is better than B" (lower FID or NLL, higher IS): the 95 % interval of the difference lies
  on A's side of 0: reproduced; on B's side: contradicted; it contains 0: inconclusive.
- "A has the best score": A is better than every other row (reproduced), worse than one of
  them (contradicted), or neither.
- "A is comparable to B" (FID): the interval of log(FID_A / FID_B) lies within
  +- log(COMPARABLE_FACTOR) (reproduced), entirely outside it (contradicted), or across its
  edge (inconclusive). The paper's two such FIDs differ by 2 %.
- "A is unstable or poor": A diverged, or it is worse than every row the paper trained
  (reproduced); better than one of them (contradicted); or neither (inconclusive).
- "test and train NLL agree": the interval of test - train lies within +- AGREE_FRACTION of the
  train bound (reproduced), outside it (contradicted), or across its edge (inconclusive).

Rows are found by what they are (mean type, objective, the paper's linear schedule and uniform
weighting), not by their names; a claim whose rows the study lacks is "not measured".
NLL differences between two single-seed runs are paired image by image (both runs score the
same test images with the same noise draws); otherwise the difference of two independent
estimates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.core import scores
from pipeline.core.dataset_specs import PAPER_TABLE1, PAPER_TABLE2
from pipeline.core.status import Status
from pipeline.measure.seed_noise import add_variance
from pipeline.measure.stats import Estimate, estimate, paired_difference
from pipeline.reporting.calibration import NOISE_CALIBRATED, NOISE_SAMPLING, NOISE_SEEDS, row_spread
from pipeline.reporting.formats import to_markdown as table_markdown
from pipeline.reporting.results import GAP, LOG_FID
from pipeline.reporting.tables import objective_key, paper_table2_row

REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED = (
    "reproduced", "contradicted", "inconclusive", "not measured")
VERDICTS = (REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED)
COMPARABLE_FACTOR = 1.25   # "comparable" FIDs: within a factor 1.25 of each other
AGREE_FRACTION = 0.03      # "agree": test and train bounds within 3 % of the train bound

# The paper's rows (Table 2) by (mean type, objective), as named in the findings.
ROW_NAMES = {("mu", "learned"): "μ̃, L, learned Σ", ("mu", "fixed"): "μ̃, L, fixed Σ",
             ("mu", "simple"): "μ̃, MSE", ("eps", "learned"): "ε, L, learned Σ",
             ("eps", "fixed"): "ε, L, fixed Σ", ("eps", "simple"): "ε, L_simple"}
TRAINABLE = (("mu", "learned"), ("mu", "fixed"), ("eps", "fixed"), ("eps", "simple"))
SAMPLING_ONLY = "one seed: sampling noise only"
CALIBRATED_LABEL = "one seed, training noise calibrated on"   # ... N seeds


@dataclass(frozen=True)
class Finding:
    claim: str
    paper: str
    ours: str
    interval: str
    verdict: str
    rule: str
    noise: str = ""   # what the intervals cover (`noise_label`)


def paper_rows(table: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    """{(mean type, objective): row of `results.aggregate`} for the rows that play the paper's
    Table 2 rows (`tables.paper_table2_row`: the paper's schedule, weighting and objectives);
    the first such row where several do."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for row in table.to_dict("records"):
        if paper_table2_row(row) is not None:
            found.setdefault((row["mean_type"], objective_key(row)), row)
    return found



def _estimate(row: Mapping[str, Any], score: str) -> Estimate:
    return estimate(row, score)


def _advantage(a: Mapping[str, Any], b: Mapping[str, Any], score: str,
               per_image: Mapping[str, Mapping[str, np.ndarray]]) -> Estimate:
    """How much better A is than B on `score` (positive: A better), with its standard error.
    FID is compared as a ratio: log FID_B - log FID_A (its noise, between samples and between
    seeds, grows with the score: calibration/seeds.md)."""
    if score == "nll_bpd" and a["seeds"] == 1 and b["seeds"] == 1:
        a_images = per_image.get(a["key"], {}).get("test")
        b_images = per_image.get(b["key"], {}).get("test")
        if a_images is not None and b_images is not None and len(a_images) == len(b_images):
            # the pairing removes the images' spread, not the models': each row's training
            # variance (calibration) is added to the paired difference's
            spreads = [s for s in (row_spread(a, score), row_spread(b, score)) if s is not None]
            return add_variance(paired_difference(b_images, a_images), spreads)
    if _ratio(score):
        return _estimate(b, f"log_{score}") - _estimate(a, f"log_{score}")
    diff = _estimate(b, score) - _estimate(a, score)
    return diff if scores.score(score).lower_is_better else Estimate(-diff.value, diff.se,
                                                                     diff.df)


def _ratio(score: str) -> bool:
    """Whether rows are compared on `score` by their ratio (its log, `log_<score>`): FID."""
    return bool(score) and scores.score(score).compare == "ratio"


def _name(score: str) -> str:
    return scores.score(score).label


def _difference(score: str) -> str:
    return f"{_name(score)} ratio" if _ratio(score) else "difference"


def _tie(score: str) -> str:
    return "1" if _ratio(score) else "0"


def _side(estimate: Estimate) -> str:
    low, high = estimate.interval()
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    return REPRODUCED if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE


def _all(verdicts: Sequence[str]) -> str:
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return REPRODUCED if verdicts and all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _lead(value: float, digits: int = 2, score: str = "") -> str:
    """"ahead by 1.20" or "behind by 1.20" (a negative advantage); for FID (a log ratio,
    `_advantage`) "ahead: FID ratio 2.90" (the other row's FID over this one's)."""
    side = "ahead" if value >= 0 else "behind"
    if _ratio(score):
        return f"{side}: {_difference(score)} {_fmt(math.exp(value), digits)}"
    return f"{side} by {_fmt(abs(value), digits)}"


def _interval(estimate: Estimate, digits: int = 2, score: str = "") -> str:
    """"[low, high]"; for FID the interval of the ratio (`_lead`)."""
    low, high = estimate.interval()
    if _ratio(score):
        low, high = math.exp(low), math.exp(high)
    return f"[{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _weakest(estimate: Estimate) -> tuple[float, float]:
    """Order of the comparisons a 'best' or 'poor' claim rests on: the one nearest a tie first
    (the lowest end of its interval; then the smallest lead), the one the interval shows."""
    low = estimate.interval()[0]
    return (low if math.isfinite(low) else -math.inf, estimate.value)


def _unstable(row: Mapping[str, Any]) -> bool:
    return row["status"] == Status.UNSTABLE


class _Judge:
    """The claims, judged on one study's rows."""

    def __init__(self, table: pd.DataFrame, per_image: Mapping[str, Mapping[str, np.ndarray]]):
        self.rows = paper_rows(table)
        self.per_image = per_image

    def _value(self, key, score, digits=2) -> str:
        row = self.rows[key]
        return "unstable" if _unstable(row) else \
            f"{_name(score)} {_fmt(row[score], digits)}"

    def better(self, claim: str, paper: str, a, b, score: str) -> Finding:
        rule = (f"{_name(score)}: 95 % interval of the {_difference(score)} excludes "
                f"{_tie(score)} (paired on the test images for NLL)")
        if a not in self.rows or b not in self.rows:
            return Finding(claim, paper, "", "", NOT_MEASURED, rule)
        ra, rb = self.rows[a], self.rows[b]
        ours = f"{self._value(a, score)} vs {self._value(b, score)}"
        if _unstable(ra) or _unstable(rb):
            verdict = CONTRADICTED if _unstable(ra) and not _unstable(rb) else \
                REPRODUCED if _unstable(rb) and not _unstable(ra) else INCONCLUSIVE
            return Finding(claim, paper, ours, "", verdict, rule)
        advantage = _advantage(ra, rb, score, self.per_image)
        digits = 3 if score == "nll_bpd" else 2
        return Finding(claim, paper,
                       f"{ours}; {ROW_NAMES[a]} {_lead(advantage.value, digits, score)}",
                       _interval(advantage, digits, score), _side(advantage), rule)


    def best(self, claim: str, paper: str, a, score: str) -> Finding:
        rule = (f"{_name(score)}: better than every other row, each "
                f"{_difference(score)}'s 95 % interval excluding {_tie(score)}")
        if a not in self.rows:
            return Finding(claim, paper, "", "", NOT_MEASURED, rule)
        others = [k for k in self.rows if k != a]
        ra = self.rows[a]
        if _unstable(ra):
            return Finding(claim, paper, "unstable", "", CONTRADICTED, rule)
        stable = [k for k in others if not _unstable(self.rows[k])]
        if not stable:
            return Finding(claim, paper, self._value(a, score), "", REPRODUCED, rule)
        advantages = {k: _advantage(ra, self.rows[k], score, self.per_image) for k in stable}
        closest = min(advantages, key=lambda k: _weakest(advantages[k]))
        verdict = _all([_side(e) for e in advantages.values()])
        ours = (f"{self._value(a, score)}; the closest, {ROW_NAMES[closest]}: "
                f"{self._value(closest, score)} "
                f"({_lead(advantages[closest].value, score=score)})")
        return Finding(claim, paper, ours, _interval(advantages[closest], score=score), verdict,
                       rule)

    def comparable(self, claim: str, paper: str, a, b) -> Finding:
        bound = math.log(COMPARABLE_FACTOR)
        rule = (f"FID ratio: 95 % interval within a factor {COMPARABLE_FACTOR} "
                f"(reproduced), entirely outside it (contradicted)")
        if a not in self.rows or b not in self.rows:
            return Finding(claim, paper, "", "", NOT_MEASURED, rule)
        ra, rb = self.rows[a], self.rows[b]
        if _unstable(ra) or _unstable(rb):
            return Finding(claim, paper, f"{self._value(a, 'fid')} vs {self._value(b, 'fid')}",
                           "", CONTRADICTED, rule)
        ratio = _estimate(ra, LOG_FID) - _estimate(rb, LOG_FID)
        low, high = ratio.interval()
        if not (math.isfinite(low) and math.isfinite(high)):
            verdict = INCONCLUSIVE
        elif -bound <= low and high <= bound:
            verdict = REPRODUCED
        elif high < -bound or low > bound:
            verdict = CONTRADICTED
        else:
            verdict = INCONCLUSIVE
        ours = (f"{self._value(a, 'fid')} vs {self._value(b, 'fid')}: ratio "
                f"{_fmt(math.exp(ratio.value))}")
        return Finding(claim, paper, ours, f"[{_fmt(math.exp(low))}, {_fmt(math.exp(high))}]",
                       verdict, rule)

    def unstable_or_poor(self, claim: str, paper: str, a) -> Finding:
        rule = ("diverged, or FID worse than every row the paper trained, each FID ratio's "
                "95 % interval excluding 1")
        if a not in self.rows:
            return Finding(claim, paper, "", "", NOT_MEASURED, rule)
        ra = self.rows[a]
        if _unstable(ra):
            return Finding(claim, paper, "unstable", "", REPRODUCED, rule)
        peers = [k for k in TRAINABLE if k in self.rows and not _unstable(self.rows[k])]
        if not peers:
            return Finding(claim, paper, self._value(a, "fid"), "", INCONCLUSIVE, rule)
        behind = {k: _advantage(self.rows[k], ra, "fid", self.per_image) for k in peers}
        closest = min(behind, key=lambda k: _weakest(behind[k]))
        ours = (f"{self._value(a, 'fid')}; the closest trainable row, {ROW_NAMES[closest]}: "
                f"{self._value(closest, 'fid')} ({_lead(behind[closest].value, score='fid')})")
        return Finding(claim, paper, ours, _interval(behind[closest], score="fid"),
                       _all([_side(e) for e in behind.values()]), rule)

    def test_train_agree(self, claim: str, paper: str, keys) -> Finding:
        rule = (f"95 % interval of test - train within {AGREE_FRACTION:.0%} of the train "
                "bound (reproduced), entirely outside it (contradicted)")
        present = [k for k in keys if k in self.rows and not _unstable(self.rows[k])]
        if not present:
            return Finding(claim, paper, "", "", NOT_MEASURED, rule)
        verdicts, parts, intervals = [], [], []
        for key in present:
            row = self.rows[key]
            gap = _estimate(row, GAP)
            margin = AGREE_FRACTION * row["nll_bpd_train"]
            low, high = gap.interval()
            if not (math.isfinite(low) and math.isfinite(high)):
                verdicts.append(INCONCLUSIVE)
            elif -margin <= low and high <= margin:
                verdicts.append(REPRODUCED)
            elif high < -margin or low > margin:
                verdicts.append(CONTRADICTED)
            else:
                verdicts.append(INCONCLUSIVE)
            parts.append(f"{ROW_NAMES[key]}: {_fmt(row['nll_bpd'])} ({_fmt(row['nll_bpd_train'])})"
                         f", margin ±{_fmt(margin, 3)}")
            intervals.append(_interval(gap, 3))
        return Finding(claim, paper, "; ".join(parts), "; ".join(intervals), _all(verdicts),
                       rule)



def _row_noise(row: Mapping[str, Any]) -> str:
    noise = row.get("noise")
    if isinstance(noise, str) and noise:
        return noise
    return NOISE_SEEDS if row.get("seeds", 1) > 1 else NOISE_SAMPLING


def noise_label(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the intervals of a claim over `rows` cover: the weakest of its rows' noise."""
    if not rows:
        return ""
    kinds = [_row_noise(r) for r in rows]
    if NOISE_SAMPLING in kinds:
        return SAMPLING_ONLY
    if NOISE_CALIBRATED in kinds:
        seeds = max(int(r.get("noise_seeds", 0) or 0) for r in rows)
        return f"{CALIBRATED_LABEL} {seeds} seeds"
    return f"{min(int(r['seeds']) for r in rows)} seeds"


def _paper_blank(paper_row) -> str:
    """The paper's cell of a row it shows blank: "unstable" (Table 2)."""
    if paper_row is not None:
        raise ValueError(f"the paper reports {paper_row} for this row, not a blank")
    return "unstable"


def findings(table: pd.DataFrame,
             per_image: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None) -> pd.DataFrame:
    """The findings table of a study: one row per claim of the paper (claim, paper, ours,
    interval, verdict, rule), from `results.aggregate`'s rows (with a `key` column naming each
    single-seed row's run) and the per-image NLL of the runs ({key: {split: values}})."""
    is_mean = {key: f"{row[0]:.2f}" for key, row in PAPER_TABLE2.items() if row}
    fid = {key: f"{row[2]:.2f}" for key, row in PAPER_TABLE2.items() if row}
    nll = {objective: (f"{test:.2f}", f"{train:.2f}")
           for objective, *_, test, train in PAPER_TABLE1}  # Table 1: ε rows only
    simple, fixed, mu_fixed = ("eps", "simple"), ("eps", "fixed"), ("mu", "fixed")
    mu_learned, eps_learned, mu_simple = ("mu", "learned"), ("eps", "learned"), ("mu", "simple")
    judge = _Judge(table, per_image or {})
    everything = tuple(judge.rows)
    uses = [everything, everything, (mu_fixed, fixed), (mu_fixed, mu_learned),
            (mu_simple, *TRAINABLE), (eps_learned, *TRAINABLE), (fixed, simple), (simple, fixed)]
    made = [
        judge.best("L_simple has the best FID",
                   f"FID {fid[simple]}; the next, μ̃ L fixed Σ: {fid[mu_fixed]}", simple, "fid"),
        judge.best("L_simple has the best IS",
                   f"IS {is_mean[simple]}; the next, μ̃ L fixed Σ: {is_mean[mu_fixed]}",
                   simple, "is_mean"),
        judge.comparable("μ̃ with L and fixed Σ is comparable to ε with L and fixed Σ",
                         f"FID {fid[mu_fixed]} vs {fid[fixed]}", mu_fixed, fixed),
        judge.better("μ̃ with L: fixed Σ beats learned Σ",
                     f"FID {fid[mu_fixed]} vs {fid[mu_learned]}", mu_fixed, mu_learned, "fid"),
        judge.unstable_or_poor("μ̃ with the MSE is unstable or poor",
                               _paper_blank(PAPER_TABLE2[mu_simple]), mu_simple),
        judge.unstable_or_poor("ε with L and learned Σ is unstable or poor",
                               _paper_blank(PAPER_TABLE2[eps_learned]), eps_learned),
        judge.better("training on the true bound gives a better NLL than L_simple",
                     f"NLL {nll['fixed'][0]} vs {nll['simple'][0]} (ε, L fixed Σ vs L_simple)",
                     fixed, simple, "nll_bpd"),
        judge.test_train_agree("test and train NLL agree (no overfitting)",
                               f"{nll['simple'][0]} ({nll['simple'][1]}) for L_simple; "
                               f"{nll['fixed'][0]} ({nll['fixed'][1]}) for L, fixed Σ",
                               (simple, fixed)),
    ]
    made = [dataclasses.replace(f, noise=noise_label([judge.rows[k] for k in keys
                                                      if k in judge.rows]))
            if f.verdict != NOT_MEASURED else f for f, keys in zip(made, uses)]
    return pd.DataFrame([f.__dict__ for f in made])


NOTES = (
    "The interval is that of the claimed row's lead (positive: as the paper says) for "
    "'better' and 'best' claims (against the closest row: the one whose interval comes "
    "nearest a tie); on FID the lead is the ratio of the other row's FID to the claimed "
    "row's (above 1: as the paper says), since FID's noise grows with the score. The interval "
    "is that of the FID ratio for 'comparable', and of test - train for 'agree'. Scores: "
    "FID / IS of N samples with "
    "jackknife standard errors; NLL on the same test images for every run (paired where one "
    "seed each). Verdicts: reproduced where the interval lies on the paper's side, "
    "contradicted where it lies on the other, inconclusive where it straddles the line; "
    f"'comparable' means within a factor {COMPARABLE_FACTOR}, 'agree' within "
    f"{AGREE_FRACTION:.0%} of the train bound. Noise: what the intervals cover. With one "
    "seed a score's standard error is that of its samples, widened by the spread between "
    "training seeds that calibration/seeds.json measured for the same recipe; without such a "
    f"calibration the interval covers the samples only ('{SAMPLING_ONLY}'), and another seed "
    "or CPU may move the verdict. A calibrated verdict stands only where every calibration "
    "seed reached it too; where they split, the claim is inconclusive in every run.")


def to_markdown(frame: pd.DataFrame) -> str:
    """The findings as a markdown table (the rule column left to the csv) and the notes."""
    shown = frame[["claim", "paper", "ours", "interval", "verdict", "noise"]].rename(columns={
        "claim": "Claim (Ho et al. 2020)", "paper": "Paper", "ours": "Ours",
        "interval": "95 % interval", "verdict": "Verdict", "noise": "Noise"})
    return table_markdown(shown) + "\n" + NOTES + "\n"

