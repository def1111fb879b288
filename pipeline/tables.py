"""Results -> the paper's tables: Table 1 (sample quality and NLL), Table 2 (ablation), sweep.

Ho, Jain & Abbeel 2020, Table 1 ("CIFAR10 results. NLL measured in bits/dim.") and Table 2
("Unconditional CIFAR10 reverse process parameterization and training objective ablation"),
built with pandas from the `metrics/<experiment>.json` files the evaluate stages write.

Each table comes in two forms:
- raw (`table1_raw`, `table2_raw`, `sweep_raw`): one row per experiment (or sweep cell), one
  float column per metric; written as csv so `pandas.read_csv` gets the numbers back;
- formatted (`table1`, `table2`, `sweep_table`): strings shaped like the paper, written as
  markdown (`to_markdown`) and LaTeX (`to_latex`; symbols as math, e.g. `$\\Sigma$`; the
  tabular uses booktabs rules, so the including document needs `\\usepackage{booktabs}`).

Cells: IS "9.46 ± 0.11", FID "3.17", NLL "≤ 3.75 (3.72)" (test bound, train bound in
parentheses), KID "0.0100 ± 0.0020". An unstable run (non-finite training loss) shows "–" in
every metric cell, as the paper's blank Table 2 entries; a metric that was not measured is an
empty cell.

Row labels follow the paper: the objective ("L, fixed isotropic Σ", "L_simple", ...); in
Table 1 the mean parameterization ("ε prediction", "μ̃ prediction") is added only where two
rows would otherwise read the same; a schedule other than linear, a weighting other than
uniform and a variance other than the paper's are appended in brackets, e.g.
"Ours (L_simple) [cosine schedule, min-SNR weighting]". Rows that still collide get the
experiment name in the brackets.

Table 1 for cifar10 adds the paper's published numbers as a separate block of rows after ours
("Paper: Ours (...)"): rows keep the paper's four columns and read top to bottom. Table 2 for
cifar10 adds them as the columns "IS (paper)" and "FID (paper)" beside each of our rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from pipeline.config import (LOSSES, MEAN_TYPES, SCHEDULES, SWEEP_WEIGHTINGS, VAR_TYPES,
                             WEIGHTINGS)
from pipeline.io import atomic_path, write_text

REFERENCE_FILE = "reference.json"
STATUSES = ("ok", "unstable")
METRICS = ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "nll_bpd", "nll_bpd_stderr",
           "nll_bpd_train", "nll_bpd_train_stderr")
DESCRIPTORS = ("experiment", "status", "dataset", "mean_type", "var_type", "loss", "weighting",
               "schedule", "num_timesteps")
DEFAULTS = {"status": "ok", "weighting": "uniform", "schedule": "linear"}

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


class TablesError(ValueError):
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

    objectives: Mapping[str, str]   # keys of _objective_key(...) plus table-specific variants
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
# Loading
# --------------------------------------------------------------------------------------------


def metrics_path(metrics_dir: str | Path, experiment: str) -> Path:
    return Path(metrics_dir) / f"{experiment}.json"


def _make_hint(experiment: str) -> str:
    return (f"make it with `dvc repro evaluate@{experiment}` "
            f"(or `python -m stages.evaluate --experiment {experiment}`)")


def _read_json(path: Path, hint: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TablesError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg}); {hint}") from None
    except UnicodeDecodeError:
        raise TablesError(f"{path}: not valid JSON (not UTF-8 text); {hint}") from None


def _number(value: Any, path: Path, key: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TablesError(f"{path}: '{key}' must be a number or null, got {value!r}")
    return float(value)


def _read_metrics(path: Path, experiment: str) -> dict[str, Any]:
    hint = f"re{_make_hint(experiment)}"
    if not path.is_file():
        raise TablesError(f"{path}: metrics for experiment '{experiment}' not found; "
                          f"{_make_hint(experiment)}")
    raw = _read_json(path, hint)
    if not isinstance(raw, dict):
        raise TablesError(f"{path}: expected a JSON object of metrics, got {type(raw).__name__}; "
                          f"{hint}")
    named = raw.get("experiment") or experiment
    if named != experiment:
        raise TablesError(f"{path}: holds the metrics of experiment '{named}', not "
                          f"'{experiment}'; {hint}")
    record = {**raw, "experiment": experiment}
    for key, default in DEFAULTS.items():
        record[key] = raw.get(key) or default
    allowed = {"status": STATUSES, "mean_type": MEAN_TYPES, "var_type": VAR_TYPES,
               "loss": LOSSES, "weighting": WEIGHTINGS, "schedule": SCHEDULES}
    for key, values in allowed.items():
        if key not in record:
            raise TablesError(f"{path}: missing key '{key}'; {hint}")
        if record[key] not in values:
            raise TablesError(f"{path}: '{key}' is {record[key]!r}; expected one of: "
                              f"{', '.join(values)}")
    for key in METRICS:
        record[key] = _number(raw.get(key), path, key)
    if record["status"] == "unstable":  # diverged: no metric is meaningful
        record.update({key: math.nan for key in METRICS})
    return record


def load_metrics(metrics_dir: str | Path, experiments: list[str] | None = None) -> pd.DataFrame:
    """Read `metrics_dir/<experiment>.json` for each experiment into one row each.

    `experiments` None reads every json file in the folder but `reference.json`, sorted by name.
    Columns: experiment, status, dataset, mean_type, var_type, loss, weighting, schedule,
    num_timesteps, the float metric columns (`METRICS`; NaN where null or the run is
    unstable), then whatever else the files hold. Raises TablesError naming the file for a
    missing or corrupt file, and the command that makes it.
    """
    metrics_dir = Path(metrics_dir)
    if experiments is None:
        if not metrics_dir.is_dir():
            raise TablesError(f"{metrics_dir}: folder not found; the evaluate stages write "
                              "<metrics>/<experiment>.json (run `dvc repro`)")
        experiments = sorted(p.stem for p in metrics_dir.glob("*.json")
                             if p.name != REFERENCE_FILE and not p.name.startswith("."))
    experiments = list(experiments)
    if not experiments:
        raise TablesError(f"{metrics_dir}: no experiments to tabulate; define them under "
                          "'experiments' in params.yaml and run `dvc repro`")
    missing = [e for e in experiments if not metrics_path(metrics_dir, e).is_file()]
    if missing:
        first = missing[0]
        more = (f" ({len(missing) - 1} more missing: {', '.join(missing[1:])})"
                if len(missing) > 1 else "")
        raise TablesError(f"{metrics_path(metrics_dir, first)}: metrics for experiment "
                          f"'{first}' not found; {_make_hint(first)}{more}")
    records = [_read_metrics(metrics_path(metrics_dir, e), e) for e in experiments]
    df = pd.DataFrame.from_records(records)
    for key in DESCRIPTORS:
        if key not in df.columns:
            df[key] = None
    for key in METRICS:
        df[key] = df[key].astype("float64")
    rest = [c for c in df.columns if c not in DESCRIPTORS and c not in METRICS]
    return df[[*DESCRIPTORS, *METRICS, *rest]].reset_index(drop=True)


def load_reference(metrics_dir: str | Path) -> dict | None:
    """`metrics_dir/reference.json` (real-data and untrained-model scores), or None if absent."""
    path = Path(metrics_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    raw = _read_json(path, "rerun the evaluate stage that writes it (`dvc repro`)")
    if not isinstance(raw, dict):
        raise TablesError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    for key in ("real_data", "untrained"):
        entry = raw.get(key)
        if entry is not None and not isinstance(entry, dict):
            raise TablesError(f"{path}: '{key}' must be an object of metrics, got {entry!r}")
        for name, value in (entry or {}).items():
            if name in METRICS:
                _number(value, path, f"{key}.{name}")
    return raw


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


def _objective_key(row: Mapping[str, Any]) -> str:
    """learned | fixed | simple | hybrid: the paper's objective of one experiment."""
    if row["loss"] == "vlb":
        return "learned" if str(row["var_type"]).startswith("learned") else "fixed"
    return str(row["loss"])


def _objective(row: Mapping[str, Any], notation: Notation, table: int) -> str:
    key = _objective_key(row)
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
        return group, OBJECTIVE_ORDER.index(_objective_key(row)), order[row["experiment"]]

    return sorted(rows, key=key)


def table1_labels(rows: list[dict], notation: Notation = TEXT) -> list[str]:
    """'Ours (<objective>) [notes]' per row; the mean parameterization ("ε prediction") is
    named only where rows of different parameterizations would otherwise read the same, and
    the experiment name is added where rows still collide."""
    def plain(row, notes):
        return _with_notes(f"Ours ({_objective(row, notation, table=1)})", notes)

    plains = [plain(row, _qualifiers(row, notation)) for row in rows]

    def make(row, notes):
        objective = _objective(row, notation, table=1)
        base = plain(row, _qualifiers(row, notation))
        if len({r["mean_type"] for r, p in zip(rows, plains) if p == base}) > 1:
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


def format_value(value: Any, digits: int = 2) -> str:
    return f"{float(value):.{digits}f}" if _finite(value) else ""


def format_nll(test: Any, train: Any, notation: Notation = TEXT) -> str:
    """"≤ 3.75 (3.72)": the test-set bound, the train-set bound in parentheses."""
    parts = []
    if _finite(test):
        parts.append(f"{notation.leq}{float(test):.2f}")
    if _finite(train):
        parts.append(f"({float(train):.2f})")
    return " ".join(parts)


def _unstable(row: Mapping[str, Any]) -> bool:
    return row.get("status") == "unstable"


# --------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------

TABLE1_METRICS = ("is_mean", "is_std", "fid", "nll_bpd", "nll_bpd_train")


def _table1_frame(df: pd.DataFrame, reference: Mapping | None, dataset: str,
                  notation: Notation) -> pd.DataFrame:
    rows = _sorted_rows(df)
    records = []
    for label, row in zip(table1_labels(rows, notation), rows):
        records.append({"model": label, "source": "ours", "experiment": row["experiment"],
                        "status": row["status"], **{k: row[k] for k in TABLE1_METRICS}})
    for key, label in (("real_data", "Real data (test split)"), ("untrained", "Untrained model")):
        entry = (reference or {}).get(key)
        if entry is not None:
            records.append({"model": label, "source": "reference", "experiment": None,
                            "status": "ok", **{k: entry.get(k) for k in TABLE1_METRICS}})
    if dataset == "cifar10":
        for objective, is_mean, is_std, fid, nll, nll_train in PAPER_TABLE1:
            paper_row = {"mean_type": "eps", "loss": "vlb" if objective == "fixed" else "simple",
                         "var_type": "fixed_large"}
            label = f"Paper: Ours ({_objective(paper_row, notation, table=1)})"
            records.append({"model": label, "source": "paper", "experiment": None,
                            "status": "ok", "is_mean": is_mean, "is_std": is_std, "fid": fid,
                            "nll_bpd": nll, "nll_bpd_train": nll_train})
    out = pd.DataFrame.from_records(records, columns=["model", "source", "experiment", "status",
                                                      *TABLE1_METRICS])
    for key in TABLE1_METRICS:
        out[key] = pd.to_numeric(out[key], errors="coerce").astype("float64")
    return out


def table1_raw(df: pd.DataFrame, reference: Mapping | None, dataset: str) -> pd.DataFrame:
    """Table 1 as numbers: model, source (ours | reference | paper), experiment, status,
    is_mean, is_std, fid, nll_bpd, nll_bpd_train."""
    return _table1_frame(df, reference, dataset, TEXT)


def table1(df: pd.DataFrame, reference: Mapping | None, dataset: str, *,
           notation: Notation = TEXT) -> pd.DataFrame:
    """Table 1 formatted like the paper: Model | IS | FID | NLL Test (Train).

    Our experiments in the paper's order; then, when given, "Real data (test split)" and
    "Untrained model" from reference.json; for cifar10 the paper's two rows ("Paper: ...").
    """
    raw = _table1_frame(df, reference, dataset, notation)
    cells = []
    for row in raw.to_dict("records"):
        if _unstable(row):
            cells.append([row["model"], *[notation.dash] * 3])
            continue
        cells.append([row["model"],
                      format_mean_std(row["is_mean"], row["is_std"], 2, notation),
                      format_value(row["fid"]),
                      format_nll(row["nll_bpd"], row["nll_bpd_train"], notation)])
    return pd.DataFrame(cells, columns=["Model", "IS", "FID", "NLL Test (Train)"])


# --------------------------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------------------------

TABLE2_METRICS = ("is_mean", "is_std", "fid", "nll_bpd", "nll_bpd_train", "kid_mean", "kid_std")


def _paper_table2(row: Mapping[str, Any]) -> tuple[str, tuple | None] | None:
    """("ok", (is_mean, is_std, fid)) or ("unstable", None) for a row the paper has, else None."""
    if row["schedule"] != "linear" or row["weighting"] != "uniform":
        return None
    if row["var_type"] == "learned_range" or row["loss"] == "hybrid":
        return None
    key = (row["mean_type"], _objective_key(row))
    if key not in PAPER_TABLE2:
        return None
    values = PAPER_TABLE2[key]
    return ("unstable", None) if values is None else ("ok", values)


def _table2_frame(df: pd.DataFrame, dataset: str, notation: Notation) -> pd.DataFrame:
    rows = _sorted_rows(df)
    records = []
    for label, row in zip(table2_labels(rows, notation), rows):
        record = {"group": notation.groups.get(row["mean_type"], str(row["mean_type"])),
                  "objective": label,
                  **{k: row[k] for k in ("experiment", "mean_type", "var_type", "loss",
                                         "weighting", "schedule", "status")},
                  **{k: row[k] for k in TABLE2_METRICS}}
        if dataset == "cifar10":
            paper = _paper_table2(row)
            status, values = paper if paper else (None, None)
            is_mean, is_std, fid = values if values else (math.nan, math.nan, math.nan)
            record.update({"paper_status": status, "is_mean_paper": is_mean,
                           "is_std_paper": is_std, "fid_paper": fid})
        records.append(record)
    out = pd.DataFrame.from_records(records)
    for key in (*TABLE2_METRICS, "is_mean_paper", "is_std_paper", "fid_paper"):
        if key in out.columns:
            out[key] = out[key].astype("float64")
    return out


def table2_raw(df: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Table 2 as numbers: group, objective, the experiment's settings, status, the metrics;
    for cifar10 also paper_status (ok | unstable | empty), is_mean_paper, is_std_paper,
    fid_paper."""
    return _table2_frame(df, dataset, TEXT)


def run_descriptions(table2_raw_frame: pd.DataFrame) -> dict[str, str]:
    """{experiment: markdown} naming each experiment's row of Table 2 and its numbers, for the
    description of its MLflow run (what `mlflow ui` shows on the run's page)."""
    out = {}
    for row in table2_raw_frame.to_dict("records"):
        settings = ", ".join(f"{k} {row[k]}" for k in ("mean_type", "var_type", "loss",
                                                      "weighting", "schedule"))
        text = (f"Table 2 row: {row['group']}, {row['objective']}.\n\n"
                f"Experiment `{row['experiment']}` ({settings}).")
        if _unstable(row):
            text += " Training diverged (unstable), shown as \"–\" in the tables."
        elif _finite(row.get("fid")):
            text += (f" FID {format_value(row['fid'])}, IS {format_value(row['is_mean'])}, "
                     f"NLL {format_nll(row['nll_bpd'], row['nll_bpd_train'])} bits/dim.")
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
            ours = [format_mean_std(row["is_mean"], row["is_std"], 2, notation),
                    format_value(row["fid"]),
                    format_nll(row["nll_bpd"], row["nll_bpd_train"], notation),
                    format_mean_std(row["kid_mean"], row["kid_std"], 4, notation)]
        theirs = []
        if paper:
            if row["paper_status"] == "unstable":
                theirs = [notation.dash, notation.dash]
            else:
                theirs = [format_mean_std(row["is_mean_paper"], row["is_std_paper"], 2, notation),
                          format_value(row["fid_paper"])]
        cells.append([row["objective"], *ours, *theirs])
    return pd.DataFrame(cells, columns=columns)


# --------------------------------------------------------------------------------------------
# Sweep: schedule x weighting
# --------------------------------------------------------------------------------------------

_FAILED = ("unstable", "error", "errored", "failed")
_STOPPED = ("stopped",)  # stopped early by the scheduler (ASHA): an NLL so far, no FID


def _ordered(values: Iterable[str], known: tuple[str, ...]) -> list[str]:
    values = set(values)
    return [v for v in known if v in values] + sorted(v for v in values if v not in known)


def sweep_raw(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (schedule, weighting) cell: trials, ok_trials, fid and nll_bpd (the mean
    over the cell's usable trials), status ("ok"; "stopped" when every usable trial was stopped
    early, with the NLL they reached and no FID; "unstable" when no trial is usable)."""
    trials = trials.copy()
    trials["schedule"] = trials["schedule"].astype(str)
    trials["weighting"] = trials["weighting"].astype(str)
    status = (trials["status"].astype(str).str.lower() if "status" in trials.columns
              else pd.Series("ok", index=trials.index))
    trials["_ok"] = ~status.isin(_FAILED + _STOPPED)
    trials["_stopped"] = status.isin(_STOPPED)
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
                "status": "ok" if len(ok) else "stopped" if len(usable) else "unstable",
            })
    out = pd.DataFrame.from_records(records, columns=["schedule", "weighting", "trials",
                                                      "ok_trials", "fid", "nll_bpd", "status"])
    for key in ("fid", "nll_bpd"):
        out[key] = out[key].astype("float64")
    return out


SWEEP_CORNER = "Schedule (cells: FID / NLL)"


def sweep_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Pivot schedule (rows) x weighting (columns); each cell "FID / NLL" ("3.17 / 3.75"),
    "stopped / NLL" where the scheduler stopped every trial of the cell early (the NLL then is
    the last estimate before the stop), "–" where every trial of the cell was unstable, empty
    where the sweep has no such cell."""
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
            elif cell["status"] == "stopped":
                row.append(f"stopped / {format_value(cell['nll_bpd']) or 'n/a'}")
            elif cell["status"] != "ok":
                row.append(TEXT.dash)
            else:
                row.append(f"{format_value(cell['fid']) or 'n/a'} / "
                           f"{format_value(cell['nll_bpd']) or 'n/a'}")
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


def check_dataset(df: pd.DataFrame, dataset: str) -> None:
    """Every metrics file must come from the dataset the tables are for (no stale results)."""
    for row in df.to_dict("records"):
        found = row.get("dataset")
        if isinstance(found, str) and found and found != dataset:
            raise TablesError(f"metrics of experiment '{row['experiment']}' are for dataset "
                              f"'{found}', but params.yaml names '{dataset}'; "
                              f"re{_make_hint(row['experiment'])}")


def build_tables(metrics: pd.DataFrame, dataset: str, reference: Mapping | None = None,
                 trials: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every table in every form: table1 / table2 / sweep (formatted text), *_tex (formatted
    LaTeX), *_raw (numbers); the sweep entries are None without trials; plus dataset."""
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
    captions = {
        "table1": f"{tex_escape(name)} results. NLL measured in bits/dim.",
        "table2": f"Unconditional {tex_escape(name)} reverse process parameterization and "
                  "training objective ablation. NLL measured in bits/dim; -- : unstable to "
                  "train.",
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
