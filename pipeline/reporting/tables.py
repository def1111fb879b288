"""Results -> the paper's tables: Table 1 (sample quality and NLL) and Table 2 (ablation).

Ho, Jain & Abbeel 2020, Table 1 ("CIFAR10 results. NLL measured in bits/dim.") and Table 2
("Unconditional CIFAR10 reverse process parameterization and training objective ablation"),
built with pandas from the rows of `pipeline.reporting.results.aggregate`: one row per
experiment, the mean over its seeds. The sweep's table is `pipeline.reporting.sweep_report`.

Each table comes in three forms, from one pass over its rows (`build_tables`): raw (one row
per experiment, float columns per metric with its interval; written as csv so that
`pandas.read_csv` gets them back), and formatted like the paper in text (markdown) and in LaTeX
(symbols as math, e.g. `$\\Sigma$`; booktabs rules, so the including document needs
`\\usepackage{booktabs}`). Cells and notation: `pipeline.reporting.formats`.

Intervals (`pipeline.measure.stats`): the jackknife over the samples for FID / IS / KID, over
images for the NLL bound, widened by the seed calibration's training noise where it holds;
with several seeds, the mean and the sd over seeds. An unstable run (non-finite training loss)
shows "–" in every metric cell, as the paper's blank Table 2 entries. Table 1's reference rows:
real data at the samples' N (mean ± sd over draws), an untrained model, and the NLL ceiling of
the data's levels.

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
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from pipeline.core import scores
from pipeline.core.dataset_specs import DATASET_SPECS, PAPER_TABLE2
from pipeline.core.scores import Score
from pipeline.core.status import Status
from pipeline.measure.stats import Estimate
from pipeline.reporting.formats import (TEX, TEXT, Notation, finite, format_mean_std, format_nll,
                                        format_score, format_value, significant_digits, tex_escape,
                                        to_latex, to_markdown, unstable, write_csv, write_file)

GROUP_ORDER = ("mu", "eps", "x0")          # Table 2: baseline first, then ours, then extras
OBJECTIVE_ORDER = ("learned", "fixed", "simple", "hybrid")  # within a group, as in the paper

WEIGHTING_NAMES = {"vlb": "VLB", "p2": "P2", "min_snr": "min-SNR"}


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
# Table 1
# --------------------------------------------------------------------------------------------

TABLE1_SCORES = tuple(s.name for s in scores.in_table(1))
INTERVAL_COLUMNS = tuple(f"{score}{suffix}" for score in TABLE1_SCORES
                         for suffix in ("", "_low", "_high", "_sd"))


def _columns(table: int) -> list[Score]:
    """The scores with a column of their own in Table `table`, in order."""
    return [s for s in scores.in_table(table) if s.column is not None]


def _cell(row: Mapping[str, Any], s: Score, notation: Notation, spread: bool = False) -> str:
    """One score's cell: its value with its interval (one seed) or mean ± sd (several); with
    `spread` (the paper's rows, the real-data draws) mean ± sd for a score of the samples and
    the value alone for one of the bound. A score shown `within` it follows in brackets."""
    digits = s.digits if s.digits is not None else significant_digits(row[s.name])
    if not spread:
        cell = format_score(row, s.name, digits, notation)
    elif s.source == scores.SAMPLES:
        cell = format_mean_std(row[s.name], row.get(f"{s.name}_sd"), digits, notation)
    else:
        cell = format_value(row[s.name], digits)
    for inner in scores.SCORES:
        if inner.within == s.name:
            cell = format_nll(cell, row.get(inner.name), notation)
    return cell


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


def _paper(dataset: str) -> tuple[tuple, Mapping]:
    """The paper's rows of Table 1 and Table 2 on `dataset` (its spec's; none if it has none)."""
    spec = DATASET_SPECS.get(dataset)
    return (spec.paper_table1, spec.paper_table2) if spec is not None else ((), {})


def _table1_frame(df: pd.DataFrame, reference: Mapping | None, dataset: str
                  ) -> tuple[pd.DataFrame, Callable[[Notation], list[str]]]:
    """Table 1's rows, built once: the numbers (`build_tables`' table1_raw, its model column
    spelled in TEXT) and a function giving each row's model label in a notation."""
    rows = _sorted_rows(df)
    references = [(key, (reference or {})[key]) for key in ("real_data", "untrained", "ceiling")
                  if (reference or {}).get(key) is not None]
    papers, _ = _paper(dataset)

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
            if finite(entry.get(score)) and finite(se):
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
    columns = _columns(1)
    cells = []
    for model, row in zip(models, raw.to_dict("records")):
        if unstable(row):
            cells.append([model, *[notation.dash] * len(columns)])
            continue
        if row["source"] == "reference" and not finite(row["fid"]):
            # the ceiling, the uniform distribution over the levels: an NLL, no samples
            cells.append([model, *(format_value(row[s.name], s.digits or 2) for s in columns)])
            continue
        spread = row["source"] == "paper" or model.startswith("Real data")
        cells.append([model, *(_cell(row, s, notation, spread) for s in columns)])
    return pd.DataFrame(cells, columns=["Model", *(s.column for s in columns)])






# --------------------------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------------------------

TABLE2_SCORES = tuple(s.name for s in scores.in_table(2))


def paper_table2_row(row: Mapping[str, Any], table: Mapping = PAPER_TABLE2
                     ) -> tuple[str, tuple | None] | None:
    """("ok", (is_mean, is_std, fid)) or ("unstable", None) for a row the paper's Table 2
    (`table`: the paper's CIFAR10 numbers) has, else None."""
    if row["schedule"] != "linear" or row["weighting"] != "uniform":
        return None
    if row["var_type"] == "learned_range" or row["loss"] == "hybrid":
        return None
    key = (row["mean_type"], objective_key(row))
    if key not in table:
        return None
    values = table[key]
    return (Status.UNSTABLE.value, None) if values is None else (Status.OK.value, values)


def _table2_frame(df: pd.DataFrame, dataset: str
                  ) -> tuple[pd.DataFrame, Callable[[Notation], list[tuple[str, str]]]]:
    """Table 2's rows, built once: the numbers (`build_tables`' table2_raw, its group and
    objective columns spelled in TEXT) and a function giving each row's (group, objective) in
    a notation."""
    rows = _sorted_rows(df)

    def labels(notation: Notation) -> list[tuple[str, str]]:
        return [(notation.groups.get(row["mean_type"], str(row["mean_type"])), label)
                for label, row in zip(table2_labels(rows, notation), rows)]

    columns = [f"{score}{suffix}" for score in TABLE2_SCORES
               for suffix in ("", "_low", "_high", "_sd")]
    _, paper_rows = _paper(dataset)
    records = []
    for (group, objective), row in zip(labels(TEXT), rows):
        record = {"group": group, "objective": objective,
                  **{k: row[k] for k in ("experiment", "mean_type", "var_type", "loss",
                                         "weighting", "schedule", "status", "seeds")},
                  **{k: row.get(k) for k in columns}}
        if paper_rows:
            paper = paper_table2_row(row, paper_rows)
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
    scored = _columns(2)
    columns = ["Objective", *(s.column for s in scored)]
    paper = bool(_paper(dataset)[1])
    if paper:
        columns += ["IS (paper)", "FID (paper)"]
    cells: list[list[str]] = []
    group = None
    for (row_group, objective), row in zip(labels, raw.to_dict("records")):
        if row_group != group:
            group = row_group
            cells.append([group, *[""] * (len(columns) - 1)])
        if unstable(row):
            ours = [notation.dash] * len(scored)
        else:
            ours = [_cell(row, s, notation) for s in scored]

        theirs = []
        if paper:
            if row["paper_status"] == Status.UNSTABLE:
                theirs = [notation.dash, notation.dash]
            else:
                theirs = [format_mean_std(row["is_mean_paper"], row["is_std_paper"], 2, notation),
                          format_value(row["fid_paper"])]
        cells.append([objective, *ours, *theirs])
    return pd.DataFrame(cells, columns=columns)






def run_descriptions(table2_raw_frame: pd.DataFrame) -> dict[str, str]:
    """{experiment: markdown} naming each experiment's row of Table 2 and its numbers, for the
    description of its MLflow runs (what `mlflow ui` shows on the run's page)."""
    out = {}
    for row in table2_raw_frame.to_dict("records"):
        settings = ", ".join(f"{k} {row[k]}" for k in ("mean_type", "var_type", "loss",
                                                      "weighting", "schedule"))
        text = (f"Table 2 row: {row['group']}, {row['objective']}.\n\n"
                f"Experiment `{row['experiment']}` ({settings}).")
        if unstable(row):
            text += " Training diverged (unstable), shown as \"–\" in the tables."
        elif finite(row.get("fid")):
            seeds = f" (mean of {row['seeds']} seeds)" if row.get("seeds", 1) > 1 else ""
            text += (f" FID {format_score(row, 'fid', 2)}, IS {format_score(row, 'is_mean', 2)},"
                     f" NLL {format_score(row, 'nll_bpd', 2)} bits/dim{seeds}.")
        if finite(row.get("fid_paper")):
            text += (f" Paper (CIFAR10): IS {format_value(row['is_mean_paper'])}, "
                     f"FID {format_value(row['fid_paper'])}.")
        out[str(row["experiment"])] = text
    return out


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
    spec = DATASET_SPECS.get(tables["dataset"])
    name = spec.label if spec is not None else tables["dataset"]
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
        paths.append(write_file(results_dir / f"{stem}.md", to_markdown(tables[stem])))
        paths.append(write_csv(results_dir / f"{stem}.csv", tables[f"{stem}_raw"]))
        paths.append(write_file(results_dir / f"{stem}.tex",
                            to_latex(tables[f"{stem}_tex"], captions[stem], f"tab:{stem}")))
    return paths
