"""The sweep's report: schedule x weighting, from the trials of the `sweep` stage
(results/sweep/trials.csv, read by `pipeline.artifacts.trials.load_sweep_trials`).

- `sweep_raw`: one row of numbers per (schedule, weighting) cell, written as results/sweep.csv
  (and drawn as the FID heat map by `pipeline.artifacts.figures.save_sweep_heatmap`);
- `sweep_table`: the pivot, each cell "FID / NLL #rank", written as results/sweep.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from pipeline.core.config import SCHEDULES, SWEEP_WEIGHTINGS
from pipeline.core.io import write_text
from pipeline.core.status import Status
from pipeline.reporting.formats import TEXT, format_value, to_markdown, write_csv


def _ordered(values: Iterable[str], known: tuple[str, ...]) -> list[str]:
    values = set(values)
    return [v for v in known if v in values] + sorted(v for v in values if v not in known)


def sweep_raw(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (schedule, weighting) cell: trials, ok_trials, fid, nll_bpd and nll_bpd_rung
    (the means over the cell's usable trials: FID of the finished ones, the last NLL, the NLL at
    the first rung), status ("ok"; "stopped" when every usable trial was stopped early,
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
    trials["_stopped"] = status == Status.STOPPED  # at a rung: an NLL so far, no FID
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
    ("3.17 / 3.75 #1"), with the NLL at the first rung, which compares every cell;
    "stopped / NLL #rank" where the scheduler stopped every trial of the cell there (no FID);
    "–" where every trial of the cell was unstable; empty where the sweep has no such cell."""
    return sweep_cells(sweep_raw(trials))


def sweep_cells(raw: pd.DataFrame) -> pd.DataFrame:
    """`sweep_table` from the cells of `sweep_raw`."""
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


def build_sweep(trials: pd.DataFrame | None) -> dict[str, Any]:
    """{"sweep": `sweep_table`, "sweep_raw": `sweep_raw`} of the trials, the cells computed
    once; both None without trials."""
    if trials is None:
        return {"sweep": None, "sweep_raw": None}
    raw = sweep_raw(trials)
    return {"sweep": sweep_cells(raw), "sweep_raw": raw}


def write_sweep(results_dir: str | Path, sweep: Mapping[str, Any]) -> list[Path]:
    """Write the output of `build_sweep`, each file atomically: <results_dir>/sweep.md and
    sweep.csv; nothing without a sweep. Returns the paths."""
    if sweep.get("sweep") is None:
        return []
    results_dir = Path(results_dir)
    write_text(results_dir / "sweep.md", to_markdown(sweep["sweep"]))
    return [results_dir / "sweep.md", write_csv(results_dir / "sweep.csv", sweep["sweep_raw"])]
