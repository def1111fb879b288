"""The sweep's report: a table over its axes (`SweepConfig.axes`: schedule x weighting), from
the trials of the `sweep` stage (results/sweep/trials.csv, read by
`pipeline.artifacts.trials.load_sweep_trials`).

- `sweep_raw`: one row of numbers per cell (a schedule and a weighting), written as
  results/sweep.csv (and drawn as the FID heat map by
  `pipeline.artifacts.figures.save_sweep_heatmap`);
- `sweep_table`: the pivot, each cell "FID / NLL #rank", written as results/sweep.md.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from pipeline.core.config import SweepConfig
from pipeline.core.io import write_text
from pipeline.core.status import Status
from pipeline.core.sweep_axes import axis_names
from pipeline.reporting.formats import TEXT, format_value, to_markdown, write_csv

DEFAULT_SWEEP = SweepConfig()  # its axes (`pipeline.core.sweep_axes.SWEEP_AXES`) and their order


def _ordered(values: Iterable[str], known: tuple[str, ...]) -> list[str]:
    values = set(values)
    return [v for v in known if v in values] + sorted(v for v in values if v not in known)


def _axis_values(frame: pd.DataFrame, sweep: SweepConfig) -> list[list[str]]:
    """Each axis's values in `frame`, in the order its field allows them (others after)."""
    return [_ordered(frame[axis.name], sweep.allowed(axis)) for axis in sweep.axes]


def sweep_raw(trials: pd.DataFrame, sweep: SweepConfig = DEFAULT_SWEEP) -> pd.DataFrame:
    """One row per cell (schedule, weighting: a value of each of `sweep.axes`): trials,
    ok_trials, fid, nll_bpd and nll_bpd_rung
    (the means over the cell's usable trials: FID of the finished ones, the last NLL, the NLL at
    the first rung), status ("ok"; "stopped" when every usable trial was stopped early,
    with the NLL they reached and no FID; "unstable" when no trial is usable), and rank (1 =
    best) by the NLL at the first rung, which every cell that trains has, measured on the same
    images with the same noise draws in every trial."""
    names = axis_names(sweep.axes)
    trials = trials.copy()
    if "nll_bpd_rung" not in trials.columns:  # an older trials.csv: its last NLL
        trials["nll_bpd_rung"] = trials["nll_bpd"]
    for name in names:
        trials[name] = trials[name].astype(str)
    status = (trials["status"].astype(str) if "status" in trials.columns
              else pd.Series(Status.OK.value, index=trials.index))
    trials["_ok"] = status == Status.OK
    trials["_stopped"] = status == Status.STOPPED  # at a rung: an NLL so far, no FID
    records = []
    for values in itertools.product(*_axis_values(trials, sweep)):
        cell = trials[functools.reduce(operator.and_, (trials[name] == value for name, value
                                                        in zip(names, values)))]
        if cell.empty:
            continue
        ok = cell[cell["_ok"]]
        usable = ok if len(ok) else cell[cell["_stopped"]]
        records.append({
            **dict(zip(names, values)),
            "trials": len(cell), "ok_trials": len(ok),
            "fid": pd.to_numeric(ok["fid"], errors="coerce").mean() if len(ok) else math.nan,
            "nll_bpd": (pd.to_numeric(usable["nll_bpd"], errors="coerce").mean()
                        if len(usable) else math.nan),
            "nll_bpd_rung": (pd.to_numeric(usable["nll_bpd_rung"], errors="coerce").mean()
                             if len(usable) else math.nan),
            "status": (Status.OK if len(ok) else Status.STOPPED if len(usable)
                       else Status.UNSTABLE).value,
        })
    out = pd.DataFrame.from_records(records, columns=[*names, "trials", "ok_trials", "fid",
                                                      "nll_bpd", "nll_bpd_rung", "status"])
    for key in ("fid", "nll_bpd", "nll_bpd_rung"):
        out[key] = out[key].astype("float64")
    out["rank"] = out["nll_bpd_rung"].rank(method="min").astype("Int64")
    return out


def sweep_corner(sweep: SweepConfig = DEFAULT_SWEEP) -> str:
    """The sweep table's first header: its rows' axis, and what a cell holds."""
    return f"{sweep.axes[0].name.capitalize()} (cells: FID / NLL at the first rung, #rank by " \
           "that NLL)"


SWEEP_CORNER = sweep_corner()


def sweep_table(trials: pd.DataFrame, sweep: SweepConfig = DEFAULT_SWEEP) -> pd.DataFrame:
    """Pivot: the first axis's values (schedule) are the rows, and the other axes' (weighting)
    the columns, joined with " / " where there are several. Each cell is "FID / NLL #rank"
    ("3.17 / 3.75 #1"), with the NLL at the first rung, which compares every cell;
    "stopped / NLL #rank" where the scheduler stopped every trial of the cell there (no FID);
    "–" where every trial of the cell was unstable; empty where the sweep has no such cell."""
    return sweep_cells(sweep_raw(trials, sweep), sweep)


def sweep_cells(raw: pd.DataFrame, sweep: SweepConfig = DEFAULT_SWEEP) -> pd.DataFrame:
    """`sweep_table` from the cells of `sweep_raw`."""
    names = axis_names(sweep.axes)
    rows_axis, *column_axes = _axis_values(raw, sweep)
    cells = {tuple(r[n] for n in names): r for r in raw.to_dict("records")}
    columns = [c for c in itertools.product(*column_axes)
               if any(key[1:] == c for key in cells)]
    rows = []
    for first in dict.fromkeys(raw[names[0]]):
        row = [first]
        for column in columns:
            cell = cells.get((first, *column))
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
    return pd.DataFrame(rows, columns=[sweep_corner(sweep), *(" / ".join(c) for c in columns)])


def build_sweep(trials: pd.DataFrame | None,
                sweep: SweepConfig = DEFAULT_SWEEP) -> dict[str, Any]:
    """{"sweep": `sweep_table`, "sweep_raw": `sweep_raw`} of the trials, the cells computed
    once; both None without trials."""
    if trials is None:
        return {"sweep": None, "sweep_raw": None}
    raw = sweep_raw(trials, sweep)
    return {"sweep": sweep_cells(raw, sweep), "sweep_raw": raw}


def write_sweep(results_dir: str | Path, sweep: Mapping[str, Any]) -> list[Path]:
    """Write the output of `build_sweep`, each file atomically: <results_dir>/sweep.md and
    sweep.csv; nothing without a sweep. Returns the paths."""
    if sweep.get("sweep") is None:
        return []
    results_dir = Path(results_dir)
    write_text(results_dir / "sweep.md", to_markdown(sweep["sweep"]))
    return [results_dir / "sweep.md", write_csv(results_dir / "sweep.csv", sweep["sweep_raw"])]
