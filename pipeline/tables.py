"""Results -> the paper's tables: Table 1 (sample quality and NLL), Table 2 (ablation), sweep.

Ho, Jain & Abbeel 2020, Table 1 ("CIFAR10 results. NLL measured in bits/dim.") and Table 2
("Unconditional CIFAR10 reverse process parameterization and training objective ablation"),
built with pandas from the metrics/<experiment>-<seed>.json and _run.json files the evaluate
stages write (`load_runs`), one row per experiment: the mean over its seeds (`aggregate`).

Each table comes in two forms:
- raw (`table1_raw`, `table2_raw`, `sweep_raw`): one row per experiment (or sweep cell), float
  columns per metric with its interval; written as csv so `pandas.read_csv` gets them back;
- formatted (`table1`, `table2`, `sweep_table`): strings shaped like the paper, written as
  markdown (`to_markdown`) and LaTeX (`to_latex`; symbols as math, e.g. `$\\Sigma$`; the
  tabular uses booktabs rules, so the including document needs `\\usepackage{booktabs}`).

Cells: a score and its 95 % interval, "29.97 [27.10, 32.84]" (`pipeline.stats`: jackknife over
the samples for FID / IS / KID, over images for the NLL bound); with several seeds, the mean and
the standard deviation over seeds, "29.97 ± 1.20". NLL "≤ 4.71 [4.66, 4.76] (4.70)": the
test-set bound, the train-set bound in parentheses. An unstable run (non-finite training loss)
shows "–" in every metric cell, as the paper's blank Table 2 entries; a metric that was not
measured is an empty cell. Table 1's reference rows: real data at the samples' N (mean ± sd over
draws), an untrained model, and the NLL ceiling of the data's levels.

Row labels follow the paper: the objective ("L, fixed isotropic Σ", "L_simple", ...); in
Table 1, whose "Ours" rows predict ε in the paper, a row of another parameterization is always
named ("μ̃ prediction, ...") and an ε row only where two rows would otherwise read the same; a
schedule other than linear, a weighting other than uniform and a variance other than the
paper's are appended in brackets, e.g.
"Ours (L_simple) [cosine schedule, min-SNR weighting]". Rows that still collide get the
experiment name in the brackets.

Table 1 for cifar10 adds the paper's published numbers as a separate block of rows after ours
("Paper: Ours (...)"): rows keep the paper's four columns and read top to bottom. Table 2 for
cifar10 adds them as the columns "IS (paper)" and "FID (paper)" beside each of our rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from pipeline.config import (LOSSES, MEAN_TYPES, SCHEDULES, SWEEP_WEIGHTINGS, VAR_TYPES,
                             WEIGHTINGS, run_key)
from pipeline.errors import UserError
from pipeline.evaluation import (DESCRIPTORS, METRICS, SCORES, ResultsError, load_run_metrics,
                                 metrics_path, run_info_path)
from pipeline.io import atomic_path, write_text
from pipeline.stats import Estimate, combine_seeds
from pipeline.status import Status

GROUP_ORDER = ("mu", "eps", "x0")          # Table 2: baseline first, then ours, then extras
OBJECTIVE_ORDER = ("learned", "fixed", "simple", "hybrid")  # within a group, as in the paper

DATASET_NAMES = {"cifar10": "CIFAR10", "digits": "Digits (8x8)", "folder": "Image folder"}
WEIGHTING_NAMES = {"vlb": "VLB", "p2": "P2", "min_snr": "min-SNR"}

# The paper's published numbers (Ho et al. 2020, Tables 1 and 2). None: "unstable" (blank).
PAPER_TABLE1 = (  # (objective, is_mean, is_std, fid, nll_bpd, nll_bpd_train)
    ("fixed", 7.67, 0.13, 13.51, 3.70, 3.69),
    ("simple", 9.46, 0.11, 3.17, 3.75, 3.72),
)
PAPER_TABLE2: dict[tuple[str, str], tuple[float, float, float] | None] = {
    ("mu", "learned"): (7.28, 0.10, 23.69),
    ("mu", "fixed"): (8.06, 0.09, 13.22),
    ("mu", "simple"): None,
    ("eps", "learned"): None,
    ("eps", "fixed"): (7.67, 0.13, 13.51),
    ("eps", "simple"): (9.46, 0.11, 3.17),
}


class TablesError(UserError, ValueError):
    """A missing or unreadable results file, phrased for the user: which file, how to make it."""


# --------------------------------------------------------------------------------------------
# Notation: one spelling for text (markdown, csv) and one for LaTeX
# --------------------------------------------------------------------------------------------


def tex_escape(text: str) -> str:
    """Escape LaTeX's special characters in free text (experiment and schedule names)."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
               "^": r"\textasciicircum{}"}
    return "".join(special.get(ch, ch) for ch in text)


@dataclass(frozen=True)
class Notation:
    """The paper's symbols spelled for one output format."""

    objectives: Mapping[str, str]   # keys of objective_key(...) plus table-specific variants
    predictions: Mapping[str, str]  # mean_type -> "ε prediction"
    groups: Mapping[str, str]       # mean_type -> Table 2 group header
    qualifiers: Mapping[str, str]   # var_type -> bracketed note
    pm: str
    leq: str
    dash: str
    escape: Callable[[str], str]


TEXT = Notation(
    objectives={
        "learned": "L, learned diagonal Σ",
        "fixed": "L, fixed isotropic Σ",
        "simple:mu": "||μ̃ − μ̃_θ||²",
        "simple:eps": "||ε̃ − ε_θ||² (L_simple)",
        "simple:eps:table1": "L_simple",
        "simple:x0": "||x₀ − x̂_θ||²",
        "hybrid": "L_hybrid",
        "hybrid:fixed": "L_hybrid, fixed isotropic Σ",
    },
    predictions={"mu": "μ̃ prediction", "eps": "ε prediction", "x0": "x₀ prediction"},
    groups={"mu": "μ̃ prediction (baseline)", "eps": "ε prediction (ours)", "x0": "x₀ prediction"},
    qualifiers={"fixed_small": "σ² = β̃_t", "learned_range": "learned-range Σ"},
    pm=" ± ", leq="≤ ", dash="–", escape=str,
)

TEX = Notation(
    objectives={
        "learned": r"$L$, learned diagonal $\Sigma$",
        "fixed": r"$L$, fixed isotropic $\Sigma$",
        "simple:mu": r"$\|\tilde{\mu} - \tilde{\mu}_\theta\|^2$",
        "simple:eps": r"$\|\tilde{\epsilon} - \epsilon_\theta\|^2$ ($L_\mathrm{simple}$)",
        "simple:eps:table1": r"$L_\mathrm{simple}$",
        "simple:x0": r"$\|x_0 - \hat{x}_\theta\|^2$",
        "hybrid": r"$L_\mathrm{hybrid}$",
        "hybrid:fixed": r"$L_\mathrm{hybrid}$, fixed isotropic $\Sigma$",
    },
    predictions={"mu": r"$\tilde{\mu}$ prediction", "eps": r"$\epsilon$ prediction",
                 "x0": r"$x_0$ prediction"},
    groups={"mu": r"$\tilde{\mu}$ prediction (baseline)", "eps": r"$\epsilon$ prediction (ours)",
            "x0": r"$x_0$ prediction"},
    qualifiers={"fixed_small": r"$\sigma^2 = \tilde{\beta}_t$",
                "learned_range": r"learned-range $\Sigma$"},
    pm=r" $\pm$ ", leq=r"$\leq$ ", dash="--", escape=tex_escape,
)


# --------------------------------------------------------------------------------------------
# Loading: one row per run, then one row per experiment (the mean over its seeds)
# --------------------------------------------------------------------------------------------


def load_runs(metrics_dir: str | Path, runs: Iterable[tuple[str, int]]) -> pd.DataFrame:
    """Read the metrics of each (experiment, seed) (`load_run_metrics`) into one row each.

    Columns: DESCRIPTORS, the float METRICS (NaN where not measured or the run is unstable), then
    whatever else the files hold. Raises ResultsError naming the first missing or corrupt
    file and the command that makes it.
    """
    runs = list(runs)
    if not runs:
        raise TablesError(f"{metrics_dir}: no experiments to tabulate; define them under "
                          "'experiments' in params.yaml and run `dvc repro`")
    keys = [run_key(e, s) for e, s in runs]
    missing = [k for k in keys if not (metrics_path(metrics_dir, k).is_file()
                                       and run_info_path(metrics_dir, k).is_file())]
    if missing:
        more = (f" ({len(missing) - 1} more missing: {', '.join(missing[1:])})"
                if len(missing) > 1 else "")
        try:
            load_run_metrics(metrics_dir, missing[0], {})
        except ResultsError as exc:
            raise ResultsError(f"{exc}{more}") from None
    allowed = {"mean_type": MEAN_TYPES, "var_type": VAR_TYPES, "loss": LOSSES,
               "weighting": WEIGHTINGS, "schedule": SCHEDULES}
    records = []
    for (experiment, seed), key in zip(runs, keys):
        record = load_run_metrics(metrics_dir, key, allowed)
        record.update(experiment=experiment, seed=seed)
        records.append(record)
    df = pd.DataFrame.from_records(records)
    for key in METRICS:
        df[key] = df[key].astype("float64")
    rest = [c for c in df.columns if c not in DESCRIPTORS and c not in METRICS]
    return df[[*DESCRIPTORS, *METRICS, *rest]].reset_index(drop=True)


def estimate(row: Mapping[str, Any], score: str) -> Estimate:
    """The `Estimate` of `score` in a row of `aggregate` (or of `load_runs`)."""
    return Estimate(float(row[score]), float(row[f"{score}_se"]),
                    float(row.get(f"{score}_df", math.inf)))


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment (in order of first appearance): its descriptors, `seeds` (how
    many runs), `key` (the run's key where there is one seed), status
 (unstable if any seed diverged), and per score of SCORES the mean over
    seeds with `_se`, `_df` (degrees of freedom: inf for one seed), `_sd` (between seeds, NaN
    for one), `_low` and `_high` (the 95 % interval, `pipeline.stats.combine_seeds`)."""
    records = []
    for experiment, group in runs.groupby("experiment", sort=False):
        rows = group.to_dict("records")
        record = {key: rows[0][key] for key in DESCRIPTORS if key != "seed"}
        record["seeds"] = len(rows)
        record["key"] = run_key(experiment, rows[0]["seed"]) if len(rows) == 1 else None
        unstable = any(r["status"] == Status.UNSTABLE for r in rows)
        record["status"] = (Status.UNSTABLE if unstable else Status.OK).value
        for score in SCORES:
            combined = combine_seeds([estimate(r, score) for r in rows])
            low, high = combined.interval() if not unstable else (math.nan, math.nan)
            values = [r[score] for r in rows]
            record.update({score: math.nan if unstable else combined.value,
                           f"{score}_se": combined.se, f"{score}_df": combined.df,
                           f"{score}_sd": float(np.std(values, ddof=1)) if len(rows) > 1
                           else math.nan,
                           f"{score}_low": low, f"{score}_high": high})
        records.append(record)
    return pd.DataFrame.from_records(records)


def load_sweep_trials(path: str | Path) -> pd.DataFrame:
    """Read the sweep's trials csv (a Ray Tune results table) with plain column names.

    `config/schedule` and `config/weighting` (Ray Tune's spelling) become `schedule` and
    `weighting`; the table needs schedule, weighting, fid and nll_bpd (status optional).
    """
    path = Path(path)
    if not path.is_file():
        raise TablesError(f"{path}: sweep trials not found; make them with `dvc repro sweep`")
    try:
        trials = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TablesError(f"{path}: not a readable csv ({str(exc).strip()}); "
                          "rerun `dvc repro sweep`") from None
    renames = {}
    for key in ("schedule", "weighting"):
        if key not in trials.columns:
            nested = [c for c in trials.columns if str(c).split("/")[-1] == key]
            if nested:
                renames[nested[0]] = key
    trials = trials.rename(columns=renames)
    missing = [c for c in ("schedule", "weighting", "fid", "nll_bpd") if c not in trials.columns]
    if missing:
        raise TablesError(f"{path}: missing column(s) {', '.join(missing)}; "
                          f"found: {', '.join(map(str, trials.columns))}")
    return trials


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def objective_key(row: Mapping[str, Any]) -> str:
    """learned | fixed | simple | hybrid: the paper's objective of one experiment (a row with
    mean_type, var_type and loss)."""

    if row["loss"] == "vlb":
        return "learned" if str(row["var_type"]).startswith("learned") else "fixed"
    return str(row["loss"])


def _objective(row: Mapping[str, Any], notation: Notation, table: int) -> str:
    key = objective_key(row)
    if key == "simple":
        key = f"simple:{row['mean_type']}"
        if table == 1 and f"{key}:table1" in notation.objectives:
            key = f"{key}:table1"
    elif key == "hybrid" and not str(row["var_type"]).startswith("learned"):
        key = "hybrid:fixed"
    return notation.objectives[key]


def _qualifiers(row: Mapping[str, Any], notation: Notation) -> list[str]:
    """Bracketed notes for what differs from the paper's setup."""
    notes = []
    if row["var_type"] in notation.qualifiers:
        notes.append(notation.qualifiers[row["var_type"]])
    if row["schedule"] != "linear":
        notes.append(f"{notation.escape(str(row['schedule']))} schedule")
    if row["weighting"] != "uniform":
        name = WEIGHTING_NAMES.get(row["weighting"], str(row["weighting"]))
        notes.append(f"{notation.escape(name)} weighting")
    return notes


def _with_notes(label: str, notes: list[str]) -> str:
    return f"{label} [{', '.join(notes)}]" if notes else label


def _sorted_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Experiments in the paper's order: group (mu, eps, x0), then learned, fixed, simple."""
    rows = df.to_dict("records")
    order = {name: i for i, name in enumerate(df["experiment"])}

    def key(row):
        group = GROUP_ORDER.index(row["mean_type"]) if row["mean_type"] in GROUP_ORDER else 99
        return group, OBJECTIVE_ORDER.index(objective_key(row)), order[row["experiment"]]

    return sorted(rows, key=key)


def table1_labels(rows: list[dict], notation: Notation = TEXT) -> list[str]:
    """'Ours (<objective>) [notes]' per row. The paper's "Ours" rows predict ε, so every other
    parameterization is named ("μ̃ prediction, L, ..."; an MSE objective names its target
    itself), and ε is named only where a row of another parameterization would otherwise read
    the same; the experiment name is added where rows still collide."""
    def plain(row, notes):
        return _with_notes(f"Ours ({_objective(row, notation, table=1)})", notes)

    plains = [plain(row, _qualifiers(row, notation)) for row in rows]

    def make(row, notes):
        objective = _objective(row, notation, table=1)
        base = plain(row, _qualifiers(row, notation))
        names_target = objective_key(row) == "simple"  # "||μ̃ − μ̃_θ||²" names μ̃ already
        if (row["mean_type"] != "eps" and not names_target) or len(
                {r["mean_type"] for r, p in zip(rows, plains) if p == base}) > 1:
            objective = f"{notation.predictions[row['mean_type']]}, {objective}"
        return _with_notes(f"Ours ({objective})", notes)

    labels = [make(row, _qualifiers(row, notation)) for row in rows]
    return [make(row, [*_qualifiers(row, notation), notation.escape(str(row["experiment"]))])
            if labels.count(label) > 1 else label
            for label, row in zip(labels, rows)]


def table2_labels(rows: list[dict], notation: Notation = TEXT) -> list[str]:
    """The objective per row (the group header names the parameterization)."""
    def make(row, notes):
        return _with_notes(_objective(row, notation, table=2), notes)

    labels = [make(row, _qualifiers(row, notation)) for row in rows]
    keyed = [f"{row['mean_type']}|{label}" for row, label in zip(rows, labels)]
    out = []
    for key, label, row in zip(keyed, labels, rows):
        if keyed.count(key) > 1:
            name = notation.escape(str(row["experiment"]))
            label = make(row, [*_qualifiers(row, notation), name])
        out.append(label)
    return out


# --------------------------------------------------------------------------------------------
# Cell formatting
# --------------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def format_mean_std(mean: Any, std: Any, digits: int, notation: Notation = TEXT) -> str:
    """"9.46 ± 0.11"; the mean alone without a std; "" when not measured."""
    if not _finite(mean):
        return ""
    text = f"{float(mean):.{digits}f}"
    return f"{text}{notation.pm}{float(std):.{digits}f}" if _finite(std) else text


def format_interval(value: Any, low: Any, high: Any, digits: int) -> str:
    """"29.97 [27.10, 32.84]"; the value alone without an interval; "" when not measured."""
    if not _finite(value):
        return ""
    text = f"{float(value):.{digits}f}"
    if _finite(low) and _finite(high):
        text += f" [{float(low):.{digits}f}, {float(high):.{digits}f}]"
    return text


def format_score(row: Mapping[str, Any], score: str, digits: int,
                 notation: Notation = TEXT) -> str:
    """A score of an `aggregate` row: with its interval (one seed), or mean ± sd (several)."""
    if row.get("seeds", 1) > 1:
        return format_mean_std(row[score], row.get(f"{score}_sd"), digits, notation)
    return format_interval(row[score], row.get(f"{score}_low"), row.get(f"{score}_high"),
                           digits)


def significant_digits(value: Any, figures: int = 3) -> int:
    """Decimals that show `figures` significant figures of `value` (at least 2): KID is
    ~40 on the digits classifier's features and ~0.01 on Inception's."""
    if not _finite(value) or float(value) == 0:
        return 2
    return max(2, figures - 1 - math.floor(math.log10(abs(float(value)))))


def format_value(value: Any, digits: int = 2) -> str:
    return f"{float(value):.{digits}f}" if _finite(value) else ""


def format_nll(test: str, train: Any, notation: Notation = TEXT) -> str:
    """"≤ 3.75 (3.72)": the test-set bound (already formatted), the train-set bound."""
    parts = []
    if test:
        parts.append(f"{notation.leq}{test}")
    if _finite(train):
        parts.append(f"({float(train):.2f})")
    return " ".join(parts)


def _unstable(row: Mapping[str, Any]) -> bool:
    return row.get("status") == Status.UNSTABLE


# --------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------

TABLE1_SCORES = ("is_mean", "fid", "nll_bpd", "nll_bpd_train")
INTERVAL_COLUMNS = tuple(f"{score}{suffix}" for score in TABLE1_SCORES
                         for suffix in ("", "_low", "_high", "_sd"))


def _reference_label(key: str, entry: Mapping[str, Any], notation: Notation) -> str:
    if key == "real_data":
        return (f"Real data ({entry.get('num_images', '?')} images, mean{notation.pm}sd over "
                f"{entry.get('draws', '?')} draws)")
    if key == "ceiling":
        return f"Uniform over the {entry.get('levels', '?')} levels (NLL ceiling)"
    return "Untrained model"


def _table1_frame(df: pd.DataFrame, reference: Mapping | None, dataset: str,
                  notation: Notation) -> pd.DataFrame:
    rows = _sorted_rows(df)
    records = []
    for label, row in zip(table1_labels(rows, notation), rows):
        records.append({"model": label, "source": "ours", "experiment": row["experiment"],
                        "status": row["status"], "seeds": row["seeds"],
                        **{k: row.get(k) for k in INTERVAL_COLUMNS}})
    for key in ("real_data", "untrained", "ceiling"):
        entry = (reference or {}).get(key)
        if entry is None:
            continue
        record = {"model": _reference_label(key, entry, notation), "source": "reference",
                  "experiment": None, "status": Status.OK.value, "seeds": 1}
        for score in TABLE1_SCORES:
            record[score] = entry.get(score)
            record[f"{score}_sd"] = entry.get(f"{score}_sd")
            se = entry.get(f"{score}_se")
            if _finite(entry.get(score)) and _finite(se):
                record[f"{score}_low"], record[f"{score}_high"] = \
                    Estimate(entry[score], se).interval()
        records.append(record)
    if dataset == "cifar10":
        for objective, is_mean, is_std, fid, nll, nll_train in PAPER_TABLE1:
            paper_row = {"mean_type": "eps", "loss": "vlb" if objective == "fixed" else "simple",
                         "var_type": "fixed_large"}
            label = f"Paper: Ours ({_objective(paper_row, notation, table=1)})"
            records.append({"model": label, "source": "paper", "experiment": None,
                            "status": Status.OK.value, "seeds": None, "is_mean": is_mean,
                            "is_mean_sd": is_std, "fid": fid, "nll_bpd": nll,
                            "nll_bpd_train": nll_train})
    out = pd.DataFrame.from_records(records, columns=["model", "source", "experiment", "status",
                                                      "seeds", *INTERVAL_COLUMNS])
    for key in INTERVAL_COLUMNS:
        out[key] = pd.to_numeric(out[key], errors="coerce").astype("float64")
    return out


def table1_raw(df: pd.DataFrame, reference: Mapping | None, dataset: str) -> pd.DataFrame:
    """Table 1 as numbers: model, source (ours | reference | paper), experiment, status,
    seeds, and for is_mean, fid, nll_bpd and nll_bpd_train the value, its 95 % interval
    (`_low`, `_high`) and the sd over seeds or draws (`_sd`; the paper's IS ± for its rows)."""
    return _table1_frame(df, reference, dataset, TEXT)


def table1(df: pd.DataFrame, reference: Mapping | None, dataset: str, *,
           notation: Notation = TEXT) -> pd.DataFrame:
    """Table 1 formatted like the paper: Model | IS | FID | NLL Test (Train).

    Our experiments in the paper's order; then, when given, the reference rows (real data at
    the samples' N, untrained model, NLL ceiling) from reference.json; for cifar10 the paper's
    two rows ("Paper: ...")."""
    raw = _table1_frame(df, reference, dataset, notation)
    cells = []
    for row in raw.to_dict("records"):
        if _unstable(row):
            cells.append([row["model"], *[notation.dash] * 3])
            continue
        spread = row["source"] == "paper" or row["model"].startswith("Real data")
        ceiling = row["source"] == "reference" and not _finite(row["fid"])
        if spread:  # the paper's ± and the real-data draws: mean ± sd
            is_cell = format_mean_std(row["is_mean"], row["is_mean_sd"], 2, notation)
            fid_cell = format_mean_std(row["fid"], row["fid_sd"], 2, notation)
            nll_cell = format_value(row["nll_bpd"])
        else:
            is_cell = format_score(row, "is_mean", 2, notation)
            fid_cell = format_score(row, "fid", 2, notation)
            nll_cell = format_score(row, "nll_bpd", 2, notation)
        if ceiling:  # the uniform distribution over the levels: an NLL, no samples
            cells.append([row["model"], "", "", format_value(row["nll_bpd"])])
            continue

        cells.append([row["model"], is_cell, fid_cell,
                      format_nll(nll_cell, row["nll_bpd_train"], notation)])
    return pd.DataFrame(cells, columns=["Model", "IS", "FID", "NLL Test (Train)"])


# --------------------------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------------------------

TABLE2_SCORES = ("is_mean", "fid", "nll_bpd", "nll_bpd_train", "kid_mean")


def paper_table2_row(row: Mapping[str, Any]) -> tuple[str, tuple | None] | None:
    """("ok", (is_mean, is_std, fid)) or ("unstable", None) for a row the paper has, else None."""
    if row["schedule"] != "linear" or row["weighting"] != "uniform":
        return None
    if row["var_type"] == "learned_range" or row["loss"] == "hybrid":
        return None
    key = (row["mean_type"], objective_key(row))
    if key not in PAPER_TABLE2:
        return None
    values = PAPER_TABLE2[key]
    return (Status.UNSTABLE.value, None) if values is None else (Status.OK.value, values)


def _table2_frame(df: pd.DataFrame, dataset: str, notation: Notation) -> pd.DataFrame:
    rows = _sorted_rows(df)
    columns = [f"{score}{suffix}" for score in TABLE2_SCORES
               for suffix in ("", "_low", "_high", "_sd")]
    records = []
    for label, row in zip(table2_labels(rows, notation), rows):
        record = {"group": notation.groups.get(row["mean_type"], str(row["mean_type"])),
                  "objective": label,
                  **{k: row[k] for k in ("experiment", "mean_type", "var_type", "loss",
                                         "weighting", "schedule", "status", "seeds")},
                  **{k: row.get(k) for k in columns}}
        if dataset == "cifar10":
            paper = paper_table2_row(row)
            status, values = paper if paper else (None, None)
            is_mean, is_std, fid = values if values else (math.nan, math.nan, math.nan)
            record.update({"paper_status": status, "is_mean_paper": is_mean,
                           "is_std_paper": is_std, "fid_paper": fid})
        records.append(record)
    out = pd.DataFrame.from_records(records)
    for key in (*columns, "is_mean_paper", "is_std_paper", "fid_paper"):
        if key in out.columns:
            out[key] = pd.to_numeric(out[key], errors="coerce").astype("float64")
    return out


def table2_raw(df: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Table 2 as numbers: group, objective, the experiment's settings, status, seeds, and for
    is_mean, fid, nll_bpd, nll_bpd_train and kid_mean the value, `_low`, `_high`, `_sd`; for
    cifar10 also paper_status (ok | unstable | empty), is_mean_paper, is_std_paper, fid_paper."""
    return _table2_frame(df, dataset, TEXT)


def run_descriptions(table2_raw_frame: pd.DataFrame) -> dict[str, str]:
    """{experiment: markdown} naming each experiment's row of Table 2 and its numbers, for the
    description of its MLflow runs (what `mlflow ui` shows on the run's page)."""
    out = {}
    for row in table2_raw_frame.to_dict("records"):
        settings = ", ".join(f"{k} {row[k]}" for k in ("mean_type", "var_type", "loss",
                                                      "weighting", "schedule"))
        text = (f"Table 2 row: {row['group']}, {row['objective']}.\n\n"
                f"Experiment `{row['experiment']}` ({settings}).")
        if _unstable(row):
            text += " Training diverged (unstable), shown as \"–\" in the tables."
        elif _finite(row.get("fid")):
            seeds = f" (mean of {row['seeds']} seeds)" if row.get("seeds", 1) > 1 else ""
            text += (f" FID {format_score(row, 'fid', 2)}, IS {format_score(row, 'is_mean', 2)},"
                     f" NLL {format_score(row, 'nll_bpd', 2)} bits/dim{seeds}.")
        if _finite(row.get("fid_paper")):
            text += (f" Paper (CIFAR10): IS {format_value(row['is_mean_paper'])}, "
                     f"FID {format_value(row['fid_paper'])}.")
        out[str(row["experiment"])] = text
    return out


def table2(df: pd.DataFrame, dataset: str, *, notation: Notation = TEXT) -> pd.DataFrame:
    """Table 2 formatted like the paper: Objective | IS | FID | NLL Test (Train) | KID.

    Rows grouped under "μ̃ prediction (baseline)", "ε prediction (ours)" (and "x₀ prediction"),
    each a header row with empty cells; within a group learned Σ, fixed Σ, simple, hybrid.
    For cifar10 two more columns, "IS (paper)" and "FID (paper)", hold the paper's numbers.
    """
    raw = _table2_frame(df, dataset, notation)
    columns = ["Objective", "IS", "FID", "NLL Test (Train)", "KID"]
    paper = dataset == "cifar10"
    if paper:
        columns += ["IS (paper)", "FID (paper)"]
    cells: list[list[str]] = []
    group = None
    for row in raw.to_dict("records"):
        if row["group"] != group:
            group = row["group"]
            cells.append([group, *[""] * (len(columns) - 1)])
        if _unstable(row):
            ours = [notation.dash] * 4
        else:
            ours = [format_score(row, "is_mean", 2, notation),
                    format_score(row, "fid", 2, notation),
                    format_nll(format_score(row, "nll_bpd", 2, notation), row["nll_bpd_train"],
                               notation),
                    format_score(row, "kid_mean", significant_digits(row["kid_mean"]),
                                 notation)]

        theirs = []
        if paper:
            if row["paper_status"] == Status.UNSTABLE:
                theirs = [notation.dash, notation.dash]
            else:
                theirs = [format_mean_std(row["is_mean_paper"], row["is_std_paper"], 2, notation),
                          format_value(row["fid_paper"])]
        cells.append([row["objective"], *ours, *theirs])
    return pd.DataFrame(cells, columns=columns)


# --------------------------------------------------------------------------------------------
# Sweep: schedule x weighting
# --------------------------------------------------------------------------------------------



def _ordered(values: Iterable[str], known: tuple[str, ...]) -> list[str]:
    values = set(values)
    return [v for v in known if v in values] + sorted(v for v in values if v not in known)


def sweep_raw(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (schedule, weighting) cell: trials, ok_trials, fid, nll_bpd and nll_bpd_rung
    (the means over the cell's usable trials: FID of the finished ones, the last NLL, the NLL at
    the first ASHA rung), status ("ok"; "stopped" when every usable trial was stopped early,
    with the NLL they reached and no FID; "unstable" when no trial is usable), and rank (1 =
    best) by the NLL at the first rung, which every cell that trains has, measured on the same
    images with the same noise draws in every trial."""
    trials = trials.copy()
    if "nll_bpd_rung" not in trials.columns:  # an older trials.csv: its last NLL
        trials["nll_bpd_rung"] = trials["nll_bpd"]
    trials["schedule"] = trials["schedule"].astype(str)
    trials["weighting"] = trials["weighting"].astype(str)
    status = (trials["status"].astype(str) if "status" in trials.columns
              else pd.Series(Status.OK.value, index=trials.index))
    trials["_ok"] = status == Status.OK
    trials["_stopped"] = status == Status.STOPPED  # by ASHA: an NLL so far, no FID
    records = []
    for schedule in _ordered(trials["schedule"], SCHEDULES):
        for weighting in _ordered(trials["weighting"], SWEEP_WEIGHTINGS):
            cell = trials[(trials["schedule"] == schedule) & (trials["weighting"] == weighting)]
            if cell.empty:
                continue
            ok = cell[cell["_ok"]]
            usable = ok if len(ok) else cell[cell["_stopped"]]
            records.append({
                "schedule": schedule, "weighting": weighting,
                "trials": len(cell), "ok_trials": len(ok),
                "fid": pd.to_numeric(ok["fid"], errors="coerce").mean() if len(ok) else math.nan,
                "nll_bpd": (pd.to_numeric(usable["nll_bpd"], errors="coerce").mean()
                            if len(usable) else math.nan),
                "nll_bpd_rung": (pd.to_numeric(usable["nll_bpd_rung"], errors="coerce").mean()
                                 if len(usable) else math.nan),
                "status": (Status.OK if len(ok) else Status.STOPPED if len(usable)
                           else Status.UNSTABLE).value,
            })
    out = pd.DataFrame.from_records(records, columns=["schedule", "weighting", "trials",
                                                      "ok_trials", "fid", "nll_bpd",
                                                      "nll_bpd_rung", "status"])
    for key in ("fid", "nll_bpd", "nll_bpd_rung"):
        out[key] = out[key].astype("float64")
    out["rank"] = out["nll_bpd_rung"].rank(method="min").astype("Int64")
    return out


SWEEP_CORNER = "Schedule (cells: FID / NLL at the first rung, #rank by that NLL)"


def sweep_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Pivot schedule (rows) x weighting (columns); each cell "FID / NLL #rank"
    ("3.17 / 3.75 #1"), with the NLL at the first ASHA rung, which compares every cell;
    "stopped / NLL #rank" where the scheduler stopped every trial of the cell there (no FID);
    "–" where every trial of the cell was unstable; empty where the sweep has no such cell."""
    raw = sweep_raw(trials)
    schedules = list(dict.fromkeys(raw["schedule"]))
    weightings = _ordered(raw["weighting"], SWEEP_WEIGHTINGS)
    cells = {(r["schedule"], r["weighting"]): r for r in raw.to_dict("records")}
    rows = []
    for schedule in schedules:
        row = [schedule]
        for weighting in weightings:
            cell = cells.get((schedule, weighting))
            if cell is None:
                row.append("")
            elif cell["status"] not in (Status.OK, Status.STOPPED):
                row.append(TEXT.dash)
            else:
                fid = "stopped" if cell["status"] == Status.STOPPED else \
                    format_value(cell["fid"]) or "n/a"
                rank = f" #{cell['rank']}" if not pd.isna(cell["rank"]) else ""
                row.append(f"{fid} / {format_value(cell['nll_bpd_rung']) or 'n/a'}{rank}")

        rows.append(row)
    return pd.DataFrame(rows, columns=[SWEEP_CORNER, *weightings])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def to_markdown(table: pd.DataFrame) -> str:
    """A pipe table; "|" inside a cell (the norm bars of "||μ̃ − μ̃_θ||²") is escaped as "\\|"
    so it does not split the cell, and numbers stay as formatted ("3.20", not tabulate's 3.2)."""
    def escape(value: Any) -> Any:
        return value.replace("|", "\\|") if isinstance(value, str) else value

    escaped = table.map(escape).rename(columns=escape)
    return escaped.to_markdown(index=False, disable_numparse=True) + "\n"


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs tabular; cells are already LaTeX (built with the TEX notation)."""
    column_format = "l" + "r" * (table.shape[1] - 1)
    return table.to_latex(index=False, escape=False, column_format=column_format,
                          caption=caption, label=label)


def _write_csv(path: Path, table: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _write(path: Path, text: str) -> Path:
    write_text(path, text)
    return path


def check_dataset(runs: pd.DataFrame, dataset: str) -> None:
    """Every metrics file must come from the dataset the tables are for (no stale results)."""
    for row in runs.to_dict("records"):
        found = row.get("dataset")
        if isinstance(found, str) and found and found != dataset:
            key = run_key(row["experiment"], row["seed"])
            raise TablesError(f"{key}.json: the metrics of run '{key}' are for dataset "
                              f"'{found}', but params.yaml names '{dataset}'; rerun "
                              f"`dvc repro evaluate@{key}`")


def build_tables(metrics: pd.DataFrame, dataset: str, reference: Mapping | None = None,
                 trials: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every table in every form from `aggregate`'s rows: table1 / table2 / sweep (formatted
    text), *_tex (formatted LaTeX), *_raw (numbers); the sweep entries are None without trials;
    plus dataset."""
    tables: dict[str, Any] = {
        "dataset": dataset,
        "table1": table1(metrics, reference, dataset),
        "table1_tex": table1(metrics, reference, dataset, notation=TEX),
        "table1_raw": table1_raw(metrics, reference, dataset),
        "table2": table2(metrics, dataset),
        "table2_tex": table2(metrics, dataset, notation=TEX),
        "table2_raw": table2_raw(metrics, dataset),
        "sweep": None,
        "sweep_raw": None,
    }
    if trials is not None:
        tables["sweep"] = sweep_table(trials)
        tables["sweep_raw"] = sweep_raw(trials)
    return tables


def write_tables(results_dir: str | Path, tables: Mapping[str, Any]) -> list[Path]:
    """Write the output of `build_tables`, each file atomically: <results_dir>/table1.{md,csv,tex},
    table2.{md,csv,tex} and, when the sweep was given, sweep.{md,csv}. Returns the paths."""
    results_dir = Path(results_dir)
    name = DATASET_NAMES.get(tables["dataset"], tables["dataset"])
    intervals = ("[a, b]: 95 \\% interval (jackknife over the samples; over the images for "
                 "the NLL bound); mean $\\pm$ sd over seeds where there are several.")
    captions = {
        "table1": f"{tex_escape(name)} results. NLL measured in bits/dim. {intervals}",
        "table2": f"Unconditional {tex_escape(name)} reverse process parameterization and "
                  "training objective ablation. NLL measured in bits/dim; -- : unstable to "
                  f"train. {intervals}",
    }

    paths = []
    for stem in ("table1", "table2"):
        paths.append(_write(results_dir / f"{stem}.md", to_markdown(tables[stem])))
        paths.append(_write_csv(results_dir / f"{stem}.csv", tables[f"{stem}_raw"]))
        paths.append(_write(results_dir / f"{stem}.tex",
                            to_latex(tables[f"{stem}_tex"], captions[stem], f"tab:{stem}")))
    if tables.get("sweep") is not None:
        paths.append(_write(results_dir / "sweep.md", to_markdown(tables["sweep"])))
        paths.append(_write_csv(results_dir / "sweep.csv", tables["sweep_raw"]))
    return paths
