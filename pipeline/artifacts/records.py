"""A run's result files and the reference scores: each writer beside its reader.

- metrics/<E>-<S>.json (numbers only: the scores that tabulate turns into Table 2 and the
  headline numbers results/metrics.json, DVC's metrics) and metrics/<E>-<S>_run.json (what the
  run was: experiment, status, settings, sample counts, timings): `save_run_metrics` /
  `load_run_metrics`;
- metrics/<E>-<S>_nll.csv, the bound of every test and train image:
  `save_nll_per_image` / `load_nll_per_image`;
- metrics/<E>-<S>_over_training.csv, the scores at each scored training step (one row, the
  final model, without `evaluate.checkpoints`): `save_over_training` / `load_over_training`
  (tabulate puts the runs scored at several steps on one DVC chart);
- metrics/<E>-<S>_sampling_steps.csv, the run's scores with DDIM at each count of steps and
  with ancestral sampling (the `sampling_steps` stage): `save_sampling_steps` /
  `load_sampling_steps`;
- metrics/reference.json (real data, an untrained model, the ceiling of the bound):
  `save_reference` / `load_reference`.

The evaluate and reference stages write them (`pipeline.jobs.evaluate_job` measures); tabulate reads
them (`pipeline.reporting.results`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from pipeline.core.errors import UserError
from pipeline.core.io import atomic_path, write_json
from pipeline.core.scores import MEASURED as SCORES
from pipeline.core.scores import SAMPLES
from pipeline.core.scores import SCORES as SCORES_DECLARED
from pipeline.core.status import Status

# Every measured score of a run (`pipeline.core.scores`), each with its standard error
# `<score>_se` beside it in metrics/<key>.json.
METRICS = tuple(name for score in SCORES for name in (score, f"{score}_se"))
DESCRIPTORS = ("experiment", "seed", "status", "dataset", "mean_type", "var_type", "loss",
               "weighting", "schedule", "num_timesteps")
STATUSES = (Status.OK, Status.UNSTABLE)  # of a run: trained, or diverged
# The numbers of metrics/<key>.json (a run's scores, numbers only); every other field of a
# run's record goes to metrics/<key>_run.json.
DVC_METRICS = (*METRICS, "train_steps", "final_loss", "best_checkpoint_step",
               "best_checkpoint_fid", "best_checkpoint_nll_bpd")
REFERENCE_FILE = "reference.json"


class ResultsError(UserError, ValueError):
    """A missing or unreadable results file: which file, and the command that remakes it."""


def _make_hint(key: str) -> str:
    experiment, _, seed = key.rpartition("-")
    return (f"make it with `dvc repro evaluate@{key}` (or `python -m stages.evaluate "
            f"--experiment {experiment} --seed {seed}`)")


def metrics_path(metrics_dir: str | Path, key: str) -> Path:
    """metrics/<key>.json: the run's DVC_METRICS (numbers only; those not measured left out)."""
    return Path(metrics_dir) / f"{key}.json"


def run_info_path(metrics_dir: str | Path, key: str) -> Path:
    """metrics/<key>_run.json: what the run was (descriptors, sample counts, timings)."""
    return Path(metrics_dir) / f"{key}_run.json"


def nll_path(metrics_dir: str | Path, key: str) -> Path:
    return Path(metrics_dir) / f"{key}_nll.csv"


def over_training_path(metrics_dir: str | Path, key: str) -> Path:
    """The scores over training of run `key`: one row per scored training step."""
    return Path(metrics_dir) / f"{key}_over_training.csv"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def save_run_metrics(metrics_dir: str | Path, key: str,
                     record: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write one run's record: its finite DVC_METRICS to metrics/<key>.json and every other
    field to metrics/<key>_run.json; return both paths."""
    numbers = {name: record[name] for name in DVC_METRICS
               if _is_number(record.get(name)) and math.isfinite(record[name])}
    about = {name: value for name, value in record.items() if name not in DVC_METRICS}
    paths = metrics_path(metrics_dir, key), run_info_path(metrics_dir, key)
    write_json(paths[1], about)
    write_json(paths[0], numbers)
    return paths


def _read_json(path: Path, hint: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                           f"{exc.msg}); {hint}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not valid JSON (not UTF-8 text); {hint}") from None


def _number(value: Any, path: Path, key: str) -> float:
    if value is None:
        return math.nan
    if not _is_number(value):
        raise ResultsError(f"{path}: '{key}' must be a number or null, got {value!r}")
    return float(value)


def _read_object(path: Path, what: str, make: str) -> dict[str, Any]:
    """The JSON object in `path`, or ResultsError naming the file and `make`, the sentence that
    says how to (re)make it ("make it with ...")."""
    if not path.is_file():
        raise ResultsError(f"{path}: {what} not found; {make}")
    raw = _read_json(path, f"re{make}")
    if not isinstance(raw, dict):
        raise ResultsError(f"{path}: expected a JSON object of {what}, got "
                           f"{type(raw).__name__}; re{make}")
    return raw


def load_run_metrics(metrics_dir: str | Path, key: str,
                     allowed: Mapping[str, tuple]) -> dict[str, Any]:
    """One run's record from `save_run_metrics`'s two files, checked: its descriptors take
    values of `allowed` ({key: values}); metrics/<key>.json holds numbers only; METRICS are
    floats (NaN where not measured; all NaN for an unstable run)."""
    numbers_path = metrics_path(metrics_dir, key)
    numbers = _read_object(numbers_path, f"metrics of run '{key}'", _make_hint(key))
    info_path = run_info_path(metrics_dir, key)
    record = _read_object(info_path, f"description of run '{key}'", _make_hint(key))
    for name, value in numbers.items():
        if not _is_number(value):
            raise ResultsError(f"{numbers_path}: '{name}' must be a number, got {value!r}; "
                               f"re{_make_hint(key)}")
    record.update(numbers)
    for name, values in {"status": STATUSES, **allowed}.items():
        if name not in record:
            raise ResultsError(f"{info_path}: missing key '{name}'; re{_make_hint(key)}")
        if record[name] not in values:
            raise ResultsError(f"{info_path}: '{name}' is {record[name]!r}; expected one of: "
                               f"{', '.join(map(str, values))}")
    for name in METRICS:
        record[name] = _number(record.get(name), numbers_path, name)
    if record["status"] == Status.UNSTABLE:  # diverged: no metric is meaningful
        record.update({name: math.nan for name in METRICS})
    return record


def save_nll_per_image(path: str | Path, per_image: Mapping[str, np.ndarray]) -> None:
    """metrics/<key>_nll.csv: split (test | train), image (its index in the split), bpd."""
    frame = pd.concat([pd.DataFrame({"split": split, "image": np.arange(len(values)),
                                     "bpd": np.asarray(values, dtype=np.float64)})
                       for split, values in per_image.items()], ignore_index=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def load_nll_per_image(path: str | Path, key: str) -> dict[str, np.ndarray]:
    """{split: bound of each image, in image order} from `save_nll_per_image`'s file."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: per-image NLL of run '{key}' not found; {_make_hint(key)}")
    try:
        frame = pd.read_csv(path)
        return {split: group.sort_values("image")["bpd"].to_numpy(dtype=np.float64)
                for split, group in frame.groupby("split")}
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError) as exc:
        raise ResultsError(f"{path}: not a per-image NLL table ({type(exc).__name__}: {exc}); "
                           f"re{_make_hint(key)}") from None


def save_over_training(path: str | Path, scores: pd.DataFrame) -> None:
    """`over_training_path`'s file: the table of `pipeline.jobs.over_training` as csv (DVC
    plots it: x step, y fid), written atomically."""
    with atomic_path(path) as tmp:
        scores.to_csv(tmp, index=False)


def load_over_training(path: str | Path, key: str) -> pd.DataFrame:
    """`save_over_training`'s file as a frame (at least `step` and `fid`, as numbers); a file
    that is not one is refused with a ResultsError naming it."""
    return _read_checked_csv(path, "a table of scores over training",
                             {"step": np.int64, "fid": np.float64}, _make_hint(key))


def _read_checked_csv(path: str | Path, what: str, columns: Mapping[str, Any],
                      remake: str) -> pd.DataFrame:
    """The csv at `path` with every one of `columns` as its dtype; a file that is not one is
    refused with a ResultsError naming it, `what` it should be and how to `remake` it."""
    try:
        frame = pd.read_csv(path)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise KeyError(f"no column {', '.join(missing)}")
        return frame.astype(dict(columns))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError,
            UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: not {what} ({type(exc).__name__}: {exc}); "
                           f"re{remake}") from None


def sampling_steps_path(metrics_dir: str | Path, key: str) -> Path:
    """metrics/<key>_sampling_steps.csv: run `key`'s scores with each sampler and number of
    steps (the `sampling_steps` stage)."""
    return Path(metrics_dir) / f"{key}_sampling_steps.csv"


# Its columns: the setting, then each score of the samples with its standard error
SAMPLING_STEPS_COLUMNS = ("sampler", "steps", "eta", "num_samples",
                          *(name for s in SCORES_DECLARED if s.source == SAMPLES
                            for name in (s.name, f"{s.name}_se")))


def save_sampling_steps(path: str | Path, frame: pd.DataFrame) -> None:
    """`sampling_steps_path`'s file: one row per (sampler, steps), SAMPLING_STEPS_COLUMNS."""
    with atomic_path(path) as tmp:
        frame.reindex(columns=list(SAMPLING_STEPS_COLUMNS)).to_csv(tmp, index=False)


def load_sampling_steps(path: str | Path, key: str) -> pd.DataFrame:
    """`save_sampling_steps`' file as a frame, checked: a file that is not one is refused with
    a ResultsError naming it and the command that remakes it."""
    path = Path(path)
    make = (f"make it with `dvc repro sampling_steps@{key}` (or `python -m "
            f"stages.sampling_steps --experiment {key.rpartition('-')[0]} --seed "
            f"{key.rpartition('-')[2]}`)")
    if not path.is_file():
        raise ResultsError(f"{path}: scores against sampling steps of run '{key}' not found; "
                           f"{make}")
    columns = {c: np.float64 for c in SAMPLING_STEPS_COLUMNS if c != "sampler"}
    return _read_checked_csv(path, "a table of scores against sampling steps",
                             {"sampler": object, **columns, "steps": np.int64,
                              "num_samples": np.int64}, make)


def save_reference(path: str | Path, reference: Mapping[str, Mapping[str, Any]]) -> None:
    """metrics/reference.json: {real_data, untrained, ceiling}, each an object of numbers (a
    value that is not a finite number, such as the sd of one draw, is left out)."""
    write_json(path, {section: {name: value for name, value in entry.items()
                                if _is_number(value) and math.isfinite(value)}
                      for section, entry in reference.items()})


def load_reference(metrics_dir: str | Path) -> Optional[dict]:
    """metrics/reference.json, or None if absent."""
    path = Path(metrics_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    raw = _read_object(path, "reference scores", "make them with `dvc repro reference`")
    for key in ("real_data", "untrained", "ceiling"):
        entry = raw.get(key)
        if entry is not None and not isinstance(entry, dict):
            raise ResultsError(f"{path}: '{key}' must be an object of metrics, got {entry!r}")
        for name, value in (entry or {}).items():
            if name in METRICS or name.endswith("_sd"):
                _number(value, path, f"{key}.{name}")
    return raw
