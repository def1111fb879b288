"""The table of sample quality against sampling steps: every run that the `sampling_steps` stage
measured (`sampling_steps.experiments`, every seed), read from metrics/<E>-<S>_sampling_steps.csv
(`pipeline.artifacts.records`), one row per run and setting (DDIM at each count, then ancestral
sampling at all T steps), each score of the samples (`pipeline.core.scores`) with its 95 %
interval. Written by tabulate as results/sampling_steps.{md,csv,png}, and plots/sampling_steps.csv
(run, steps, fid: DVC's chart of it).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.artifacts.figures import save_sampling_steps
from pipeline.artifacts.records import load_sampling_steps, sampling_steps_path
from pipeline.core import scores
from pipeline.core.io import write_text
from pipeline.measure.stats import Estimate
from pipeline.reporting.formats import (finite, format_interval, significant_digits, to_markdown,
                                        write_csv)

SHOWN = tuple(s for s in scores.SCORES if s.source == scores.SAMPLES and s.column)
SAMPLER_NAMES = {"ddim": "DDIM", "ancestral": "ancestral"}


def steps_raw(params, metrics_dir: str | Path) -> pd.DataFrame:
    """One row per measured run and setting: run, experiment, seed, sampler, steps, eta,
    num_samples, and each score with `_se`, `_low` and `_high`."""
    frames = []
    for name in params.sampling_steps.experiments:
        for seed in params.study.seeds:
            exp = params.experiment(name, seed)
            frame = load_sampling_steps(sampling_steps_path(metrics_dir, exp.key), exp.key)
            frame.insert(0, "seed", seed)
            frame.insert(0, "experiment", name)
            frame.insert(0, "run", exp.key)
            frames.append(frame)
    columns = ["run", "experiment", "seed", "sampler", "steps", "eta", "num_samples"]
    raw = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    for s in SHOWN:
        bounds = [Estimate(v, se).interval() if finite(v) else (float("nan"),) * 2
                  for v, se in zip(raw.get(s.name, []), raw.get(f"{s.name}_se", []))]
        raw[f"{s.name}_low"] = [low for low, _ in bounds]
        raw[f"{s.name}_high"] = [high for _, high in bounds]
    return raw


def steps_cells(raw: pd.DataFrame) -> pd.DataFrame:
    """The table as text: Run, Sampler, Steps, then each score's value [95 % interval]."""
    cells = []
    for row in raw.to_dict("records"):
        scored = []
        for s in SHOWN:
            digits = s.digits if s.digits is not None else significant_digits(row[s.name])
            scored.append(format_interval(row[s.name], row[f"{s.name}_low"],
                                          row[f"{s.name}_high"], digits))
        cells.append([row["run"], SAMPLER_NAMES.get(row["sampler"], row["sampler"]),
                      str(row["steps"]), *scored])
    return pd.DataFrame(cells, columns=["Run", "Sampler", "Steps", *(s.column for s in SHOWN)])


def write_steps_table(params, metrics_dir: str | Path, results_dir: str | Path,
                      charts_dir: str | Path | None = None) -> list[Path]:
    """results/sampling_steps.md, .csv and .png and, with `charts_dir`, its
    sampling_steps.csv (run: "<E>-<S> <sampler>", steps, fid); returns the paths written."""
    results_dir = Path(results_dir)
    raw = steps_raw(params, metrics_dir)
    intro = ("Sample quality against the number of sampling steps: each run's trained model "
             "and per-image seeds, DDIM (eta "
             f"{params.sampling_steps.eta:g}) at each count and ancestral sampling at all T "
             "steps. [a, b]: 95 % interval (jackknife over the samples).\n\n")
    body = to_markdown(steps_cells(raw)) if len(raw) else \
        "No run measured: sampling_steps.experiments is empty.\n"
    write_text(results_dir / "sampling_steps.md", f"# Sampling steps\n\n{intro}{body}")
    paths = [results_dir / "sampling_steps.md", write_csv(results_dir / "sampling_steps.csv", raw)]
    save_sampling_steps(raw, results_dir / "sampling_steps.png")
    paths.append(results_dir / "sampling_steps.png")
    if charts_dir is not None:
        lines = ["run,steps,fid"] + [f"{r['run']} {r['sampler']},{int(r['steps'])},"
                                     f"{float(r['fid'])!r}"
                                     for r in raw.to_dict("records") if finite(r["fid"])]
        write_text(Path(charts_dir) / "sampling_steps.csv", "\n".join(lines) + "\n")
        paths.append(Path(charts_dir) / "sampling_steps.csv")
    return paths
