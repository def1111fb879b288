"""How the reports write: the paper's symbols spelled for text and for LaTeX (`Notation`:
`TEXT` for markdown and csv, `TEX` for LaTeX), a score's cell, and a frame written as markdown,
LaTeX or csv.

Cells: a score and its 95 % interval, "29.97 [27.10, 32.84]"; with several seeds, the mean and
the standard deviation over seeds, "29.97 ± 1.20"; an NLL "≤ 4.71 [4.66, 4.76] (4.70)", the
test-set bound with the train-set bound in parentheses; an unmeasured score is an empty cell.
Used by the paper's tables (`pipeline.reporting.tables`), the findings, the sweep's table and
the seed calibration's report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from pipeline.core.io import atomic_path, write_text
from pipeline.core.status import Status

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
# Cell formatting
# --------------------------------------------------------------------------------------------


def finite(value: Any) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def format_mean_std(mean: Any, std: Any, digits: int, notation: Notation = TEXT) -> str:
    """"9.46 ± 0.11"; the mean alone without a std; "" when not measured."""
    if not finite(mean):
        return ""
    text = f"{float(mean):.{digits}f}"
    return f"{text}{notation.pm}{float(std):.{digits}f}" if finite(std) else text


def format_interval(value: Any, low: Any, high: Any, digits: int) -> str:
    """"29.97 [27.10, 32.84]"; the value alone without an interval; "" when not measured."""
    if not finite(value):
        return ""
    text = f"{float(value):.{digits}f}"
    if finite(low) and finite(high):
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
    if not finite(value) or float(value) == 0:
        return 2
    return max(2, figures - 1 - math.floor(math.log10(abs(float(value)))))


def format_value(value: Any, digits: int = 2) -> str:
    return f"{float(value):.{digits}f}" if finite(value) else ""


def format_nll(test: str, train: Any, notation: Notation = TEXT) -> str:
    """"≤ 3.75 (3.72)": the test-set bound (already formatted), the train-set bound."""
    parts = []
    if test:
        parts.append(f"{notation.leq}{test}")
    if finite(train):
        parts.append(f"({float(train):.2f})")
    return " ".join(parts)


def unstable(row: Mapping[str, Any]) -> bool:
    return row.get("status") == Status.UNSTABLE


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


def write_file(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically; return its path."""
    path = Path(path)
    write_text(path, text)
    return path
