"""pipeline.reporting.results, pipeline.reporting.tables, pipeline.reporting.sweep_report,
pipeline.artifacts.loss_curve and
stages.tabulate: the study's results loaded, the paper's Tables 1 and 2, the sweep table, the
loss curves."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.artifacts.loss_curve import LossCurveError, load_loss_curve, save_loss_curve
from pipeline.artifacts.records import (DVC_METRICS, ResultsError, load_reference, load_run_metrics,
                                        sampling_steps_path, save_sampling_steps,
                                        save_nll_per_image, save_reference, save_run_metrics)
from pipeline.artifacts.trials import load_sweep_trials
from pipeline.reporting.results import aggregate, load_runs
from pipeline.reporting.sweep_report import build_sweep, sweep_raw, sweep_table, write_sweep
from pipeline.reporting.formats import (TEX, format_interval, format_mean_std, format_nll,
                                        to_markdown)
from pipeline.reporting.tables import build_tables, write_tables
from pipeline.reporting.tabulate_job import loss_figure, report, run_tabulate
from stages import tabulate as tabulate_stage

from helpers import SIX

PROJECT = Path(__file__).resolve().parents[1]


def table1(df, reference, dataset, notation=None):
    """Table 1 as `build_tables` formats it (in TEX with notation=TEX)."""
    return build_tables(df, dataset, reference)["table1_tex" if notation is TEX else "table1"]


def table1_raw(df, reference, dataset):
    return build_tables(df, dataset, reference)["table1_raw"]


def table2(df, dataset, notation=None):
    return build_tables(df, dataset)["table2_tex" if notation is TEX else "table2"]


def table2_raw(df, dataset):
    return build_tables(df, dataset)["table2_raw"]

UNSTABLE = "mu_simple"
FID = {name: 3.2 + 10 * i + 0.123456789 for i, name in enumerate(SIX)}
Z = 1.959963984540054  # the 97.5 % quantile of the normal distribution
REFERENCE = {
    "real_data": {"fid": 4.41, "fid_sd": 1.4, "is_mean": 9.81, "is_mean_sd": 0.05,
                  "kid_mean": 0.0, "kid_mean_sd": 0.001, "precision": 0.72,
                  "precision_sd": 0.02, "recall": 0.7, "recall_sd": 0.03, "draws": 10,
                  "num_images": 400,
                  "reference_images": 1397},
    "untrained": {"fid": 310.5, "fid_se": 2.0, "is_mean": 1.3, "is_mean_se": 0.01,
                  "kid_mean": 0.4, "kid_mean_se": 0.01, "nll_bpd": 8.1, "nll_bpd_se": 0.05},
    "ceiling": {"levels": 17, "nll_bpd": math.log2(17)},
}


def cell(value, se, digits=2):
    return f"{value:.{digits}f} [{value - Z * se:.{digits}f}, {value + Z * se:.{digits}f}]"


def _record(name: str, dataset: str = "digits", seed: int = 0, **overrides) -> dict:
    status = "unstable" if name == UNSTABLE else "ok"
    record = {"experiment": name, "seed": seed, "status": status, "dataset": dataset,
              **SIX.get(name, {}), "weighting": "uniform", "schedule": "linear",
              "num_timesteps": 1000, "fid": FID.get(name, 5.0), "fid_se": 0.5,
              "is_mean": 8.1, "is_mean_se": 0.05, "kid_mean": 0.01, "kid_mean_se": 0.002,
              "nll_bpd": 3.9, "nll_bpd_se": 0.02, "nll_bpd_train": 3.8,
              "nll_bpd_train_se": 0.02, "precision": 0.75, "precision_se": 0.02,
              "recall": 0.5, "recall_se": 0.03, "nll_method": "exact", "train_steps": 2000,
              "final_loss": 0.03, "train_wall_s": 120.0, "images_per_s": 2100.0}
    if status == "unstable":
        record.update({k: None for k in record if k.startswith(("fid", "is_mean", "kid_",
                                                                   "nll_bpd", "precision",
                                                                   "recall"))})
    record.update(overrides)
    return record


def _write_metrics(metrics_dir, records) -> None:
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        key = f"{record['experiment']}-{record.get('seed', 0)}"
        save_run_metrics(metrics_dir, key, record)
        values = np.full(20, record["nll_bpd"] or np.nan)
        save_nll_per_image(metrics_dir / f"{key}_nll.csv", {"test": values, "train": values})


def _runs(names, seeds=(0,)):
    return [(name, seed) for name in names for seed in seeds]


@pytest.fixture
def metrics_dir(tmp_path):
    path = tmp_path / "metrics"
    _write_metrics(path, [_record(name) for name in SIX])
    (path / "reference.json").write_text(json.dumps(REFERENCE))
    save_sampling_steps(sampling_steps_path(path, "eps_simple-0"), STEPS)
    return path


# eps_simple-0 against sampling steps (params.yaml's sampling_steps: DDIM at 10, 20, 50, 100)
STEPS = pd.DataFrame(
    [{"sampler": "ddim", "steps": s, "eta": 0.0, "num_samples": 400, "fid": fid,
      "fid_se": 1.0, "is_mean": 7.0, "is_mean_se": 0.1, "kid_mean": 9.0, "kid_mean_se": 1.0,
      "precision": 0.6, "precision_se": 0.02, "recall": 0.9, "recall_se": 0.03}
     for s, fid in ((10, 25.0), (20, 17.0), (50, 14.0), (100, 13.5))]
    + [{"sampler": "ancestral", "steps": 1000, "eta": 0.0, "num_samples": 400, "fid": 9.0,
        "fid_se": 1.5, "is_mean": 8.1, "is_mean_se": 0.05, "kid_mean": 6.0, "kid_mean_se": 2.0,
        "precision": 0.75, "precision_se": 0.02, "recall": 0.5, "recall_se": 0.03}])


@pytest.fixture
def six(metrics_dir):
    return aggregate(load_runs(metrics_dir, _runs(SIX)))


def _md_rows(md: str) -> list[list[str]]:
    """Cells of a markdown pipe table (header first, separator dropped), '\\|' unescaped."""
    rows = []
    for line in md.strip().splitlines():
        cells = [c.strip().replace("\\|", "|")
                 for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not all(set(c) <= set(":-") for c in cells):
            rows.append(cells)
    return rows


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def test_load_runs_one_row_per_run_and_aggregate_one_per_experiment(metrics_dir, six):
    runs = load_runs(metrics_dir, _runs(SIX))
    assert list(runs["experiment"]) == list(SIX) and set(runs["seed"]) == {0}
    assert runs["fid"].dtype == "float64" and "train_wall_s" in runs.columns  # extras kept
    assert list(six["experiment"]) == list(SIX) and (six["seeds"] == 1).all()
    assert six["nll_bpd_train"].dtype == "float64"
    unstable = six.set_index("experiment").loc[UNSTABLE]
    assert unstable["status"] == "unstable" and math.isnan(unstable["fid"])
    row = six.set_index("experiment").loc["eps_simple"]
    assert row["fid"] == FID["eps_simple"] and row["key"] == "eps_simple-0"
    assert (row["fid_low"], row["fid_high"]) == pytest.approx(
        (FID["eps_simple"] - Z * 0.5, FID["eps_simple"] + Z * 0.5))


def test_several_seeds_average_and_spread(tmp_path):
    records = [_record("eps_simple", seed=0, fid=10.0), _record("eps_simple", seed=1, fid=12.0),
               _record("eps_simple", seed=2, fid=14.0),
               _record(UNSTABLE, seed=0), _record(UNSTABLE, seed=1, status="ok", fid=9.0),
               _record(UNSTABLE, seed=2, status="ok", fid=9.0)]
    _write_metrics(tmp_path, records)
    table = aggregate(load_runs(tmp_path, _runs(["eps_simple", UNSTABLE], (0, 1, 2))))
    row = table.set_index("experiment").loc["eps_simple"]
    assert row["seeds"] == 3 and row["fid"] == 12.0 and row["fid_sd"] == 2.0
    assert row["fid_df"] == 2 and row["fid_se"] == pytest.approx(2.0 / math.sqrt(3))
    assert row["fid_high"] - row["fid"] == pytest.approx(4.302653 * 2.0 / math.sqrt(3))
    assert table.set_index("experiment").loc[UNSTABLE, "status"] == "unstable"  # one diverged
    cells = {r[0]: r[1:] for r in _md_rows(to_markdown(table2(table, "digits")))}
    assert cells["||ε̃ − ε_θ||² (L_simple)"][1] == "12.00 ± 2.00"


def test_unstable_run_metrics_are_dropped_even_if_present(tmp_path):
    _write_metrics(tmp_path, [_record(UNSTABLE, fid=123.0)])
    assert math.isnan(load_runs(tmp_path, _runs([UNSTABLE]))["fid"].iloc[0])


def test_missing_metrics_file_names_the_file_and_the_command(metrics_dir):
    (metrics_dir / "eps_simple-0.json").unlink()
    (metrics_dir / "mu_simple-0.json").unlink()
    with pytest.raises(ResultsError) as err:
        load_runs(metrics_dir, _runs(SIX))
    message = str(err.value)
    assert str(metrics_dir / "eps_simple-0.json") in message
    assert "dvc repro evaluate@eps_simple-0" in message
    assert "python -m stages.evaluate --experiment eps_simple --seed 0" in message
    assert "1 more missing: mu_simple-0" in message


def test_corrupt_metrics_json_names_the_file(metrics_dir):
    (metrics_dir / "mu_vlb_fixed-0.json").write_text('{"fid": 3.2,')
    with pytest.raises(ResultsError, match=r"mu_vlb_fixed-0\.json: not valid JSON"):
        load_runs(metrics_dir, _runs(SIX))


def test_run_metrics_split_numbers_for_dvc_from_the_description(tmp_path):
    """metrics/<key>.json holds only the measured numbers (what `dvc metrics diff` compares);
    everything else is in metrics/<key>_run.json; loading joins them back."""
    record = _record("eps_simple", best_checkpoint_step=None, evaluate_wall_s=9.5)
    numbers_path, info_path = save_run_metrics(tmp_path, "eps_simple-0", record)
    numbers = json.loads(numbers_path.read_text())
    info = json.loads(info_path.read_text())
    assert set(numbers) == {k for k in DVC_METRICS if record.get(k) is not None}
    assert all(type(v) in (int, float) for v in numbers.values())
    assert info["experiment"] == "eps_simple" and info["loss"] == "simple"
    assert info["evaluate_wall_s"] == 9.5 and "fid" not in info
    loaded = load_run_metrics(tmp_path, "eps_simple-0", {})
    assert {k: loaded[k] for k in record if record[k] is not None} == \
        {k: v for k, v in record.items() if v is not None}
    unstable = save_run_metrics(tmp_path, "u-0", _record(UNSTABLE))[0]
    assert json.loads(unstable.read_text()) == {"train_steps": 2000, "final_loss": 0.03}


def test_reference_keeps_finite_numbers_only(tmp_path):
    save_reference(tmp_path / "reference.json",
                   {"real_data": {"fid": 4.0, "fid_sd": math.nan, "draws": 1},
                    "ceiling": {"levels": 17, "nll_bpd": 4.09}})
    assert json.loads((tmp_path / "reference.json").read_text()) == {
        "real_data": {"fid": 4.0, "draws": 1}, "ceiling": {"levels": 17, "nll_bpd": 4.09}}


def test_text_in_the_dvc_metrics_file_names_the_file_and_key(tmp_path):
    _write_metrics(tmp_path, [_record("eps_simple")])
    (tmp_path / "eps_simple-0.json").write_text(json.dumps({"fid": "three"}))
    with pytest.raises(ResultsError, match=r"eps_simple-0\.json: 'fid' must be a number, "
                                           r"got 'three'; remake it with `dvc repro"):
        load_runs(tmp_path, _runs(["eps_simple"]))


@pytest.mark.parametrize("overrides, match", [
    ({"status": "diverged"}, r"'status' is 'diverged'"),
    ({"loss": "l1"}, r"'loss' is 'l1'; expected one of: simple, vlb, hybrid"),
])
def test_bad_run_descriptions_name_the_file_and_key(tmp_path, overrides, match):
    _write_metrics(tmp_path, [{**_record("eps_simple"), **overrides}])
    with pytest.raises(ResultsError, match=match) as err:
        load_runs(tmp_path, _runs(["eps_simple"]))
    assert "eps_simple-0_run.json" in str(err.value)


def test_metrics_without_mean_type_is_an_error(tmp_path):
    record = _record("eps_simple")
    del record["mean_type"]
    _write_metrics(tmp_path, [record])
    with pytest.raises(ResultsError, match="missing key 'mean_type'"):
        load_runs(tmp_path, _runs(["eps_simple"]))


def test_corrupt_reference_names_the_file(metrics_dir):
    (metrics_dir / "reference.json").write_text("[1, 2")
    with pytest.raises(ResultsError, match=r"reference\.json: not valid JSON"):
        load_reference(metrics_dir)


def test_absent_reference_is_none(tmp_path):
    assert load_reference(tmp_path) is None


# --------------------------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------------------------


def test_table2_groups_and_orders_rows_as_in_the_paper(six):
    table = table2(six, "digits")
    assert list(table.columns) == ["Objective", "IS", "FID", "NLL Test (Train)", "KID",
                                   "Precision", "Recall"]
    assert list(table["Objective"]) == [
        "μ̃ prediction (baseline)",
        "L, learned diagonal Σ",
        "L, fixed isotropic Σ",
        "||μ̃ − μ̃_θ||²",
        "ε prediction (ours)",
        "L, learned diagonal Σ",
        "L, fixed isotropic Σ",
        "||ε̃ − ε_θ||² (L_simple)",
    ]
    headers = table[table["Objective"].str.endswith(("(baseline)", "(ours)"))]
    assert (headers.drop(columns="Objective") == "").all().all()
    raw = table2_raw(six, "digits")
    assert list(raw["experiment"]) == ["mu_vlb_learned", "mu_vlb_fixed", "mu_simple",
                                       "eps_vlb_learned", "eps_vlb_fixed", "eps_simple"]


def test_table2_formats_numbers_and_shows_a_dash_for_the_unstable_row(six):
    rows = {r[0]: r[1:] for r in _md_rows(to_markdown(table2(six, "digits")))}
    assert rows["||μ̃ − μ̃_θ||²"] == ["–"] * 6
    assert rows["||ε̃ − ε_θ||² (L_simple)"] == [
        cell(8.1, 0.05), cell(FID["eps_simple"], 0.5), f"≤ {cell(3.9, 0.02)} (3.80)",
        cell(0.01, 0.002, 4), cell(0.75, 0.02), cell(0.5, 0.03)]  # KID: 3 significant figures


def test_markdown_keeps_trailing_zeros_and_escapes_norm_bars(six):
    md = to_markdown(table2(six.assign(fid=3.2, fid_low=None, nll_bpd=4.0, nll_bpd_low=None),
                            "digits"))
    assert "| 3.20 " in md and "≤ 4.00 (3.80)" in md  # not tabulate's "3.2"
    assert r"\|\|μ̃ − μ̃_θ\|\|²" in md
    widths = {len(re.split(r"(?<!\\)\|", line)) for line in md.strip().splitlines()}
    assert len(widths) == 1  # every line has the same number of cells


def test_table2_for_cifar10_has_the_papers_columns(six):
    df = six.assign(dataset="cifar10")
    table = table2(df, "cifar10")
    assert list(table.columns)[-2:] == ["IS (paper)", "FID (paper)"]
    raw = table2_raw(df, "cifar10").set_index("experiment")
    assert raw.loc["eps_simple", "fid_paper"] == 3.17
    assert raw.loc["mu_vlb_learned", "is_mean_paper"] == 7.28
    assert raw.loc["eps_vlb_learned", "paper_status"] == "unstable"
    by_objective = [(r[0], r[-2:]) for r in _md_rows(to_markdown(table))[1:]]
    assert ("L, learned diagonal Σ", ["7.28 ± 0.10", "23.69"]) in by_objective
    assert ("L, fixed isotropic Σ", ["8.06 ± 0.09", "13.22"]) in by_objective
    assert ("||μ̃ − μ̃_θ||²", ["–", "–"]) in by_objective
    assert ("L, learned diagonal Σ", ["–", "–"]) in by_objective
    assert ("L, fixed isotropic Σ", ["7.67 ± 0.13", "13.51"]) in by_objective
    assert ("||ε̃ − ε_θ||² (L_simple)", ["9.46 ± 0.11", "3.17"]) in by_objective
    assert "IS (paper)" not in table2(six, "digits").columns


def test_table2_puts_x0_hybrid_and_variants_where_they_belong(tmp_path):
    records = [
        _record("x0_simple", mean_type="x0", var_type="fixed_large", loss="simple"),
        _record("eps_hybrid", mean_type="eps", var_type="learned_range", loss="hybrid"),
        _record("eps_simple"),
        _record("eps_cos_p2", mean_type="eps", var_type="fixed_large", loss="simple",
                schedule="cosine", weighting="p2"),
    ]
    _write_metrics(tmp_path, records)
    df = aggregate(load_runs(tmp_path, _runs([r["experiment"] for r in records])))
    assert list(table2(df, "digits")["Objective"]) == [
        "ε prediction (ours)",
        "||ε̃ − ε_θ||² (L_simple)",
        "||ε̃ − ε_θ||² (L_simple) [cosine schedule, P2 weighting]",
        "L_hybrid [learned-range Σ]",
        "x₀ prediction",
        "||x₀ − x̂_θ||²",
    ]


# --------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------


def test_table1_labels_name_every_parameterization_but_the_papers_eps(six):
    table = table1(six, None, "digits")
    assert list(table.columns) == ["Model", "IS", "FID", "NLL Test (Train)", "Precision",
                                   "Recall"]
    assert list(table["Model"]) == [
        "Ours (μ̃ prediction, L, learned diagonal Σ)",
        "Ours (μ̃ prediction, L, fixed isotropic Σ)",
        "Ours (||μ̃ − μ̃_θ||²)",
        "Ours (ε prediction, L, learned diagonal Σ)",
        "Ours (ε prediction, L, fixed isotropic Σ)",
        "Ours (L_simple)",
    ]
    only_eps = six[six["mean_type"] == "eps"]
    assert list(table1(only_eps, None, "digits")["Model"]) == [
        "Ours (L, learned diagonal Σ)", "Ours (L, fixed isotropic Σ)", "Ours (L_simple)"]
    # a μ̃ row is never mistaken for the paper's ε rows, even when no ε row shares its objective
    without_eps_learned = six[six["experiment"] != "eps_vlb_learned"]
    assert list(table1(without_eps_learned, None, "digits")["Model"])[:2] == [
        "Ours (μ̃ prediction, L, learned diagonal Σ)", "Ours (μ̃ prediction, L, fixed isotropic Σ)"]
    only_mu_fixed = six[six["experiment"] == "mu_vlb_fixed"]
    assert list(table1(only_mu_fixed, None, "digits")["Model"]) == [
        "Ours (μ̃ prediction, L, fixed isotropic Σ)"]


def test_table1_cells(six):
    table = table1(six, None, "digits").set_index("Model")
    assert list(table.loc["Ours (L_simple)"]) == [
        cell(8.1, 0.05), cell(FID["eps_simple"], 0.5), f"≤ {cell(3.9, 0.02)} (3.80)",
        cell(0.75, 0.02), cell(0.5, 0.03)]
    assert list(table.loc["Ours (||μ̃ − μ̃_θ||²)"]) == ["–"] * 5


def test_table1_appends_weighting_and_schedule_and_separates_duplicates(tmp_path):
    records = [_record("eps_simple"),
               _record("eps_minsnr", mean_type="eps", var_type="fixed_large", loss="simple",
                       weighting="min_snr", schedule="cosine"),
               _record("eps_simple_again", mean_type="eps", var_type="fixed_large",
                       loss="simple")]
    _write_metrics(tmp_path, records)
    df = aggregate(load_runs(tmp_path, _runs([r["experiment"] for r in records])))
    assert list(table1(df, None, "digits")["Model"]) == [
        "Ours (L_simple) [eps_simple]",
        "Ours (L_simple) [cosine schedule, min-SNR weighting]",
        "Ours (L_simple) [eps_simple_again]",
    ]
    tex = table1(df, None, "digits", notation=TEX)
    assert r"Ours ($L_\mathrm{simple}$) [eps\_simple\_again]" in list(tex["Model"])


def test_table1_digits_reference_rows(six):
    """Real data at the samples' N (mean ± sd over draws), the untrained model (with its
    intervals) and the ceiling of the bound: log2 of the data's 17 levels."""
    table = table1(six, REFERENCE, "digits").set_index("Model")
    real = "Real data (400 images, mean ± sd over 10 draws)"
    assert list(table.loc[real]) == ["9.81 ± 0.05", "4.41 ± 1.40", "", "0.72 ± 0.02",
                                     "0.70 ± 0.03"]
    assert list(table.loc["Untrained model"]) == [cell(1.3, 0.01), cell(310.5, 2.0),
                                                  f"≤ {cell(8.1, 0.05)}", "", ""]
    assert list(table.loc["Uniform over the 17 levels (NLL ceiling)"]) == ["", "", "4.09", "",
                                                                           ""]
    raw = table1_raw(six, REFERENCE, "digits")
    assert list(raw["source"]).count("reference") == 3
    assert raw.set_index("model").loc[real, "fid_sd"] == 1.4
    assert not any(m.startswith("Paper:") for m in table.index)


def test_table1_cifar10_adds_the_papers_rows_after_ours(six):
    table = table1(six.assign(dataset="cifar10"), None, "cifar10")
    assert list(table["Model"])[-2:] == ["Paper: Ours (L, fixed isotropic Σ)",
                                         "Paper: Ours (L_simple)"]
    assert list(table.iloc[-2, 1:]) == ["7.67 ± 0.13", "13.51", "≤ 3.70 (3.69)", "", ""]
    assert list(table.iloc[-1, 1:]) == ["9.46 ± 0.11", "3.17", "≤ 3.75 (3.72)", "", ""]


def test_cell_formatters():
    assert format_mean_std(9.456, 0.114, 2) == "9.46 ± 0.11"
    assert format_mean_std(9.456, None, 2) == "9.46"
    assert format_mean_std(math.nan, 0.1, 2) == ""
    assert format_interval(29.971, 27.1, 32.84, 2) == "29.97 [27.10, 32.84]"
    assert format_interval(29.971, math.nan, math.nan, 1) == "30.0"
    assert format_interval(None, 1, 2, 2) == ""
    assert format_nll("3.75 [3.70, 3.80]", 3.716) == "≤ 3.75 [3.70, 3.80] (3.72)"
    assert format_nll("3.75", None) == "≤ 3.75"
    assert format_nll("", None) == ""


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------


def _trials() -> pd.DataFrame:
    return pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e", "f"],
        "schedule": ["linear", "linear", "cosine", "cosine", "linear", "sigmoid"],
        "weighting": ["uniform", "p2", "uniform", "p2", "uniform", "p2"],
        "fid": [10.0, 12.5, 8.25, None, 12.0, None],
        "nll_bpd": [3.9, 3.95, 3.8, None, 4.1, 4.3],
        "nll_bpd_rung": [4.2, 4.0, 4.1, None, 4.4, 4.5],
        "status": ["ok", "ok", "ok", "unstable", "ok", "stopped"],
    })


def test_sweep_pivot_ranks_every_cell_by_the_nll_at_the_first_rung(tmp_path):
    """Finished cells show their FID, stopped ones "stopped"; every cell that trained shows its
    NLL at the first rung (which all of them reached) and its rank by that NLL."""
    path = tmp_path / "trials.csv"
    _trials().to_csv(path, index=False)
    trials = load_sweep_trials(path)
    table = sweep_table(trials)
    assert list(table.columns) == [table.columns[0], "uniform", "p2"]
    cells = table.set_index(table.columns[0])
    assert list(cells.index) == ["linear", "cosine", "sigmoid"]
    assert cells.loc["linear", "uniform"] == "11.00 / 4.30 #3"  # mean of trials a and e
    assert cells.loc["linear", "p2"] == "12.50 / 4.00 #1"
    assert cells.loc["cosine", "uniform"] == "8.25 / 4.10 #2"
    assert cells.loc["cosine", "p2"] == "–"
    assert cells.loc["sigmoid", "p2"] == "stopped / 4.50 #4"
    assert cells.loc["sigmoid", "uniform"] == ""
    raw = sweep_raw(trials).set_index(["schedule", "weighting"])
    assert raw.loc[("linear", "uniform"), "trials"] == 2
    assert raw.loc[("cosine", "p2"), "status"] == "unstable"
    assert raw.loc[("linear", "uniform"), "nll_bpd"] == 4.0  # the last NLL is kept too



def test_sweep_csv_missing_columns_is_an_error(tmp_path):
    path = tmp_path / "trials.csv"
    _trials().drop(columns="fid").to_csv(path, index=False)
    with pytest.raises(ResultsError, match=r"trials\.csv: missing column\(s\) fid"):
        load_sweep_trials(path)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_write_tables_md_csv_tex(six, tmp_path):
    trials = _trials().rename(columns=lambda c: c.split("/")[-1])
    tables = build_tables(six.assign(dataset="cifar10"), "cifar10", REFERENCE)
    paths = write_tables(tmp_path / "results", tables)
    paths += write_sweep(tmp_path / "results", build_sweep(trials))
    names = sorted(p.name for p in paths)
    assert names == sorted(["table1.md", "table1.csv", "table1.tex", "table2.md", "table2.csv",
                            "table2.tex", "sweep.md", "sweep.csv"])
    assert all(p.is_file() for p in paths)
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")]

    # csv: the raw numbers, loadable with pandas
    t2 = pd.read_csv(tmp_path / "results" / "table2.csv").set_index("experiment")
    assert t2["fid"].dtype == "float64"
    assert t2.loc["eps_simple", "fid"] == FID["eps_simple"]  # exact round trip
    assert math.isnan(t2.loc[UNSTABLE, "fid"]) and t2.loc[UNSTABLE, "status"] == "unstable"
    assert t2.loc["eps_simple", "fid_paper"] == 3.17
    assert t2.loc["eps_simple", "fid_low"] == pytest.approx(FID["eps_simple"] - Z * 0.5)
    t1 = pd.read_csv(tmp_path / "results" / "table1.csv")
    assert t1["is_mean"].dtype == "float64" and "Paper: Ours (L_simple)" in set(t1["model"])
    sweep = pd.read_csv(tmp_path / "results" / "sweep.csv")
    assert set(sweep.columns) >= {"schedule", "weighting", "fid", "nll_bpd", "status"}

    # md: the formatted table
    md = (tmp_path / "results" / "table2.md").read_text()
    assert _md_rows(md)[0] == list(tables["table2"].columns)
    assert "–" in md

    # tex: a booktabs tabular in plain ASCII, symbols as math
    for stem in ("table1", "table2"):
        tex = (tmp_path / "results" / f"{stem}.tex").read_text()
        assert r"\begin{tabular}" in tex and r"\end{tabular}" in tex
        assert tex.isascii(), [c for c in tex if not c.isascii()]
        assert tex.count("$") % 2 == 0
        assert r"$\Sigma$" in tex
    tex2 = (tmp_path / "results" / "table2.tex").read_text()
    assert r"$\|\tilde{\mu} - \tilde{\mu}_\theta\|^2$ & -- & -- & --" in tex2
    assert f"$\\leq$ {cell(3.9, 0.02)} (3.80)" in tex2
    assert "95 \\% interval" in tex2


# --------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------


def _params(tmp_path, dataset="digits"):
    path = tmp_path / "params.yaml"
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "mlartifacts")}
    model = {"attn_resolutions": [16]} if dataset == "cifar10" else {}  # reached at 32x32
    path.write_text(yaml.safe_dump({"data": {"dataset": dataset}, "experiments": SIX,
                                    "model": model, "tracking": tracking,
                                    "study": {"seeds": [0]}}))
    return path


def _argv(tmp_path, metrics_dir, params):
    return ["--params", str(params), "--metrics", str(metrics_dir),
            "--results", str(tmp_path / "results"),
            "--sweep", str(tmp_path / "sweep" / "trials.csv"),
            "--plots", str(tmp_path / "plots"), "--charts", str(tmp_path / "charts"),
            "--lock", str(tmp_path / "dvc.lock")]


def test_stage_writes_tables_and_prints_them(tmp_path, metrics_dir, capsys):
    params = _params(tmp_path)
    assert tabulate_stage.main(_argv(tmp_path, metrics_dir, params)) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 2" in out and "Ours (L_simple)" in out
    assert "Real data (400 images" in out and "Findings" in out
    results = tmp_path / "results"
    assert sorted(p.name for p in results.iterdir()) == sorted(
        ["table1.md", "table1.csv", "table1.tex", "table2.md", "table2.csv", "table2.tex",
         "findings.md", "findings.csv", "metrics.json", "loss_curves.png", "sampling_steps.md",
         "sampling_steps.csv", "sampling_steps.png"])
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == [
        "fid_over_training.csv", "loss.csv", "sampling_steps.csv"]
    found = pd.read_csv(results / "findings.csv")
    assert len(found) == 8 and set(found["verdict"]) <= {"reproduced", "contradicted",
                                                         "inconclusive", "not measured"}

    (tmp_path / "sweep").mkdir()
    _trials().to_csv(tmp_path / "sweep" / "trials.csv", index=False)
    assert tabulate_stage.main(_argv(tmp_path, metrics_dir, params)) == 0
    assert (results / "sweep.md").is_file() and (results / "sweep.csv").is_file()


def test_run_tabulate_returns_the_frames_and_paths(tmp_path, metrics_dir):
    from pipeline.core.params import load_params

    made = run_tabulate(load_params(_params(tmp_path)), metrics_dir, tmp_path / "results", None)
    assert isinstance(made["table1"], pd.DataFrame) and isinstance(made["table2_raw"],
                                                                   pd.DataFrame)
    assert made["sweep"] is None and made["dataset"] == "digits"
    assert all(p.is_file() for p in made["paths"]) and len(made["paths"]) == 12
    assert list(made["findings"].columns) == ["claim", "paper", "ours", "interval", "verdict",
                                              "rule", "noise"]


def test_run_tabulate_with_loss_curves_and_a_sweep_writes_every_file_in_order(tmp_path,
                                                                               metrics_dir):
    from pipeline.core.params import load_params

    plots = tmp_path / "plots"
    save_loss_curve(plots / "eps_simple-0.csv", [(10, 0.5), (20, 0.25)])
    (tmp_path / "sweep").mkdir()
    _trials().to_csv(tmp_path / "sweep" / "trials.csv", index=False)
    made = run_tabulate(load_params(_params(tmp_path)), metrics_dir, tmp_path / "results",
                        tmp_path / "sweep" / "trials.csv", plots, charts_dir=tmp_path)
    assert [p.name for p in made["paths"]] == [
        "table1.md", "table1.csv", "table1.tex", "table2.md", "table2.csv", "table2.tex",
        "sweep.md", "sweep.csv", "findings.md", "findings.csv", "metrics.json", "loss.csv",
        "fid_over_training.csv", "sampling_steps.md", "sampling_steps.csv",
        "sampling_steps.png", "sampling_steps.csv", "loss_curves.png", "sweep_heatmap.png"]
    assert all(p.is_file() for p in made["paths"])
    pd.testing.assert_frame_equal(made["sweep"], sweep_table(load_sweep_trials(
        tmp_path / "sweep" / "trials.csv")))
    printed = report(made)
    assert printed.startswith("Table 1\n\n| Model") and "\nSweep\n\n| Schedule" in printed


def test_the_headline_counts_the_verdicts_and_holds_table2s_numbers_in_its_order(tmp_path,
                                                                                   metrics_dir):
    """results/metrics.json (what `dvc exp show` shows first): the count of each verdict of
    findings.csv, then FID, IS and NLL of each Table 2 row as table2.csv has them (the
    diverged row: none), in params.yaml's order, then the real data's FID and IS."""
    from pipeline.core.params import load_params

    params = load_params(_params(tmp_path))
    run_tabulate(params, metrics_dir, tmp_path / "results", None)
    text = (tmp_path / "results" / "metrics.json").read_text()
    headline = json.loads(text)
    verdicts = pd.read_csv(tmp_path / "results" / "findings.csv")["verdict"]
    assert headline["findings"] == {
        "reproduced": int((verdicts == "reproduced").sum()),
        "contradicted": int((verdicts == "contradicted").sum()),
        "inconclusive": int((verdicts == "inconclusive").sum()),
        "not_measured": int((verdicts == "not measured").sum())}
    assert sum(headline["findings"].values()) == len(verdicts) == 8
    assert list(headline) == ["findings", *params.experiments, "real_data"]
    table2 = pd.read_csv(tmp_path / "results" / "table2.csv").set_index("experiment")
    for name in params.experiments:
        if name == UNSTABLE:
            assert headline[name] == {}
            continue
        assert headline[name] == {score: table2.at[name, score]
                                  for score in ("fid", "is_mean", "nll_bpd")}
        assert headline[name]["fid"] == FID[name]  # the run's own number, to the last digit
    assert headline["real_data"] == {"fid": 4.41, "is_mean": 9.81}
    assert "NaN" not in text and "Infinity" not in text


def test_an_experiment_named_like_a_headline_section_is_refused(tmp_path):
    from pipeline.reporting.tabulate_job import headline

    made = {"findings": pd.DataFrame({"verdict": ["reproduced"]}),
            "metrics": pd.DataFrame([{"experiment": "real_data", "fid": 1.0}]),
            "reference": None}
    with pytest.raises(ResultsError, match="experiment 'real_data'.*rename"):
        headline(made)


def _over_training(path, steps, fids):
    from pipeline.artifacts.records import save_over_training

    save_over_training(path, pd.DataFrame({"step": steps, "fid": fids,
                                           "nll_bpd": [3.0] * len(steps)}))


def test_plot_data_puts_every_loss_curve_and_each_multi_step_fid_curve_in_one_file(
        tmp_path, metrics_dir):
    """plots/loss.csv: one row per (run, logged step), non-finite losses left out;
    plots/fid_over_training.csv: only runs scored at several steps (one point is no curve)."""
    from pipeline.core.params import load_params
    from pipeline.reporting.tabulate_job import plot_data

    params = load_params(_params(tmp_path))
    curves = tmp_path / "plots" / "loss"
    save_loss_curve(curves / "eps_simple-0.csv", [(10, 0.5), (20, 0.25), (30, float("nan"))])
    save_loss_curve(curves / "mu_vlb_fixed-0.csv", [(10, 0.1 + 0.2)])
    _over_training(metrics_dir / "eps_simple-0_over_training.csv", [10, 20, 30],
                   [40.5, 20.25, float("nan")])
    _over_training(metrics_dir / "mu_vlb_fixed-0_over_training.csv", [30], [12.0])
    out = tmp_path / "plots"
    paths = plot_data(params, curves, metrics_dir, out)
    assert paths == [out / "loss.csv", out / "fid_over_training.csv"]
    loss = (out / "loss.csv").read_text().splitlines()
    assert loss[0] == "run,step,loss"
    assert sorted(loss[1:]) == sorted(["eps_simple-0,10,0.5", "eps_simple-0,20,0.25",
                                       "mu_vlb_fixed-0,10,0.30000000000000004"])
    fid = pd.read_csv(out / "fid_over_training.csv")
    assert fid.to_dict("list") == {"run": ["eps_simple-0"] * 2, "step": [10, 20],
                                   "fid": [40.5, 20.25]}

    (metrics_dir / "eps_simple-0_over_training.csv").unlink()
    plot_data(params, curves, metrics_dir, out)
    assert (out / "fid_over_training.csv").read_text() == "run,step,fid\n"  # no run has a curve


def test_a_broken_scores_over_training_file_is_named(tmp_path, metrics_dir):
    from pipeline.core.params import load_params
    from pipeline.reporting.tabulate_job import plot_data

    (metrics_dir / "eps_simple-0_over_training.csv").write_text("step,nll_bpd\n10,3.0\n")
    with pytest.raises(ResultsError, match=r"eps_simple-0_over_training\.csv: not a table of "
                                           r"scores over training .*no column fid.*"
                                           r"dvc repro evaluate@eps_simple-0"):
        plot_data(load_params(_params(tmp_path)), tmp_path / "none", metrics_dir, tmp_path)


@pytest.mark.parametrize("dataset, reference", [("digits", REFERENCE), ("cifar10", None),
                                                ("cifar10", REFERENCE)])
def test_build_tables_sorts_each_tables_rows_once_for_all_its_forms(six, dataset, reference,
                                                                    monkeypatch):
    """One pass over each table's rows gives its raw, text and LaTeX forms, row for row."""
    import pipeline.reporting.tables as tables_module

    df = six.sample(frac=1.0, random_state=3).assign(dataset=dataset)  # not the paper's order
    calls = []
    sorted_rows = tables_module._sorted_rows
    monkeypatch.setattr(tables_module, "_sorted_rows",
                        lambda frame: calls.append(1) or sorted_rows(frame))
    built = build_tables(df, dataset, reference)
    assert len(calls) == 2  # once for Table 1, once for Table 2
    assert built["dataset"] == dataset
    for stem in ("table1", "table2"):
        assert len(built[stem]) == len(built[f"{stem}_tex"])
        assert list(built[stem].columns) == list(built[f"{stem}_tex"].columns)
    assert list(built["table1"]["Model"]) == list(built["table1_raw"]["model"])
    # Table 2's text rows follow its raw rows (group headers between them)
    objectives = [o for o in built["table2"]["Objective"] if o in set(built["table2_raw"]
                                                                        ["objective"])]
    assert objectives == list(built["table2_raw"]["objective"])
    assert list(built["table2_raw"]["experiment"]) == [
        "mu_vlb_learned", "mu_vlb_fixed", "mu_simple", "eps_vlb_learned", "eps_vlb_fixed",
        "eps_simple"]
    assert "$" in "".join(built["table2_tex"]["Objective"])  # the TEX labels, not TEXT's
    assert "$" not in "".join(built["table2"]["Objective"])


# --------------------------------------------------------------------------------------------
# loss curves
# --------------------------------------------------------------------------------------------


def test_loss_curve_bytes_are_step_and_the_repr_of_the_loss(tmp_path):
    path = tmp_path / "plots" / "eps_simple-0.csv"
    save_loss_curve(path, [(50, 0.1 + 0.2), (100, 1e-05), (150, float("nan")),
                           (200, float("inf"))])
    assert path.read_bytes() == (b"step,loss\n50,0.30000000000000004\n100,1e-05\n150,nan\n"
                                 b"200,inf\n")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # atomic


def test_loss_curve_round_trip_is_exact_and_drops_non_finite_losses(tmp_path):
    path = tmp_path / "curve.csv"
    rng = np.random.default_rng(0)
    losses = [float(v) for v in rng.random(50) * 10.0 ** rng.integers(-8, 3, 50)]
    history = [(10 * (i + 1), v) for i, v in enumerate(losses)]
    save_loss_curve(path, history)
    steps, loaded = load_loss_curve(path)
    assert steps == [s for s, _ in history] and loaded == losses  # bit for bit
    assert all(type(s) is int for s in steps)

    save_loss_curve(path, [(10, 0.7), (20, float("nan")), (30, 0.2), (40, float("-inf"))])
    assert load_loss_curve(path) == ([10, 30], [0.7, 0.2])
    save_loss_curve(path, [])
    assert load_loss_curve(path) == ([], [])


def test_loss_curve_reader_reads_what_pandas_reads(tmp_path):
    """The train stage's file is also a DVC plot, read by pandas elsewhere: same numbers."""
    path = tmp_path / "curve.csv"
    save_loss_curve(path, [(1, 0.123456789012345678), (2, 3e-300), (3, float("nan"))])
    frame = pd.read_csv(path)
    frame = frame[np.isfinite(frame["loss"])]
    assert load_loss_curve(path) == (frame["step"].tolist(), frame["loss"].tolist())


def test_a_file_that_is_not_a_loss_curve_is_an_error(tmp_path):
    path = tmp_path / "curve.csv"
    path.write_text("split,image,bpd\ntest,0,3.4\n")
    with pytest.raises(LossCurveError, match=r"curve\.csv: not a loss curve"):
        load_loss_curve(path)
    path.write_text("step,loss\n10,0.5\n20,0.4,7\n")  # the reader says which line
    with pytest.raises(LossCurveError, match=r"curve\.csv: not a loss curve \(line 3: "):
        load_loss_curve(path)


def test_a_corrupt_loss_curve_stops_tabulate_naming_the_file_and_the_fix(tmp_path):
    (tmp_path / "a-0.csv").write_text("step,loss\n10,0.5\n20,1e-")  # cut off mid-write
    (tmp_path / "b-0.csv").write_text("step,loss\n10\n")
    for key in ("a-0", "b-0"):
        with pytest.raises(ResultsError, match=rf"{key}\.csv: not a loss curve .*; remake it "
                                               rf"with `dvc repro train@{key}`"):
            loss_figure(tmp_path, [key], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_loss_figure_skips_runs_without_a_file_or_a_finite_loss(tmp_path, monkeypatch):
    import pipeline.reporting.tabulate_job

    drawn = {}
    monkeypatch.setattr(pipeline.reporting.tabulate_job, "save_loss_curves",
                        lambda curves, out, title: drawn.update(curves))
    save_loss_curve(tmp_path / "a-0.csv", [(10, 0.5), (20, float("nan")), (30, 0.25)])
    save_loss_curve(tmp_path / "b-0.csv", [(10, float("nan"))])
    out = loss_figure(tmp_path, ["a-0", "b-0", "missing-0"], tmp_path / "loss.png")
    assert out == tmp_path / "loss.png"
    assert drawn == {"a-0": ([10, 30], [0.5, 0.25])}


def test_tabulate_imports_no_training_code_and_train_reads_the_curve_format_alone():
    """tabulate reads results and never the training code; the train stage's loss-curve writer
    drags in no pandas, torch or tables code."""
    code = ("import sys, stages.tabulate, pipeline.reporting.tabulate_job, "
            "pipeline.reporting.sweep_report, pipeline.reporting.findings, "
            "pipeline.artifacts.figures\n"
            "print(sorted(m for m in ('pipeline.training.loop', 'pipeline.measure.sampling', "
            "'ray') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
    code = ("import sys, pipeline.artifacts.loss_curve\n"
            "print(sorted(m for m in ('pandas', 'torch', 'pipeline.reporting.tables', "
            "'pipeline.reporting.results') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("damage, expected", [
    ("missing", "dvc repro evaluate@eps_vlb_fixed-0"),
    ("corrupt", "eps_vlb_fixed-0.json: not valid JSON"),
    ("params", "unknown section"),
    ("dataset", "are for dataset 'digits', but params.yaml names 'cifar10'"),
    ("lock", "dvc.lock: not valid YAML at line 3; restore it with `git checkout -- dvc.lock`"),
    ("lock-list", "dvc.lock: not a DVC lock file (no mapping of stages)"),
])
def test_stage_bad_input_exits_2_with_a_short_message(tmp_path, metrics_dir, capsys, damage,
                                                      expected):
    params = _params(tmp_path, dataset="cifar10" if damage == "dataset" else "digits")
    target = metrics_dir / "eps_vlb_fixed-0.json"
    if damage == "missing":
        target.unlink()
    elif damage == "corrupt":
        target.write_text("not json")
    elif damage == "params":
        params.write_text(params.read_text() + "bogus: 1\n")
    elif damage == "lock":  # cut off inside a stage's entry
        (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {train@eps_simple-0: [\n")
    elif damage == "lock-list":
        (tmp_path / "dvc.lock").write_text("- train\n- sample\n")
    assert tabulate_stage.main(_argv(tmp_path, metrics_dir, params)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_the_lock_gives_each_run_the_md5_of_its_stages_outputs(tmp_path):
    from pipeline.core.params import load_params
    from pipeline.core.tracking import tag_dvc_stage_md5
    from pipeline.reporting.tabulate_job import read_lock, run_tags

    assert read_lock(tmp_path / "dvc.lock") == {}  # none yet: no tags from it
    stages = read_lock(PROJECT / "dvc.lock")
    params = load_params(PROJECT / "params.yaml")
    made = {"table2_raw": pd.DataFrame(columns=["experiment"])}
    tags = run_tags(params, made, stages)
    for run in params.runs():
        for stage in ("train", "sample", "evaluate"):
            md5 = stages[f"{stage}@{run.key}"]["outs"][0]["md5"]
            assert tags[run.key][tag_dvc_stage_md5(stage)] == md5


def test_samples_figure_shows_each_experiments_grid_titled_with_its_fid(tmp_path):
    """results/samples.png: the first seed's samples/<E>-<S>/grid.png of every experiment of
    params.yaml, side by side (each grid one solid colour here: every colour is in the figure);
    a grid that is missing stops it in one line naming the file and the command."""
    from PIL import Image

    from pipeline.core.params import load_params
    from pipeline.reporting.tabulate_job import samples_figure

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    colours = {}
    for i, name in enumerate(params.experiments):
        key = f"{name}-{params.study.seeds[0]}"
        colours[key] = (40 * i + 20, 200 - 30 * i, 90)
        (tmp_path / "samples" / key).mkdir(parents=True)
        Image.new("RGB", (60, 60), colours[key]).save(tmp_path / "samples" / key / "grid.png")
    runs = pd.DataFrame({"experiment": list(params.experiments),
                         "seed": [params.study.seeds[0]] * len(params.experiments),
                         "fid": [10.0 + i for i in range(len(params.experiments))]})
    out = samples_figure(params, tmp_path / "samples", runs, tmp_path / "samples.png")
    with Image.open(out) as image:
        pixels = {tuple(p) for p in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert len(colours) == 6 and set(colours.values()) <= pixels
    missing = next(iter(colours))
    (tmp_path / "samples" / missing / "grid.png").unlink()
    with pytest.raises(ResultsError, match=rf"{missing}/grid.png: no sample grid; make it with "
                                           rf"`dvc repro sample@{missing}`"):
        samples_figure(params, tmp_path / "samples", runs, tmp_path / "samples.png")


# --------------------------------------------------------------------------------------------
# sample quality against sampling steps
# --------------------------------------------------------------------------------------------


def test_the_sampling_steps_table_shows_each_setting_with_its_intervals(tmp_path, metrics_dir):
    from pipeline.core.params import load_params
    from pipeline.reporting.steps_table import write_steps_table

    params = load_params(_params(tmp_path))
    paths = write_steps_table(params, metrics_dir, tmp_path / "results", tmp_path / "charts")
    assert [p.name for p in paths] == ["sampling_steps.md", "sampling_steps.csv",
                                       "sampling_steps.png", "sampling_steps.csv"]
    rows = _md_rows((tmp_path / "results" / "sampling_steps.md").read_text())
    assert rows[0] == ["Run", "Sampler", "Steps", "IS", "FID", "KID", "Precision", "Recall"]
    assert [r[1:3] for r in rows[1:]] == [["DDIM", "10"], ["DDIM", "20"], ["DDIM", "50"],
                                          ["DDIM", "100"], ["ancestral", "1000"]]
    assert rows[1][0] == "eps_simple-0" and rows[1][4] == cell(25.0, 1.0)
    assert rows[5][6:] == [cell(0.75, 0.02), cell(0.5, 0.03)]
    raw = pd.read_csv(tmp_path / "results" / "sampling_steps.csv")
    assert raw["fid_low"].tolist()[0] == pytest.approx(25.0 - Z * 1.0)
    chart = (tmp_path / "charts" / "sampling_steps.csv").read_text().splitlines()
    assert chart[0] == "run,steps,fid" and chart[1] == "eps_simple-0 ddim,10,25.0"
    assert chart[-1] == "eps_simple-0 ancestral,1000,9.0"


def test_the_sampling_steps_table_refuses_a_missing_run_and_says_when_none_is_measured(
        tmp_path, metrics_dir):
    from pipeline.core.params import load_params
    from pipeline.reporting.steps_table import write_steps_table

    params = load_params(_params(tmp_path))
    sampling_steps_path(metrics_dir, "eps_simple-0").unlink()
    with pytest.raises(ResultsError, match=r"eps_simple-0_sampling_steps.csv: .* not found; "
                                           r"make it with `dvc repro sampling_steps@eps_simple-0`"):
        write_steps_table(params, metrics_dir, tmp_path / "results")
    sampling_steps_path(metrics_dir, "eps_simple-0").write_text("sampler,steps\nddim,10\n")
    with pytest.raises(ResultsError, match="not a table of scores against sampling steps"):
        write_steps_table(params, metrics_dir, tmp_path / "results")
    none = dataclasses.replace(params, sampling_steps=dataclasses.replace(
        params.sampling_steps, experiments=()))
    write_steps_table(none, metrics_dir, tmp_path / "results")
    assert "No run measured" in (tmp_path / "results" / "sampling_steps.md").read_text()
