"""pipeline.measure.seed_noise, pipeline.reporting.calibration and stages.calibrate: the spread
between training seeds, measured once and kept as data, widens a single-seed study's intervals.

The statistics are checked on synthetic runs whose training spread tau and sampling error se
are known: a run's value is mu + N(0, tau^2) + N(0, se^2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats

from pipeline.artifacts.records import save_nll_per_image, save_run_metrics
from pipeline.core.params import load_params
from pipeline.measure.seed_noise import (SeedSpread, add_variance, leave_one_out, predicts,
                                         seed_spread)
from pipeline.measure.stats import Estimate
from pipeline.reporting import calibration as cal
from pipeline.reporting.findings import SAMPLING_ONLY, findings
from pipeline.reporting.results import aggregate, load_runs
from pipeline.reporting.verdicts import hold_verdicts
from stages import calibrate as calibrate_stage, tabulate as tabulate_stage

from helpers import SIX

TAU, SE = 2.0, 0.5   # the synthetic runs' training sd and sampling standard error of FID


def _draw(rng, k, mu=30.0, tau=TAU, se=SE):
    return [Estimate(float(mu + rng.normal(0, tau) + rng.normal(0, se)), se)
            for _ in range(k)]


# --------------------------------------------------------------------------------------------
# the statistics
# --------------------------------------------------------------------------------------------


def test_seed_spread_recovers_a_known_training_variance():
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(4000):
        runs = _draw(rng, 4)
        estimates.append(seed_spread([e.value for e in runs], [e.se for e in runs]).variance)
    assert np.mean(estimates) == pytest.approx(TAU ** 2, rel=0.05)
    spread = seed_spread([1.0, 2.0, 3.0, 4.0], [0.1] * 4)
    assert spread.df == 3 and spread.seeds == 4
    assert spread.variance == pytest.approx(np.var([1, 2, 3, 4], ddof=1) - 0.01)


def test_seed_spread_is_zero_where_the_seeds_spread_no_more_than_their_samples():
    assert seed_spread([1.0, 1.1, 0.9], [1.0, 1.0, 1.0]).variance == 0.0


def test_seed_spread_needs_two_runs_and_a_se_per_value():
    with pytest.raises(ValueError, match="at least 2 runs"):
        seed_spread([1.0], [0.1])
    with pytest.raises(ValueError, match="a value per standard error"):
        seed_spread([1.0, 2.0], [0.1])


def test_add_variance_sums_variances_with_welch_satterthwaite_degrees_of_freedom():
    own = Estimate(3.0, 0.5)                       # normal: infinite df
    # tau^2 = s^2 - se^2 of each: the s^2 are the random parts
    a, b = SeedSpread(4.0, 3, 4, between=4.25), SeedSpread(1.0, 5, 6, between=1.2)
    wide = add_variance(own, [a, b])
    assert wide.value == 3.0
    assert wide.se == pytest.approx(math.sqrt(0.25 + 4.0 + 1.0))
    assert wide.df == pytest.approx((0.25 + 4 + 1) ** 2 / (4.25 ** 2 / 3 + 1.2 ** 2 / 5))
    # equal sampling errors: one run's interval is value +- t(k - 1) s, the classical one
    assert add_variance(Estimate(3.0, 0.5), [a]).df == pytest.approx(3)
    assert add_variance(own, [SeedSpread(0.0, 3, 4, 0.2)]) == own   # no training noise


def test_a_widened_single_seed_interval_covers_the_true_mean_at_its_nominal_rate():
    """Many studies: a calibration of 4 seeds, then one new single-seed run of the recipe.
    Its own interval (samples only) covers the recipe's mean far too rarely; widened by the
    calibration's spread it covers it about 95 % of the time."""
    rng = np.random.default_rng(1)
    mu, trials, own_hits, wide_hits = 30.0, 4000, 0, 0
    for _ in range(trials):
        calibration = _draw(rng, 4, mu)
        new = _draw(rng, 1, mu)[0]
        spread = seed_spread([e.value for e in calibration], [e.se for e in calibration])
        low, high = new.interval()
        own_hits += low <= mu <= high
        low, high = add_variance(new, [spread]).interval()
        wide_hits += low <= mu <= high
    z = scipy_stats.norm.ppf(0.975)   # the own interval's coverage in closed form: 0.365
    expected = 2 * scipy_stats.norm.cdf(z * SE / math.hypot(TAU, SE)) - 1
    assert own_hits / trials == pytest.approx(expected, abs=0.025)
    assert 0.93 <= wide_hits / trials <= 0.975


def test_leave_one_out_coverage_is_nominal_with_training_noise_and_low_without():
    rng = np.random.default_rng(2)
    with_training = sampling_only = checked = 0
    for _ in range(1000):
        runs = _draw(rng, 4)
        hit, n = leave_one_out(runs, training=True)
        miss, _ = leave_one_out(runs, training=False)
        with_training, sampling_only, checked = with_training + hit, sampling_only + miss, \
            checked + n
    assert checked == 4000
    assert 0.93 <= with_training / checked <= 0.975
    # sampling alone: the sd of (new - mean of 3) it assumes, against the true one
    ratio = math.sqrt(SE ** 2 * (1 + 1 / 3)) / math.sqrt((TAU ** 2 + SE ** 2) * (1 + 1 / 3))
    expected = 2 * scipy_stats.norm.cdf(scipy_stats.norm.ppf(0.975) * ratio) - 1
    assert sampling_only / checked == pytest.approx(expected, abs=0.03)


def test_predicts_is_the_closed_form_prediction_interval_when_sampling_noise_is_nil():
    # se -> 0: the classical t prediction interval mean +- t(k-1) s sqrt(1 + 1/k)
    others = [Estimate(v, 0.0) for v in (1.0, 2.0, 4.0)]
    s, k = np.std([1, 2, 4], ddof=1), 3
    half = scipy_stats.t.ppf(0.975, k - 1) * s * math.sqrt(1 + 1 / k)
    mean = 7 / 3
    assert predicts(others, Estimate(mean + 0.99 * half, 0.0)) is True
    assert predicts(others, Estimate(mean + 1.01 * half, 0.0)) is False
    assert predicts(others, Estimate(math.nan, 0.1)) is None


# --------------------------------------------------------------------------------------------
# the file, the recipe, a study's rows
# --------------------------------------------------------------------------------------------


def _params(tmp_path, seeds=(0,), **sections):
    path = tmp_path / "params.yaml"
    raw = {"study": {"seeds": list(seeds)}, "experiments": SIX,
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "artifact_root": str(tmp_path / "mlartifacts")},
           "sampling_steps": {"experiments": []}, **sections}
    path.write_text(yaml.safe_dump(raw))
    return path


FID = {"eps_simple": 9.0, "mu_vlb_learned": 47.0, "mu_vlb_fixed": 46.0, "mu_simple": 55.0,
       "eps_vlb_learned": 188.0, "eps_vlb_fixed": 26.0}


def _write_runs(metrics_dir, seeds, rng, tau=TAU):
    """Every experiment with each seed: FID = the row's FID + N(0, tau^2); se 0.5 throughout."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for name, row in SIX.items():
            nll = 2.5 + (0.1 if "vlb" in name else 0.0) + rng.normal(0, 0.05)
            record = {"experiment": name, "seed": seed, "status": "ok", "dataset": "digits",
                      **row, "weighting": "uniform", "schedule": "linear",
                      "num_timesteps": 200, "fid": FID[name] + rng.normal(0, tau),
                      "fid_se": SE, "is_mean": 7.0 + rng.normal(0, 0.2), "is_mean_se": 0.1,
                      "kid_mean": 5.0, "kid_mean_se": 1.0, "nll_bpd": nll,
                      "nll_bpd_se": 0.02, "nll_bpd_train": nll - 0.03,
                      "nll_bpd_train_se": 0.02}
            key = f"{name}-{seed}"
            save_run_metrics(metrics_dir, key, record)
            images = np.full(100, nll) + rng.normal(0, 0.2, 100)
            save_nll_per_image(metrics_dir / f"{key}_nll.csv", {"test": images,
                                                                "train": images - 0.03})


@pytest.fixture
def calibrated(tmp_path):
    """A calibration of 4 seeds (1-4) written by the stage, and the single-seed study (seed 0)."""
    rng = np.random.default_rng(3)
    metrics = tmp_path / "metrics"
    _write_runs(metrics, [0, 1, 2, 3, 4], rng)
    params = _params(tmp_path)
    out = tmp_path / "calibration" / "seeds.json"
    assert calibrate_stage.main(["--params", str(params), "--metrics", str(metrics),
                                 "--seeds", "1", "2", "3", "4", "--out", str(out),
                                 "--machine", "test machine"]) == 0
    return params, metrics, out


def test_recipe_leaves_out_where_work_runs_but_not_what_it_computes(tmp_path):
    base = load_params(_params(tmp_path)).experiments["eps_simple"]
    moved = load_params(_params(tmp_path, sample={"num_workers": 2, "batch_size": 100},
                                evaluate={"cpus_per_worker": 1.0})).experiments["eps_simple"]
    longer = load_params(_params(tmp_path, train={"steps": 900})).experiments["eps_simple"]
    digest = cal.recipe_digest
    assert digest(cal.recipe(base)) == digest(cal.recipe(moved))
    assert digest(cal.recipe(base)) != digest(cal.recipe(longer))
    two = load_params(_params(tmp_path, seeds=(0, 1)))
    assert digest(cal.recipe(two.experiment("eps_simple", 0))) == \
        digest(cal.recipe(two.experiment("eps_simple", 1)))         # the training seed is not
    split = load_params(_params(tmp_path, data={"seed": 1})).experiments["eps_simple"]
    assert digest(cal.recipe(split)) != digest(cal.recipe(base))    # the data split is


def test_the_stage_writes_the_runs_and_a_report_of_spread_and_coverage(calibrated):
    out = calibrated[2]
    content = json.loads(out.read_text())
    assert content["seeds"] == [1, 2, 3, 4] and content["machine"] == "test machine"
    entry = content["experiments"]["eps_simple"]
    assert sorted(entry["runs"]) == ["1", "2", "3", "4"]
    assert set(entry["runs"]["1"]) == {"fid", "is_mean", "kid_mean", "nll_bpd",
                                       "nll_bpd_train", "nll_gap", "log_fid", "precision",
                                       "recall"}
    report = out.with_suffix(".md").read_text()
    assert "## Spread between seeds" in report and "## Coverage, each seed left out" in report
    calibration = cal.load_calibration(out)
    spreads = cal.spread_frame(calibration)
    fid = spreads[spreads["score"] == "fid"]
    values = [entry["runs"][s]["fid"]["value"] for s in "1234"]
    assert fid[fid["experiment"] == "eps_simple"]["sd_between_seeds"].iloc[0] == \
        pytest.approx(np.std(values, ddof=1))
    coverage = cal.coverage_frame(calibration)
    assert coverage[coverage["score"] == "fid"]["checked"].iloc[0] == 6 * 4
    log_fid = spreads[spreads["score"] == "log_fid"]
    assert log_fid[log_fid["experiment"] == "eps_simple"]["mean"].iloc[0] == \
        pytest.approx(np.mean(np.log(values)))


def test_tabulate_widens_single_seed_rows_of_the_calibrated_recipe(calibrated):
    params_path, metrics, out = calibrated
    params = load_params(params_path)
    calibration = cal.load_calibration(out)
    table = aggregate(load_runs(metrics, [(name, 0) for name in SIX]))
    rows = cal.apply_calibration(table, params, calibration)
    row = rows[rows["experiment"] == "eps_simple"].iloc[0]
    spread = calibration.spread("eps_simple", "fid")
    assert row["noise"] == cal.NOISE_CALIBRATED
    assert row["fid_se"] == pytest.approx(math.hypot(SE, spread.sd))
    assert row["fid_se_sampling"] == pytest.approx(SE)
    low, high = add_variance(Estimate(row["fid"], SE), [spread]).interval()
    assert (row["fid_low"], row["fid_high"]) == pytest.approx((low, high))
    found = findings(rows)
    assert set(found["noise"]) == {"one seed, training noise calibrated on 4 seeds"}


def test_a_changed_recipe_keeps_sampling_noise_and_says_so(calibrated, tmp_path):
    _, metrics, out = calibrated
    params = load_params(_params(tmp_path, train={"steps": 900}))
    table = aggregate(load_runs(metrics, [(name, 0) for name in SIX]))
    rows = cal.apply_calibration(table, params, cal.load_calibration(out))
    assert set(rows["noise"]) == {cal.NOISE_SAMPLING}
    assert rows["fid_se"].tolist() == table["fid_se"].tolist()
    assert set(findings(rows)["noise"]) == {SAMPLING_ONLY}
    several = aggregate(load_runs(metrics, [(name, s) for name in SIX for s in (0, 1)]))
    assert set(cal.apply_calibration(several, params, None)["noise"]) == {cal.NOISE_SEEDS}


def test_the_paired_nll_difference_takes_both_rows_training_variance(calibrated):
    params_path, metrics, out = calibrated
    table = aggregate(load_runs(metrics, [(name, 0) for name in SIX]))
    per_image = {}
    from pipeline.artifacts.records import load_nll_per_image, nll_path
    for key in table["key"]:
        per_image[key] = load_nll_per_image(nll_path(metrics, key), key)
    plain = findings(table, per_image)
    wide = findings(cal.apply_calibration(table, load_params(params_path),
                                          cal.load_calibration(out)), per_image)
    claim = "training on the true bound gives a better NLL than L_simple"

    def width(frame):
        text = frame[frame["claim"] == claim]["interval"].iloc[0]
        low, high = (float(v) for v in text.strip("[]").split(","))
        return high - low

    assert width(wide) > width(plain)


def test_tabulate_stage_reads_the_calibration_and_labels_the_findings(calibrated, tmp_path):
    params, metrics, out = calibrated
    results = tmp_path / "results"
    argv = ["--params", str(params), "--metrics", str(metrics), "--results", str(results),
            "--sweep", str(tmp_path / "none.csv"), "--plots", str(tmp_path / "plots"),
            "--charts", str(tmp_path / "charts"), "--lock", str(tmp_path / "dvc.lock"), "--calibration", str(out)]
    assert tabulate_stage.main(argv) == 0
    assert "training noise calibrated on 4 seeds" in (results / "findings.md").read_text()
    argv[-1] = str(tmp_path / "absent.json")
    assert tabulate_stage.main(argv) == 0
    assert pd.read_csv(results / "findings.csv")["noise"].eq(SAMPLING_ONLY).all()


def test_check_compares_runs_made_elsewhere_with_the_calibration(calibrated, capsys):
    params, metrics, out = calibrated
    capsys.readouterr()
    assert calibrate_stage.main(["--params", str(params), "--out", str(out),
                                 "--check", str(metrics), "--check-seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "covered with training:" in printed and "covered sampling only:" in printed


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_a_corrupt_calibration_is_one_clear_error_and_stays_as_it_was(calibrated, tmp_path,
                                                                       capsys):
    params, metrics, out = calibrated
    out.write_text('{"format": 1, "seeds": [1, 2], "experiments": {"eps_simple": {}}}')
    with pytest.raises(cal.CalibrationError, match="malformed calibration.*stages.calibrate"):
        cal.load_calibration(out)
    out.write_text("{not json")
    with pytest.raises(cal.CalibrationError, match="not valid JSON"):
        cal.load_calibration(out)
    argv = ["--params", str(params), "--metrics", str(metrics), "--results",
            str(tmp_path / "results"), "--sweep", str(tmp_path / "none.csv"), "--plots",
            str(tmp_path / "plots"), "--lock", str(tmp_path / "dvc.lock"),
            "--calibration", str(out)]
    assert tabulate_stage.main(argv) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert out.read_text() == "{not json"


def test_calibrating_on_missing_seeds_or_one_seed_names_the_fix(calibrated, capsys):
    params, metrics, out = calibrated
    before = out.read_text()
    assert calibrate_stage.main(["--params", str(params), "--metrics", str(metrics),
                                 "--seeds", "1", "7", "--out", str(out)]) == 2
    assert "seed" in capsys.readouterr().err
    assert calibrate_stage.main(["--params", str(params), "--metrics", str(metrics),
                                 "--seeds", "1", "--out", str(out)]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err
    assert out.read_text() == before


# --------------------------------------------------------------------------------------------
# verdicts that depend on the seed
# --------------------------------------------------------------------------------------------


def test_the_calibration_keeps_each_seeds_verdicts(calibrated):
    out = calibrated[2]
    verdicts = json.loads(out.read_text())["verdicts"]
    assert len(verdicts) == 8
    assert all(sorted(by_seed) == ["1", "2", "3", "4"] for by_seed in verdicts.values())
    assert "## Each seed's verdicts" in out.with_suffix(".md").read_text()


def _calibrated_findings(calibrated):
    params_path, metrics, out = calibrated
    calibration = cal.load_calibration(out)
    table = aggregate(load_runs(metrics, [(name, 0) for name in SIX]))
    return findings(cal.apply_calibration(table, load_params(params_path), calibration)), \
        calibration


def test_a_verdict_the_seeds_disagree_on_is_inconclusive_in_every_run(calibrated):
    import dataclasses

    found, calibration = _calibrated_findings(calibrated)
    claim, verdict = found["claim"].iloc[0], found["verdict"].iloc[0]
    assert verdict == "reproduced"
    split = dataclasses.replace(calibration, verdicts={
        claim: {1: "reproduced", 2: "reproduced", 3: "inconclusive", 4: "reproduced"}})
    held = hold_verdicts(found, split)
    assert held["verdict"].iloc[0] == "inconclusive"
    assert "the calibration's seeds: reproduced with seeds 1, 2, 4, inconclusive with seed 3" \
        in held["ours"].iloc[0]
    assert held.iloc[1:].equals(found.iloc[1:])          # the other claims are untouched
    agree = dataclasses.replace(calibration, verdicts={claim: {s: verdict for s in (1, 2, 3, 4)}})
    assert hold_verdicts(found, agree).equals(found)
    # this run differs from seeds that agree with each other: it depends on the CPU or seed
    other = dataclasses.replace(calibration, verdicts={claim: {s: "inconclusive"
                                                               for s in (1, 2, 3, 4)}})
    assert hold_verdicts(found, other)["verdict"].iloc[0] == "inconclusive"


def test_sampling_only_findings_are_not_held_to_a_calibration_of_another_recipe(calibrated):
    import dataclasses

    found, calibration = _calibrated_findings(calibrated)
    found = found.assign(noise=SAMPLING_ONLY)
    split = dataclasses.replace(calibration, verdicts={
        found["claim"].iloc[0]: {1: "reproduced", 2: "contradicted"}})
    assert hold_verdicts(found, split).equals(found)
