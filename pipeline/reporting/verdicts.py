"""Verdicts that hold across seeds: each calibration seed's findings as a single-seed study would
reach them, and the rule that a calibrated claim keeps its verdict only where they all agree.

Above both `calibration` (the training noise a single-seed row's interval is widened by) and
`findings` (the verdicts), which is why it is a module of its own."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import pandas as pd

from pipeline.artifacts.records import load_nll_per_image, nll_path
from pipeline.reporting.calibration import Calibration, apply_calibration
from pipeline.reporting.findings import CALIBRATED_LABEL, INCONCLUSIVE, NOT_MEASURED, findings
from pipeline.reporting.results import aggregate, load_runs

if TYPE_CHECKING:
    from pipeline.core.params import Params


def seed_verdicts(params: Params, metrics_dir: str | Path, calibration: Calibration
                  ) -> dict[str, dict[str, str]]:
    """{claim: {seed: verdict}}: the findings of each calibration seed's single-seed study,
    its intervals widened by the calibration (the verdicts a single-seed run can reach)."""
    out: dict[str, dict[str, str]] = {}
    for seed in calibration.seeds:
        table = aggregate(load_runs(metrics_dir, [(name, seed) for name in params.experiments]))
        table = apply_calibration(table, params, calibration)
        per_image = {key: load_nll_per_image(nll_path(metrics_dir, key), key)
                     for key in table["key"]}
        for row in findings(table, per_image).to_dict("records"):
            if row["verdict"] != NOT_MEASURED:
                out.setdefault(row["claim"], {})[str(seed)] = row["verdict"]
    return out


def hold_verdicts(found: pd.DataFrame, calibration: Optional[Calibration]) -> pd.DataFrame:
    """A calibrated claim keeps its verdict only where every calibration seed reached the same
    one: a verdict that depends on the seed (or, when this run's differs, on the CPU or the
    seed) is inconclusive, in every run, and `ours` says how the seeds split."""
    if calibration is None or not calibration.verdicts:
        return found
    found = found.copy()
    for i, row in found.iterrows():
        by_seed = calibration.verdicts.get(row["claim"])
        if not by_seed or not str(row["noise"]).startswith(CALIBRATED_LABEL):
            continue   # several seeds, or one without a calibration of its recipe
        if set(by_seed.values()) | {row["verdict"]} == {row["verdict"]}:
            continue
        split = ", ".join(f"{v} with seed{'s' if n > 1 else ''} "
                          f"{', '.join(str(s) for s in seeds)}"
                          for v, seeds in _group(by_seed).items() for n in [len(seeds)])
        found.at[i, "ours"] = (f"{row['ours']}; this run: {row['verdict']}, the calibration's "
                               f"seeds: {split}")
        found.at[i, "verdict"] = INCONCLUSIVE
    return found


def _group(by_seed: Mapping[int, str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for seed, verdict in sorted(by_seed.items()):
        groups.setdefault(verdict, []).append(seed)
    return groups
