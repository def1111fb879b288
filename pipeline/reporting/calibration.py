"""The seed calibration: each row's spread between training seeds, measured once and kept as
data (calibration/seeds.json), so that a single-seed study's intervals cover training noise.

A single-seed run's standard errors cover its samples only (`pipeline.measure.stats`); another
seed, or another CPU, trains another model. `python -m stages.calibrate` reads the metrics of a
study run with several seeds (at least 4 recommended) and writes, per experiment, its recipe
(the params that decide its scores: `recipe`) and each seed's scores with their standard
errors. `tabulate` then widens every single-seed row whose recipe matches by the training
variance of its scores (`pipeline.measure.seed_noise`); a row without a match keeps the
sampling noise alone and says so: its verdicts read "one seed: sampling noise only".

The file holds the raw values, not the spreads: the spreads are computed from them each time
(`Calibration.spread`), for the scores of metrics/<key>.json and for the test - train gap of
the bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.core.coerce import plain
from pipeline.core.errors import UserError
from pipeline.core.io import sha256_hex, write_text
from pipeline.core.scores import ROW_SCORES, SCORES
from pipeline.core.status import Status
from pipeline.measure.seed_noise import (SeedSpread, add_variance, leave_one_out, predicts,
                                         seed_spread)
from pipeline.measure.stats import Estimate
from pipeline.reporting.formats import to_markdown
from pipeline.reporting.results import run_estimates

if TYPE_CHECKING:
    from pipeline.core.config import ExperimentConfig
    from pipeline.core.params import Params

FORMAT = 1
MIN_SEEDS = 2           # a spread needs two runs; `stages.calibrate` advises 4 or more
# Keys that say where or how often work runs, not what is computed: a calibration made with one
# value holds for another (the samples and scores do not depend on them, or only as another
# CPU's rounding does). Every other key of these sections is part of a row's recipe.
RECIPE_SECTIONS = ("data", "diffusion", "model", "train", "sample", "evaluate")
NOT_RECIPE = {
    "data": ("cifar10_archive", "folder", "download"),
    "train": ("log_every", "checkpoint_every", "num_workers", "use_gpu", "cpus_per_worker",
              "max_failures", "compile"),
    "sample": ("batch_size", "grid_size", "compile", "num_workers", "cpus_per_worker",
               "use_gpu"),
    "evaluate": ("nll_batch_size", "reference_draws", "checkpoints", "checkpoint_num_samples",
                 "num_workers", "cpus_per_worker", "use_gpu"),
}

# How a row's (and a finding's) intervals were made.
NOISE_SEEDS = "seeds"             # several seeds: the spread between them
NOISE_CALIBRATED = "calibrated"   # one seed, widened by the calibration's spread
NOISE_SAMPLING = "sampling"       # one seed, no calibration for its recipe: samples only


HINT = "remake it with `python -m stages.calibrate` or restore it with `git checkout`"


class CalibrationError(UserError, ValueError):
    """A calibration file that cannot be used, or a calibration that cannot be made."""


def recipe(experiment: ExperimentConfig) -> dict[str, Any]:
    """What decides an experiment's scores, but for its seed: the resolved RECIPE_SECTIONS
    without NOT_RECIPE."""
    out = {}
    for name in RECIPE_SECTIONS:
        section = plain(asdict(getattr(experiment, name)))
        out[name] = {k: v for k, v in section.items() if k not in NOT_RECIPE.get(name, ())}
    return out


def recipe_digest(recipe_: Mapping[str, Any]) -> str:
    return sha256_hex(json.dumps(recipe_, sort_keys=True), length=12)


@dataclass(frozen=True)
class Calibration:
    """A loaded calibration: where it came from, and per experiment its recipe digest and the
    seeds' estimates ({experiment: {score: [Estimate per seed]}})."""

    path: Path
    seeds: tuple[int, ...]
    machine: str
    digests: Mapping[str, str]
    estimates: Mapping[str, Mapping[str, Sequence[Estimate]]]
    # {claim: {seed: verdict}}: each calibration seed's single-seed study judged with the
    # calibration (`verdicts.seed_verdicts`); `verdicts.hold_verdicts` keeps a verdict only where
    # they agree
    verdicts: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    def matches(self, experiment: ExperimentConfig) -> bool:
        return self.digests.get(experiment.name) == recipe_digest(recipe(experiment))

    def spread(self, name: str, score: str) -> Optional[SeedSpread]:
        runs = self.estimates.get(name, {}).get(score)
        if not runs:
            return None
        return seed_spread([e.value for e in runs], [e.se for e in runs])


# --------------------------------------------------------------------------------------------
# Making and reading the file
# --------------------------------------------------------------------------------------------


def build_calibration(params: Params, runs: pd.DataFrame, seeds: Sequence[int],
                      machine: str) -> dict[str, Any]:
    """The calibration file's content from `results.load_runs` rows of every experiment of
    `params` with each of `seeds`."""
    seeds = sorted({int(s) for s in seeds})
    if len(seeds) < MIN_SEEDS:
        raise CalibrationError(f"a calibration needs at least {MIN_SEEDS} seeds, got "
                               f"{seeds}; list 4 or more in study.seeds (or --seeds)")
    experiments = {}
    for name, experiment in params.experiments.items():
        rows = runs[runs["experiment"] == name]
        found = sorted(int(s) for s in rows["seed"])
        if found != seeds:
            raise CalibrationError(f"experiment '{name}': metrics for seeds {found}, expected "
                                   f"{seeds}; run `dvc repro` with study.seeds: {seeds}")
        per_seed = {}
        for row in rows.to_dict("records"):
            if row["status"] == Status.UNSTABLE:
                per_seed[str(row["seed"])] = None
                continue
            per_seed[str(row["seed"])] = {
                score: {"value": e.value, "se": e.se}
                for score, e in run_estimates(row).items()}
        made = recipe(experiment)
        experiments[name] = {"recipe_digest": recipe_digest(made), "recipe": made,
                             "runs": per_seed}
    return {"format": FORMAT, "machine": machine, "seeds": seeds, "experiments": experiments}


def write_calibration(path: str | Path, content: Mapping[str, Any]) -> Path:
    path = Path(path)
    write_text(path, json.dumps(content, indent=1, sort_keys=False) + "\n")
    return path


def load_calibration(path: str | Path) -> Optional[Calibration]:
    """The calibration in `path`, None where there is no such file; CalibrationError naming
    what is wrong with a file that is there."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: not valid JSON ({exc}); {HINT}") from None
    return parse_calibration(raw, path)


def parse_calibration(raw: Any, path: str | Path) -> Calibration:
    """A `Calibration` from the file's content (`build_calibration`'s); CalibrationError naming
    what is wrong with it."""
    path = Path(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CalibrationError(f"{path}: not a seed calibration of format {FORMAT} "
                               f"(found {found!r}); {HINT}")
    try:
        seeds = tuple(int(s) for s in raw["seeds"])
        digests, estimates = {}, {}
        for name, entry in raw["experiments"].items():
            digests[name] = str(entry["recipe_digest"])
            scores: dict[str, list[Estimate]] = {}
            for measured in entry["runs"].values():
                if measured is None:   # diverged: no spread from this seed
                    continue
                for score, e in measured.items():
                    value, se = e["value"], e["se"]
                    scores.setdefault(score, []).append(Estimate(
                        math.nan if value is None else float(value),
                        math.nan if se is None else float(se)))
            estimates[name] = {s: v for s, v in scores.items() if len(v) >= MIN_SEEDS}
        verdicts = {str(claim): {int(seed): str(v) for seed, v in by_seed.items()}
                    for claim, by_seed in (raw.get("verdicts") or {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CalibrationError(f"{path}: malformed calibration ({type(exc).__name__}: {exc}); "
                               f"{HINT}") from None
    return Calibration(path, seeds, str(raw.get("machine", "")), digests, estimates, verdicts)


# --------------------------------------------------------------------------------------------
# Using it: a study's rows with training noise in their intervals
# --------------------------------------------------------------------------------------------


def apply_calibration(metrics: pd.DataFrame, params: Params,
                      calibration: Optional[Calibration]) -> pd.DataFrame:
    """`results.aggregate`'s rows with a `noise` column (NOISE_SEEDS, NOISE_CALIBRATED or
    NOISE_SAMPLING) and, for each single-seed row whose recipe the calibration holds, every
    score's interval widened by its training variance: `<score>_se` and `_df` are replaced
    (the sampling part kept as `<score>_se_sampling`), `_low` and `_high` recomputed, and
    `<score>_seed_var`, `_seed_between` and `_seed_df` hold the training variance, the seeds'
    variance it comes from and its degrees of freedom (used where two rows are paired image by
    image, `findings`)."""
    records = []
    for row in metrics.to_dict("records"):
        row = dict(row)
        if row["seeds"] > 1:
            row["noise"] = NOISE_SEEDS
        elif calibration is None or row["experiment"] not in params.experiments or \
                not calibration.matches(params.experiments[row["experiment"]]):
            row["noise"] = NOISE_SAMPLING
        else:
            row["noise"] = NOISE_CALIBRATED
            row["noise_seeds"] = len(calibration.seeds)
            for score in ROW_SCORES:
                spread = calibration.spread(row["experiment"], score)
                if spread is None or not math.isfinite(spread.variance):
                    continue
                own = Estimate(row[score], row[f"{score}_se"], row[f"{score}_df"])
                wide = add_variance(own, [spread])
                low, high = wide.interval() if math.isfinite(row[score]) else (math.nan,) * 2
                row.update({f"{score}_se_sampling": own.se, f"{score}_se": wide.se,
                            f"{score}_df": wide.df, f"{score}_low": low, f"{score}_high": high,
                            f"{score}_seed_var": spread.variance,
                            f"{score}_seed_df": spread.df,
                            f"{score}_seed_between": spread.between})
        records.append(row)
    return pd.DataFrame.from_records(records)


def row_spread(row: Mapping[str, Any], score: str) -> Optional[SeedSpread]:
    """The training variance `apply_calibration` put on a row for `score`, or None."""
    variance = row.get(f"{score}_seed_var")
    if variance is None or (isinstance(variance, float) and math.isnan(variance)):
        return None
    df = float(row[f"{score}_seed_df"])
    return SeedSpread(float(variance), df, int(df) + 1, float(row[f"{score}_seed_between"]))


# --------------------------------------------------------------------------------------------
# What a calibration measured, and whether its intervals hold
# --------------------------------------------------------------------------------------------

SHOWN_SCORES = tuple(s.name for s in SCORES if s.calibrated)


def spread_frame(calibration: Calibration) -> pd.DataFrame:
    """Per experiment and score: the seeds' mean, their sd, the rms of the runs' own (sampling)
    standard errors, and the training sd tau it leaves (`seed_spread`)."""
    rows = []
    for name, scores in calibration.estimates.items():
        for score in SHOWN_SCORES:
            runs = scores.get(score)
            if not runs:
                continue
            spread = calibration.spread(name, score)
            values = np.array([e.value for e in runs])
            rows.append({"experiment": name, "score": score, "seeds": len(runs),
                         "mean": float(values.mean()), "sd_between_seeds":
                         float(values.std(ddof=1)), "sampling_se":
                         float(np.sqrt(np.mean([e.se ** 2 for e in runs]))),
                         "training_sd": spread.sd if spread else math.nan})
    return pd.DataFrame(rows)


def coverage_frame(calibration: Calibration) -> pd.DataFrame:
    """Per score (and all together): of the seeds left out one at a time, how many lie in the
    95 % prediction interval of the other seeds (`seed_noise.leave_one_out`), with the training
    variance and with sampling noise alone."""
    rows, totals = [], [0, 0, 0]
    for score in SHOWN_SCORES:
        with_training, sampling, checked = 0, 0, 0
        for scores in calibration.estimates.values():
            runs = scores.get(score)
            if not runs or len(runs) < 3:   # a prediction from the others needs 2 of them
                continue
            hit, n = leave_one_out(runs, training=True)
            miss, _ = leave_one_out(runs, training=False)
            with_training, sampling, checked = with_training + hit, sampling + miss, checked + n
        rows.append({"score": score, "checked": checked, "covered_with_training": with_training,
                     "covered_sampling_only": sampling})
        totals = [totals[0] + checked, totals[1] + with_training, totals[2] + sampling]
    rows.append({"score": "all", "checked": totals[0], "covered_with_training": totals[1],
                 "covered_sampling_only": totals[2]})
    frame = pd.DataFrame(rows)
    for kind in ("with_training", "sampling_only"):
        frame[f"rate_{kind}"] = frame[f"covered_{kind}"] / frame["checked"].where(
            frame["checked"] > 0)
    return frame


def check_runs(calibration: Calibration, runs: pd.DataFrame) -> pd.DataFrame:
    """Runs made elsewhere (another CPU, another seed) of the calibrated recipes: per run and
    score, whether its value lies in the 95 % prediction interval of all the calibration's
    seeds (`seed_noise.predicts`), with the training variance and with sampling noise alone."""
    rows = []
    for run in runs.to_dict("records"):
        if run["status"] == Status.UNSTABLE:
            continue
        scores = calibration.estimates.get(run["experiment"], {})
        for score, new in run_estimates(run).items():
            others = scores.get(score)
            if score not in SHOWN_SCORES or not others:
                continue
            rows.append({"experiment": run["experiment"], "seed": run["seed"], "score": score,
                         "value": new.value, "calibration_mean":
                         float(sum(e.value for e in others) / len(others)),
                         "covered_with_training": predicts(others, new, training=True),
                         "covered_sampling_only": predicts(others, new, training=False)})
    return pd.DataFrame(rows)


def report_markdown(calibration: Calibration) -> str:
    """calibration/seeds.md: what the file holds, the spreads and the coverage."""
    spreads = spread_frame(calibration).round(4)
    coverage = coverage_frame(calibration)
    for kind in ("with_training", "sampling_only"):
        coverage[f"rate_{kind}"] = coverage[f"rate_{kind}"].map(
            lambda v: "" if pd.isna(v) else f"{v:.0%}")
    verdicts = ""
    if calibration.verdicts:
        frame = pd.DataFrame({f"seed {seed}": {claim: by_seed.get(seed, "")
                                               for claim, by_seed in calibration.verdicts.items()}
                              for seed in calibration.seeds})
        frame.insert(0, "claim", frame.index)
        verdicts = ("\n## Each seed's verdicts\n\nEach seed's single-seed study, judged with "
                    "the calibration's intervals. `tabulate` keeps a calibrated verdict only "
                    "where all seeds agree (and the run agrees with them); elsewhere the claim "
                    "is inconclusive in every run.\n\n"
                    f"{to_markdown(frame.reset_index(drop=True))}\n")
    return (f"# Seed calibration\n\n{len(calibration.seeds)} training seeds "
            f"({', '.join(map(str, calibration.seeds))}) of every experiment, measured on: "
            f"{calibration.machine or 'not recorded'}. Written by `python -m stages.calibrate` "
            f"from {calibration.path.name}; read by `tabulate`.\n\n"
            "## Spread between seeds\n\nsd_between_seeds: the sd of the seeds' values; "
            "sampling_se: the rms of the runs' own standard errors (their samples); "
            "training_sd: sqrt(max(0, sd^2 - sampling_se^2)), what a single-seed interval adds."
            f"\n\n{to_markdown(spreads)}\n\n"
            "## Coverage, each seed left out\n\nOf the seeds left out one at a time, how many "
            "lie in the 95 % prediction interval of the others: with the training variance "
            "(what `tabulate` uses) and with the sampling noise alone (a single run's own "
            f"intervals).\n\n{to_markdown(coverage)}\n{verdicts}")
