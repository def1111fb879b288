"""pipeline.tables and stages.tabulate: the paper's Tables 1 and 2 and the sweep table."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import yaml

from pipeline.tables import (TEX, TablesError, build_tables, format_mean_std, format_nll,
                             load_metrics, load_reference, load_sweep_trials, sweep_raw,
                             sweep_table, table1, table1_raw, table2, table2_raw, to_markdown,
                             write_tables)
from stages import tabulate as tabulate_stage

# The six rows of the paper's Table 2, in params.yaml order (not the table's order).
SIX = {
    "eps_simple": dict(mean_type="eps", var_type="fixed_large", loss="simple"),
    "mu_vlb_learned": dict(mean_type="mu", var_type="learned", loss="vlb"),
    "mu_vlb_fixed": dict(mean_type="mu", var_type="fixed_large", loss="vlb"),
    "mu_simple": dict(mean_type="mu", var_type="fixed_large", loss="simple"),
    "eps_vlb_learned": dict(mean_type="eps", var_type="learned", loss="vlb"),
    "eps_vlb_fixed": dict(mean_type="eps", var_type="fixed_large", loss="vlb"),
}
UNSTABLE = "mu_simple"
FID = {name: 3.2 + 10 * i + 0.123456789 for i, name in enumerate(SIX)}
REFERENCE = {
    "real_data": {"fid": 0.41, "is_mean": 9.81, "is_std": 0.05, "kid_mean": 0.0, "kid_std": 0.0},
    "untrained": {"fid": 310.5, "is_mean": 1.3, "is_std": 0.01, "kid_mean": 0.4,
                  "kid_std": 0.01, "nll_bpd": 8.1},
}


def _record(name: str, dataset: str = "digits", **overrides) -> dict:
    status = "unstable" if name == UNSTABLE else "ok"
    record = {"experiment": name, "status": status, "dataset": dataset, **SIX.get(name, {}),
              "weighting": "uniform", "schedule": "linear", "num_timesteps": 1000,
              "fid": FID.get(name, 5.0), "is_mean": 8.1, "is_std": 0.2, "kid_mean": 0.01,
              "kid_std": 0.002, "nll_bpd": 3.9, "nll_bpd_stderr": 0.02, "nll_bpd_train": 3.8,
              "nll_bpd_train_stderr": 0.02, "nll_method": "exact", "train_steps": 2000,
              "final_loss": 0.03, "train_wall_s": 120.0, "images_per_s": 2100.0}
    if status == "unstable":
        record.update({k: None for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std",
                                         "nll_bpd", "nll_bpd_stderr", "nll_bpd_train",
                                         "nll_bpd_train_stderr", "final_loss")})
    record.update(overrides)
    return record


def _write_metrics(metrics_dir, records) -> None:
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        (metrics_dir / f"{record['experiment']}.json").write_text(json.dumps(record))


@pytest.fixture
def metrics_dir(tmp_path):
    path = tmp_path / "metrics"
    _write_metrics(path, [_record(name) for name in SIX])
    (path / "reference.json").write_text(json.dumps(REFERENCE))
    return path


@pytest.fixture
def six(metrics_dir):
    return load_metrics(metrics_dir, list(SIX))


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


def test_load_metrics_one_row_per_experiment_with_float_metrics(six):
    assert list(six["experiment"]) == list(SIX)
    assert six["fid"].dtype == "float64" and six["nll_bpd_train"].dtype == "float64"
    unstable = six.set_index("experiment").loc[UNSTABLE]
    assert unstable["status"] == "unstable" and math.isnan(unstable["fid"])
    assert six.set_index("experiment").loc["eps_simple", "fid"] == FID["eps_simple"]
    assert "train_wall_s" in six.columns  # extra keys are kept


def test_load_metrics_without_names_reads_every_file_but_the_reference(metrics_dir):
    df = load_metrics(metrics_dir)
    assert sorted(df["experiment"]) == sorted(SIX)


def test_unstable_run_metrics_are_dropped_even_if_present(tmp_path):
    _write_metrics(tmp_path, [_record(UNSTABLE, fid=123.0)])
    assert math.isnan(load_metrics(tmp_path, [UNSTABLE])["fid"].iloc[0])


def test_missing_metrics_file_names_the_file_and_the_command(metrics_dir):
    (metrics_dir / "eps_simple.json").unlink()
    with pytest.raises(TablesError) as err:
        load_metrics(metrics_dir, list(SIX))
    message = str(err.value)
    assert str(metrics_dir / "eps_simple.json") in message
    assert "dvc repro evaluate@eps_simple" in message
    assert "python -m stages.evaluate --experiment eps_simple" in message


def test_corrupt_metrics_json_names_the_file(metrics_dir):
    (metrics_dir / "mu_vlb_fixed.json").write_text('{"fid": 3.2,')
    with pytest.raises(TablesError, match=r"mu_vlb_fixed\.json: not valid JSON"):
        load_metrics(metrics_dir, list(SIX))


@pytest.mark.parametrize("overrides, match", [
    ({"fid": "three"}, r"'fid' must be a number or null"),
    ({"status": "diverged"}, r"'status' is 'diverged'"),
    ({"experiment": "other"}, r"holds the metrics of experiment 'other'"),
])
def test_bad_metrics_values_name_the_file_and_key(tmp_path, overrides, match):
    _write_metrics(tmp_path, [_record("eps_simple")])
    record = {**_record("eps_simple"), **overrides}
    (tmp_path / "eps_simple.json").write_text(json.dumps(record))
    with pytest.raises(TablesError, match=match) as err:
        load_metrics(tmp_path, ["eps_simple"])
    assert "eps_simple.json" in str(err.value)


def test_metrics_without_mean_type_is_an_error(tmp_path):
    record = _record("eps_simple")
    del record["mean_type"]
    _write_metrics(tmp_path, [record])
    with pytest.raises(TablesError, match="missing key 'mean_type'"):
        load_metrics(tmp_path, ["eps_simple"])


def test_corrupt_reference_names_the_file(metrics_dir):
    (metrics_dir / "reference.json").write_text("[1, 2")
    with pytest.raises(TablesError, match=r"reference\.json: not valid JSON"):
        load_reference(metrics_dir)


def test_absent_reference_is_none(tmp_path):
    assert load_reference(tmp_path) is None


# --------------------------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------------------------


def test_table2_groups_and_orders_rows_as_in_the_paper(six):
    table = table2(six, "digits")
    assert list(table.columns) == ["Objective", "IS", "FID", "NLL Test (Train)", "KID"]
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
    assert rows["||μ̃ − μ̃_θ||²"] == ["–"] * 4
    assert rows["||ε̃ − ε_θ||² (L_simple)"] == [
        "8.10 ± 0.20", f"{FID['eps_simple']:.2f}", "≤ 3.90 (3.80)", "0.0100 ± 0.0020"]


def test_markdown_keeps_trailing_zeros_and_escapes_norm_bars(six):
    md = to_markdown(table2(six.assign(fid=3.2, nll_bpd=4.0), "digits"))
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
    df = load_metrics(tmp_path, [r["experiment"] for r in records])
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


def test_table1_labels_name_the_parameterization_only_where_needed(six):
    table = table1(six, None, "digits")
    assert list(table.columns) == ["Model", "IS", "FID", "NLL Test (Train)"]
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


def test_table1_cells(six):
    table = table1(six, None, "digits").set_index("Model")
    assert list(table.loc["Ours (L_simple)"]) == [
        "8.10 ± 0.20", f"{FID['eps_simple']:.2f}", "≤ 3.90 (3.80)"]
    assert list(table.loc["Ours (||μ̃ − μ̃_θ||²)"]) == ["–", "–", "–"]


def test_table1_appends_weighting_and_schedule_and_separates_duplicates(tmp_path):
    records = [_record("eps_simple"),
               _record("eps_minsnr", mean_type="eps", var_type="fixed_large", loss="simple",
                       weighting="min_snr", schedule="cosine"),
               _record("eps_simple_again", mean_type="eps", var_type="fixed_large",
                       loss="simple")]
    _write_metrics(tmp_path, records)
    df = load_metrics(tmp_path, [r["experiment"] for r in records])
    assert list(table1(df, None, "digits")["Model"]) == [
        "Ours (L_simple) [eps_simple]",
        "Ours (L_simple) [cosine schedule, min-SNR weighting]",
        "Ours (L_simple) [eps_simple_again]",
    ]
    tex = table1(df, None, "digits", notation=TEX)
    assert r"Ours ($L_\mathrm{simple}$) [eps\_simple\_again]" in list(tex["Model"])


def test_table1_digits_reference_rows(six):
    table = table1(six, REFERENCE, "digits").set_index("Model")
    assert list(table.loc["Real data (test split)"]) == ["9.81 ± 0.05", "0.41", ""]
    assert list(table.loc["Untrained model"]) == ["1.30 ± 0.01", "310.50", "≤ 8.10"]
    raw = table1_raw(six, REFERENCE, "digits")
    assert list(raw["source"]).count("reference") == 2
    assert not any(m.startswith("Paper:") for m in table.index)


def test_table1_cifar10_adds_the_papers_rows_after_ours(six):
    table = table1(six.assign(dataset="cifar10"), None, "cifar10")
    assert list(table["Model"])[-2:] == ["Paper: Ours (L, fixed isotropic Σ)",
                                         "Paper: Ours (L_simple)"]
    assert list(table.iloc[-2, 1:]) == ["7.67 ± 0.13", "13.51", "≤ 3.70 (3.69)"]
    assert list(table.iloc[-1, 1:]) == ["9.46 ± 0.11", "3.17", "≤ 3.75 (3.72)"]


def test_cell_formatters():
    assert format_mean_std(9.456, 0.114, 2) == "9.46 ± 0.11"
    assert format_mean_std(9.456, None, 2) == "9.46"
    assert format_mean_std(math.nan, 0.1, 2) == ""
    assert format_nll(3.754, 3.716) == "≤ 3.75 (3.72)"
    assert format_nll(3.754, None) == "≤ 3.75"
    assert format_nll(None, None) == ""


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------


def _trials() -> pd.DataFrame:
    return pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"],
        "config/schedule": ["linear", "linear", "cosine", "cosine", "linear"],
        "config/weighting": ["uniform", "p2", "uniform", "p2", "uniform"],
        "fid": [10.0, 12.5, 8.25, None, 12.0],
        "nll_bpd": [3.9, 3.95, 3.8, None, 4.1],
        "status": ["ok", "ok", "ok", "unstable", "ok"],
    })


def test_sweep_pivot_has_fid_and_nll_and_dashes_for_unstable(tmp_path):
    path = tmp_path / "trials.csv"
    _trials().to_csv(path, index=False)
    trials = load_sweep_trials(path)
    table = sweep_table(trials)
    assert list(table.columns) == [table.columns[0], "uniform", "p2"]
    cells = table.set_index(table.columns[0])
    assert list(cells.index) == ["linear", "cosine"]
    assert cells.loc["linear", "uniform"] == "11.00 / 4.00"  # mean of trials a and e
    assert cells.loc["linear", "p2"] == "12.50 / 3.95"
    assert cells.loc["cosine", "uniform"] == "8.25 / 3.80"
    assert cells.loc["cosine", "p2"] == "–"
    raw = sweep_raw(trials).set_index(["schedule", "weighting"])
    assert raw.loc[("linear", "uniform"), "trials"] == 2
    assert raw.loc[("cosine", "p2"), "status"] == "unstable"


def test_sweep_csv_missing_columns_is_an_error(tmp_path):
    path = tmp_path / "trials.csv"
    _trials().drop(columns="fid").to_csv(path, index=False)
    with pytest.raises(TablesError, match=r"trials\.csv: missing column\(s\) fid"):
        load_sweep_trials(path)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_write_tables_md_csv_tex(six, tmp_path):
    trials = _trials().rename(columns=lambda c: c.split("/")[-1])
    tables = build_tables(six.assign(dataset="cifar10"), "cifar10", REFERENCE, trials)
    paths = write_tables(tmp_path / "results", tables)
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
    assert r"8.10 $\pm$ 0.20" in tex2 and r"$\leq$ 3.90 (3.80)" in tex2


# --------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------


def _params(tmp_path, dataset="digits"):
    path = tmp_path / "params.yaml"
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "mlartifacts")}
    path.write_text(yaml.safe_dump({"data": {"dataset": dataset}, "experiments": SIX,
                                    "tracking": tracking}))
    return path


def _argv(tmp_path, metrics_dir, params):
    return ["--params", str(params), "--metrics", str(metrics_dir),
            "--results", str(tmp_path / "results"),
            "--sweep", str(tmp_path / "sweep" / "trials.csv"),
            "--plots", str(tmp_path / "plots"), "--lock", str(tmp_path / "dvc.lock")]


def test_stage_writes_tables_and_prints_them(tmp_path, metrics_dir, capsys):
    params = _params(tmp_path)
    assert tabulate_stage.main(_argv(tmp_path, metrics_dir, params)) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 2" in out and "Ours (L_simple)" in out
    assert "Real data (test split)" in out
    results = tmp_path / "results"
    assert sorted(p.name for p in results.iterdir()) == sorted(
        ["table1.md", "table1.csv", "table1.tex", "table2.md", "table2.csv", "table2.tex",
         "loss_curves.png"])

    (tmp_path / "sweep").mkdir()
    _trials().to_csv(tmp_path / "sweep" / "trials.csv", index=False)
    assert tabulate_stage.main(_argv(tmp_path, metrics_dir, params)) == 0
    assert (results / "sweep.md").is_file() and (results / "sweep.csv").is_file()


def test_run_tabulate_returns_the_frames_and_paths(tmp_path, metrics_dir):
    from pipeline.config import load_params

    made = tabulate_stage.run_tabulate(load_params(_params(tmp_path)), metrics_dir,
                                       tmp_path / "results", None)
    assert isinstance(made["table1"], pd.DataFrame) and isinstance(made["table2_raw"],
                                                                   pd.DataFrame)
    assert made["sweep"] is None and made["dataset"] == "digits"
    assert all(p.is_file() for p in made["paths"]) and len(made["paths"]) == 6


@pytest.mark.parametrize("damage, expected", [
    ("missing", "dvc repro evaluate@eps_vlb_fixed"),
    ("corrupt", "eps_vlb_fixed.json: not valid JSON"),
    ("params", "unknown section"),
    ("dataset", "are for dataset 'digits', but params.yaml names 'cifar10'"),
])
def test_stage_bad_input_exits_2_with_a_short_message(tmp_path, metrics_dir, capsys, damage,
                                                      expected):
    params = _params(tmp_path, dataset="cifar10" if damage == "dataset" else "digits")
    target = metrics_dir / "eps_vlb_fixed.json"
    if damage == "missing":
        target.unlink()
    elif damage == "corrupt":
        target.write_text("not json")
    elif damage == "params":
        params.write_text(params.read_text() + "bogus: 1\n")
    assert tabulate_stage.main(_argv(tmp_path, metrics_dir, params)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
