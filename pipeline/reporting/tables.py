"""Results -> the paper's tables: Table 1 (sample quality and NLL) and Table 2 (ablation).

Ho, Jain & Abbeel 2020, Table 1 ("CIFAR10 results. NLL measured in bits/dim.") and Table 2
("Unconditional CIFAR10 reverse process parameterization and training objective ablation"),
built with pandas from the rows of `pipeline.reporting.results.aggregate`: one row per
experiment, the mean over its seeds. The sweep's table is `pipeline.reporting.sweep_report`.

Each table comes in two forms, from one pass over its rows (`build_tables`):
- raw (`table1_raw`, `table2_raw`): one row per experiment, float columns per metric with its
  interval; written as csv (`write_csv`) so `pandas.read_csv` gets them back;
- formatted (`table1`, `table2`): strings shaped like the paper, written as
  markdown (`to_markdown`) and LaTeX (`to_latex`; symbols as math, e.g. `$\\Sigma$`; the
  tabular uses booktabs rules, so the including document needs `\\usepackage{booktabs}`).

Cells: a score and its 95 % interval, "29.97 [27.10, 32.84]" (`pipeline.measure.stats`:
jackknife over the samples for FID / IS / KID, over images for the NLL bound); with several seeds, the mean and
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
from typing import Any, Callable, Mapping

import pandas as pd

from pipeline.core.io import atomic_path, write_text
from pipeline.core.status import Status
from pipeline.measure.stats import Estimate

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


def _paper_table1_label(objective: str, notation: Notation) -> str:
    row = {"mean_type": "eps", "loss": "vlb" if objective == "fixed" else "simple",
           "var_type": "fixed_large"}
    return f"Paper: Ours ({_objective(row, notation, table=1)})"


def _table1_frame(df: pd.DataFrame, reference: Mapping | None, dataset: str
                  ) -> tuple[pd.DataFrame, Callable[[Notation], list[str]]]:
    """Table 1's rows, built once: the numbers (`table1_raw`, its model column spelled in
    TEXT) and a function giving each row's model label in a notation."""
    rows = _sorted_rows(df)
    references = [(key, (reference or {})[key]) for key in ("real_data", "untrained", "ceiling")
                  if (reference or {}).get(key) is not None]
    papers = PAPER_TABLE1 if dataset == "cifar10" else ()

    def labels(notation: Notation) -> list[str]:
        return [*table1_labels(rows, notation),
                *(_reference_label(key, entry, notation) for key, entry in references),
                *(_paper_table1_label(paper[0], notation) for paper in papers)]

    models = iter(labels(TEXT))
    records = []
    for row in rows:
        records.append({"model": next(models), "source": "ours", "experiment": row["experiment"],
                        "status": row["status"], "seeds": row["seeds"],
                        **{k: row.get(k) for k in INTERVAL_COLUMNS}})
    for key, entry in references:
        record = {"model": next(models), "source": "reference",
                  "experiment": None, "status": Status.OK.value, "seeds": 1}
        for score in TABLE1_SCORES:
            record[score] = entry.get(score)
            record[f"{score}_sd"] = entry.get(f"{score}_sd")
            se = entry.get(f"{score}_se")
            if _finite(entry.get(score)) and _finite(se):
                record[f"{score}_low"], record[f"{score}_high"] = \
                    Estimate(entry[score], se).interval()
        records.append(record)
    for objective, is_mean, is_std, fid, nll, nll_train in papers:
        records.append({"model": next(models), "source": "paper", "experiment": None,
                        "status": Status.OK.value, "seeds": None, "is_mean": is_mean,
                        "is_mean_sd": is_std, "fid": fid, "nll_bpd": nll,
                        "nll_bpd_train": nll_train})
    out = pd.DataFrame.from_records(records, columns=["model", "source", "experiment", "status",
                                                      "seeds", *INTERVAL_COLUMNS])
    for key in INTERVAL_COLUMNS:
        out[key] = pd.to_numeric(out[key], errors="coerce").astype("float64")
    return out, labels


def _table1_cells(raw: pd.DataFrame, models: list[str], notation: Notation) -> pd.DataFrame:
    """Table 1 formatted in `notation` from its raw rows and their model labels."""
    cells = []
    for model, row in zip(models, raw.to_dict("records")):
        if _unstable(row):
            cells.append([model, *[notation.dash] * 3])
            continue
        spread = row["source"] == "paper" or model.startswith("Real data")
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
            cells.append([model, "", "", format_value(row["nll_bpd"])])
            continue

        cells.append([model, is_cell, fid_cell,
                      format_nll(nll_cell, row["nll_bpd_train"], notation)])
    return pd.DataFrame(cells, columns=["Model", "IS", "FID", "NLL Test (Train)"])


def table1_raw(df: pd.DataFrame, reference: Mapping | None, dataset: str) -> pd.DataFrame:
    """Table 1 as numbers: model, source (ours | reference | paper), experiment, status,
    seeds, and for is_mean, fid, nll_bpd and nll_bpd_train the value, its 95 % interval
    (`_low`, `_high`) and the sd over seeds or draws (`_sd`; the paper's IS ± for its rows)."""
    return _table1_frame(df, reference, dataset)[0]


def table1(df: pd.DataFrame, reference: Mapping | None, dataset: str, *,
           notation: Notation = TEXT) -> pd.DataFrame:
    """Table 1 formatted like the paper: Model | IS | FID | NLL Test (Train).

    Our experiments in the paper's order; then, when given, the reference rows (real data at
    the samples' N, untrained model, NLL ceiling) from reference.json; for cifar10 the paper's
    two rows ("Paper: ...")."""
    raw, labels = _table1_frame(df, reference, dataset)
    return _table1_cells(raw, labels(notation), notation)


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


def _table2_frame(df: pd.DataFrame, dataset: str
                  ) -> tuple[pd.DataFrame, Callable[[Notation], list[tuple[str, str]]]]:
    """Table 2's rows, built once: the numbers (`table2_raw`, its group and objective columns
    spelled in TEXT) and a function giving each row's (group, objective) in a notation."""
    rows = _sorted_rows(df)

    def labels(notation: Notation) -> list[tuple[str, str]]:
        return [(notation.groups.get(row["mean_type"], str(row["mean_type"])), label)
                for label, row in zip(table2_labels(rows, notation), rows)]

    columns = [f"{score}{suffix}" for score in TABLE2_SCORES
               for suffix in ("", "_low", "_high", "_sd")]
    records = []
    for (group, objective), row in zip(labels(TEXT), rows):
        record = {"group": group, "objective": objective,
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
    return out, labels


def _table2_cells(raw: pd.DataFrame, labels: list[tuple[str, str]], dataset: str,
                  notation: Notation) -> pd.DataFrame:
    """Table 2 formatted in `notation` from its raw rows and their (group, objective)."""
    columns = ["Objective", "IS", "FID", "NLL Test (Train)", "KID"]
    paper = dataset == "cifar10"
    if paper:
        columns += ["IS (paper)", "FID (paper)"]
    cells: list[list[str]] = []
    group = None
    for (row_group, objective), row in zip(labels, raw.to_dict("records")):
        if row_group != group:
            group = row_group
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
        cells.append([objective, *ours, *theirs])
    return pd.DataFrame(cells, columns=columns)


def table2_raw(df: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Table 2 as numbers: group, objective, the experiment's settings, status, seeds, and for
    is_mean, fid, nll_bpd, nll_bpd_train and kid_mean the value, `_low`, `_high`, `_sd`; for
    cifar10 also paper_status (ok | unstable | empty), is_mean_paper, is_std_paper, fid_paper."""
    return _table2_frame(df, dataset)[0]


def table2(df: pd.DataFrame, dataset: str, *, notation: Notation = TEXT) -> pd.DataFrame:
    """Table 2 formatted like the paper: Objective | IS | FID | NLL Test (Train) | KID.

    Rows grouped under "μ̃ prediction (baseline)", "ε prediction (ours)" (and "x₀ prediction"),
    each a header row with empty cells; within a group learned Σ, fixed Σ, simple, hybrid.
    For cifar10 two more columns, "IS (paper)" and "FID (paper)", hold the paper's numbers.
    """
    raw, labels = _table2_frame(df, dataset)
    return _table2_cells(raw, labels(notation), dataset, notation)


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


def write_csv(path: str | Path, table: pd.DataFrame) -> Path:
    """Write `table` as csv (no index) atomically; return its path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def _write(path: Path, text: str) -> Path:
    write_text(path, text)
    return path


def build_tables(metrics: pd.DataFrame, dataset: str,
                 reference: Mapping | None = None) -> dict[str, Any]:
    """Tables 1 and 2 in every form from `aggregate`'s rows, each table's rows built once:
    table1 / table2 (formatted text), *_tex (formatted LaTeX), *_raw (numbers); plus
    dataset."""
    raw1, models = _table1_frame(metrics, reference, dataset)
    raw2, objectives = _table2_frame(metrics, dataset)
    return {
        "dataset": dataset,
        "table1": _table1_cells(raw1, models(TEXT), TEXT),
        "table1_tex": _table1_cells(raw1, models(TEX), TEX),
        "table1_raw": raw1,
        "table2": _table2_cells(raw2, objectives(TEXT), dataset, TEXT),
        "table2_tex": _table2_cells(raw2, objectives(TEX), dataset, TEX),
        "table2_raw": raw2,
    }


def write_tables(results_dir: str | Path, tables: Mapping[str, Any]) -> list[Path]:
    """Write the output of `build_tables`, each file atomically: <results_dir>/table1.{md,csv,tex}
    and table2.{md,csv,tex}. Returns the paths."""
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
        paths.append(write_csv(results_dir / f"{stem}.csv", tables[f"{stem}_raw"]))
        paths.append(_write(results_dir / f"{stem}.tex",
                            to_latex(tables[f"{stem}_tex"], captions[stem], f"tab:{stem}")))
    return paths
