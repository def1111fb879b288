"""results/sweep/: the sweep's trials.csv and best.yaml, written by the sweep stage
(`save_sweep`), trials.csv read back by `tabulate` (`load_sweep_trials`).

trials.csv has a row per trial (`pipeline.training.sweep_trials.trials_table`: schedule, weighting,
status, the rung's and the last NLL, the quick FID, ...); best.yaml names the best trial and its
settings (`pipeline.training.sweep_trials.best_record`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.artifacts.records import ResultsError
from pipeline.core.io import atomic_path, write_text
from pipeline.core.sweep_axes import axis_names

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.yaml"
REQUIRED = (*axis_names(), "fid", "nll_bpd")  # what the sweep's table is made of


def save_sweep(out_dir: str | Path, table: pd.DataFrame, record: dict[str, Any]) -> list[Path]:
    """Write trials.csv (`table`) and best.yaml (`record`) in `out_dir`, each atomically; return
    their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / TRIALS_FILE) as tmp:
        table.to_csv(tmp, index=False)
    write_text(out_dir / BEST_FILE, yaml.safe_dump(record, sort_keys=False))
    return [out_dir / TRIALS_FILE, out_dir / BEST_FILE]


def load_sweep_trials(path: str | Path) -> pd.DataFrame:
    """Read a trials.csv of `save_sweep`: the table needs a column per sweep axis (schedule,
    weighting), fid and nll_bpd (status optional); ResultsError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: sweep trials not found; make them with `dvc repro sweep`")
    try:
        trials = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: not a readable csv ({str(exc).strip()}); "
                           "rerun `dvc repro sweep`") from None
    missing = [c for c in REQUIRED if c not in trials.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}; "
                           f"found: {', '.join(map(str, trials.columns))}")
    return trials
