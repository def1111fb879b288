"""pipeline.reporting.findings: the verdicts on the paper's claims, on hand-made metrics."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.reporting import findings
from pipeline.reporting.findings import (CONTRADICTED, INCONCLUSIVE, NOT_MEASURED, REPRODUCED,
                                         paper_rows)
from pipeline.reporting.results import aggregate

ROWS = {
    "mu_vlb_learned": ("mu", "learned", "vlb"),
    "mu_vlb_fixed": ("mu", "fixed_large", "vlb"),
    "mu_simple": ("mu", "fixed_large", "simple"),
    "eps_vlb_learned": ("eps", "learned", "vlb"),
    "eps_vlb_fixed": ("eps", "fixed_large", "vlb"),
    "eps_simple": ("eps", "fixed_large", "simple"),
}
CLAIMS = ("best FID", "best IS", "comparable", "fixed beats learned", "mu MSE poor",
          "eps learned poor", "bound NLL", "test train")


def run(name, seed=0, *, fid=None, fid_se=0.3, is_mean=7.0, is_se=0.05, nll=3.9, nll_se=0.04,
        nll_train=None, nll_train_se=0.04, status="ok"):
    mean_type, var_type, loss = ROWS[name]
    record = {"experiment": name, "seed": seed, "status": status, "dataset": "digits",
              "mean_type": mean_type, "var_type": var_type, "loss": loss,
              "weighting": "uniform", "schedule": "linear", "num_timesteps": 200,
              "fid": fid, "fid_se": fid_se, "is_mean": is_mean, "is_mean_se": is_se,
              "kid_mean": 0.01, "kid_mean_se": 0.001, "nll_bpd": nll, "nll_bpd_se": nll_se,
              "nll_bpd_train": nll if nll_train is None else nll_train,
              "nll_bpd_train_se": nll_train_se}
    if status == "unstable":
        record.update({k: math.nan for k in record if k.startswith(("fid", "is_", "kid_",
                                                                   "nll_"))})
    return record


def judge(records, per_image=None):
    table = aggregate(pd.DataFrame(records))
    out = findings.findings(table, per_image or {})
    assert len(out) == len(CLAIMS)
    return dict(zip(CLAIMS, out["verdict"])), out


def paper_like():
    """The paper's pattern with tight intervals: every claim holds."""
    return [run("mu_vlb_learned", fid=24.0, is_mean=7.3),
            run("mu_vlb_fixed", fid=13.2, is_mean=8.0),
            run("mu_simple", status="unstable"),
            run("eps_vlb_learned", status="unstable"),
            run("eps_vlb_fixed", fid=13.5, is_mean=7.7, nll=3.70, nll_train=3.69,
                nll_se=0.01, nll_train_se=0.01),
            run("eps_simple", fid=3.2, is_mean=9.5, nll=3.75, nll_train=3.72, nll_se=0.01,
                nll_train_se=0.01)]



def test_the_papers_pattern_reproduces_every_claim():
    rng = np.random.default_rng(0)
    simple = rng.normal(3.75, 0.4, size=100)
    per_image = {"eps_simple-0": {"test": simple},
                 "eps_vlb_fixed-0": {"test": simple - 0.05 + rng.normal(0, 0.01, 100)}}
    verdicts, table = judge(paper_like(), per_image)
    assert set(verdicts.values()) == {REPRODUCED}, table[["claim", "verdict", "interval"]]
    best = table.iloc[0]
    assert "the closest, μ̃, L, fixed Σ: FID 13.20" in best["ours"]
    assert best["paper"].startswith("FID 3.17")
    # the bound's NLL advantage was judged image by image: 0.05 with a tight interval
    low, high = (float(v) for v in table.iloc[6]["interval"].strip("[]").split(","))
    assert 0.04 < low < 0.05 < high < 0.06


def test_the_opposite_pattern_contradicts_the_claims():
    records = [run("mu_vlb_learned", fid=20.0, is_mean=7.3),
               run("mu_vlb_fixed", fid=40.0, is_mean=6.0),   # worse than learned, 3x eps
               run("mu_simple", fid=5.0),                     # trains fine, beats the rest
               run("eps_vlb_learned", fid=8.0),
               run("eps_vlb_fixed", fid=13.5, nll=3.95, nll_train=3.20),
               run("eps_simple", fid=30.0, is_mean=9.5, nll=3.70, nll_train=3.69)]
    verdicts, _ = judge(records)
    assert verdicts == {"best FID": CONTRADICTED, "best IS": REPRODUCED,
                        "comparable": CONTRADICTED, "fixed beats learned": CONTRADICTED,
                        "mu MSE poor": CONTRADICTED, "eps learned poor": CONTRADICTED,
                        "bound NLL": CONTRADICTED, "test train": CONTRADICTED}


def test_overlapping_intervals_are_inconclusive():
    """Differences within the noise: no claim can be settled either way."""
    records = [run("mu_vlb_learned", fid=14.0, fid_se=2.0),
               run("mu_vlb_fixed", fid=13.0, fid_se=2.0),
               run("mu_simple", fid=16.0, fid_se=2.0),
               run("eps_vlb_learned", fid=15.0, fid_se=2.0),
               run("eps_vlb_fixed", fid=11.0, fid_se=2.0, nll=3.75, nll_train=3.60,
                   nll_se=0.06, nll_train_se=0.06),
               run("eps_simple", fid=10.0, fid_se=2.0, nll=3.76, nll_se=0.06)]
    verdicts, _ = judge(records)
    assert set(verdicts.values()) == {INCONCLUSIVE}, verdicts


def test_comparable_needs_the_whole_interval_within_the_factor():
    """FID 13.2 vs 13.5: comparable when the ratio's interval lies within 1/1.25..1.25;
    the same ratio measured loosely is inconclusive; 30 vs 13.5 tightly is contradicted."""
    def comparable(mu_fid, se):
        records = paper_like()
        records[1] = run("mu_vlb_fixed", fid=mu_fid, fid_se=se)
        records[4] = run("eps_vlb_fixed", fid=13.5, fid_se=se)
        return judge(records)[0]["comparable"]

    assert comparable(13.2, 0.3) == REPRODUCED
    assert comparable(13.2, 2.0) == INCONCLUSIVE
    assert comparable(30.0, 0.3) == CONTRADICTED


def test_claims_on_rows_the_study_lacks_are_not_measured():
    records = [r for r in paper_like() if r["experiment"] in ("eps_simple", "eps_vlb_fixed")]
    verdicts, _ = judge(records)
    assert verdicts["comparable"] == verdicts["fixed beats learned"] == NOT_MEASURED
    assert verdicts["mu MSE poor"] == verdicts["eps learned poor"] == NOT_MEASURED
    assert verdicts["best FID"] == REPRODUCED  # among the rows there are
    assert verdicts["bound NLL"] == REPRODUCED  # unpaired here: 0.05 against se 0.014


def test_several_seeds_judge_the_mean_with_the_spread_between_seeds():
    """Two seeds of each row. FID 3 vs 13 is settled even with 1 degree of freedom; an NLL
    advantage of 0.05 whose two seeds disagree by 0.2 is not."""
    records = []
    for seed, shift in ((0, -0.1), (1, 0.1)):
        records += [run(name, seed, fid=r["fid"], is_mean=r["is_mean"],
                        nll=r["nll_bpd"] + (shift if name == "eps_vlb_fixed" else 0.0),
                        nll_train=r["nll_bpd_train"], status=r["status"])
                    for name, r in zip(ROWS, paper_like())]
    table = aggregate(pd.DataFrame(records))
    assert (table["seeds"] == 2).all() and table["key"].isna().all()
    verdicts = dict(zip(CLAIMS, findings.findings(table, {})["verdict"]))
    assert verdicts["best FID"] == REPRODUCED
    assert verdicts["bound NLL"] == INCONCLUSIVE


def test_rows_are_found_by_what_they_are_not_by_name():
    records = paper_like()
    records[5]["experiment"] = "my_baseline"
    table = aggregate(pd.DataFrame(records))
    assert paper_rows(table)[("eps", "simple")]["experiment"] == "my_baseline"
    # a variant with another schedule plays no paper row
    variant = dict(records[5], experiment="cosine_simple", schedule="cosine")
    table = aggregate(pd.DataFrame([*records, variant]))
    assert paper_rows(table)[("eps", "simple")]["experiment"] == "my_baseline"


def test_findings_markdown_has_a_row_per_claim():
    _, table = judge(paper_like())
    md = findings.to_markdown(table)
    assert md.split("\n\n")[0].count("\n") == len(CLAIMS) + 1 and "jackknife" in md
    assert "| Verdict" in md or "Verdict |" in md
    with pytest.raises(KeyError, match="verdict"):  # no table without its verdicts
        findings.to_markdown(table.drop(columns="verdict"))


def test_a_best_claim_shows_the_comparison_nearest_a_tie_not_the_nearest_value():
    """L_simple's IS leads mu/L fixed by 1.5 +- 0.14 and mu/L learned by 2.5 +- 3.9: the second
    decides the verdict (its interval reaches past 0), so it is the one shown."""
    records = paper_like()
    records[0] = run("mu_vlb_learned", fid=24.0, is_mean=7.0, is_se=2.0)
    verdicts, table = judge(records)
    assert verdicts["best IS"] == INCONCLUSIVE
    best = table.iloc[1]
    assert "the closest, μ̃, L, learned Σ: IS 7.00 (ahead by 2.50)" in best["ours"]
    low, high = (float(v) for v in best["interval"].strip("[]").split(","))
    assert low < 0 < high


def test_fid_leads_are_ratios():
    """FID is compared on the log scale: L_simple (FID 3.2 +- 0.3) against mu/L fixed (13.2 +-
    0.3) leads by the ratio 13.2 / 3.2, with the delta method's interval."""
    verdicts, table = judge(paper_like())
    best = table.iloc[0]
    assert "ahead: FID ratio 4.12" in best["ours"]
    se = math.hypot(0.3 / 13.2, 0.3 / 3.2)
    low, high = (float(v) for v in best["interval"].strip("[]").split(","))
    assert low == pytest.approx(13.2 / 3.2 * math.exp(-1.959964 * se), abs=0.006)
    assert high == pytest.approx(13.2 / 3.2 * math.exp(1.959964 * se), abs=0.006)
