"""The sweep over its grid (noise schedule x loss weighting), without Ray: what every trial
measures, and what the sweep's results become (the trials table, the best trial, MLflow runs;
their files are `pipeline.artifacts.trials`).

Ray Tune runs the trials (`pipeline.cluster.ray_tune.run_sweep`). Each trial trains
`sweep.base_experiment` with one schedule and one objective (`SweepConfig.trial_experiment`)
through the same per-worker function as the train stage, `pipeline.training.loop.train_worker`,
whose `on_log` hook calls a `TrialProbe` on rank 0 at every report:

- every `report_every` steps: the stratified estimate of the variational bound (Ho et al. 2020
  Eq. 5) in bits/dim on the first `val_images` held-out test images, with `val_strata`
  timesteps per image and the same seed at every report and in every trial (common random
  numbers, so that the rungs compare trials, not draws): the metric trials stop on;
- at the last step: a quick FID of `fid_num_samples` strided DDIM samples (`fid_steps` steps,
  eta = 0) against the train split, with the study's feature extractor: the samples' features
  against the train split's sums read from the reference statistics file (the
  `reference_stats` stage), checked by `trial_probe` before any trial starts.

MLflow records are written by the driver after `Tuner.fit()` returns, from each trial's reported
metrics: one sweep run and one nested run per trial. Nothing is written to the tracking store
while trials run, so concurrent trials never contend for the (sqlite) store.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import torch

from pipeline.core.config import ExperimentConfig, SweepConfig
from pipeline.core.status import Status
from pipeline.core.sweep_axes import SWEEP_AXES, Cell, SweepAxis, axis_names, cell_of, cell_patch
from pipeline.core.tracking import (TAG_AXIS, TAG_BASE_EXPERIMENT, TAG_ERROR, TAG_ROLE,
                                    TAG_STATUS, TAG_SWEEP, TAG_TRIAL, TAG_TRIAL_ID)
from pipeline.data.datasets import load_prepared, to_uint8
from pipeline.diffusion.samplers import sample
from pipeline.diffusion.seeding import item_generators
from pipeline.measure import extractors
from pipeline.measure.extractors import FeatureNetwork
from pipeline.measure.nll import nll_bpd
from pipeline.measure.reference_stats_file import load_reference_stats, provenance
from pipeline.measure.stats import FeatureMoments, frechet_distance
from pipeline.model.precision import matmul_precision, with_precision

METRIC = "nll_bpd"          # what the rungs minimize
RANK_BY = "fid"             # what picks the best finished trial (nll_bpd where no FID)


# --------------------------------------------------------------------------------------------
# Inside a trial (rank 0 of its training workers)
# --------------------------------------------------------------------------------------------


@dataclass
class TrialProbe:
    """`on_log` hook of `train_worker` for sweep trials: validation NLL, and FID at the end.

    Goes to every trial through Ray's object store, with the prepared splits and the feature
    extractor's weights inside (`trial_probe`), so that a trial on any node of a cluster reads
    nothing from the driver's disk; given paths instead, it loads them on first use.
    """

    test_data: Any  # pipeline.data.datasets.Prepared, or the path of a prepared split
    train_data: Any
    total_steps: int
    val_images: int
    val_strata: int
    fid_num_samples: int
    fid_steps: int
    extractor: str
    extractor_weights: Optional[bytes]  # the weights file's bytes (None: the extractor's own)
    reference: Any = None  # the train split's FeatureMoments (pipeline.measure.reference_stats_file)
    seed: int = 0
    nll_batch_size: int = 800
    precision: str = "fp32"  # of the quick FID's sampling (the base's sample.precision)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, step: int, objects: dict[str, Any]) -> dict[str, float]:
        model, diffusion = objects["ema"], objects["diffusion"]
        was_training = model.training
        model.eval()
        try:
            out = self.validation_nll(model, diffusion)
            if step >= self.total_steps:
                out["fid"] = self.quick_fid(model, diffusion)
        finally:
            model.train(was_training)
        return out

    def _images(self, split: str) -> torch.Tensor:
        if split not in self._cache:
            data = self.test_data if split == "test" else self.train_data
            if isinstance(data, (str, os.PathLike)):
                data = load_prepared(data)
            self._cache[split] = torch.tensor(data[0])  # a copy: Ray hands it over read-only
        return self._cache[split]

    def validation_nll(self, model, diffusion) -> dict[str, float]:
        """Stratified bound in bits/dim on the first `val_images` test images (fixed seed)."""
        device = next(model.parameters()).device
        images = self._images("test")[:self.val_images]
        with torch.no_grad():
            nll = nll_bpd(model, diffusion, images, method="stratified",
                          num_strata=self.val_strata, batch_size=self.nll_batch_size,
                          seed=self.seed + 2, device=device)
        return {"nll_bpd": nll["nll_bpd"], "nll_bpd_se": nll["nll_bpd_se"]}

    def _features(self, device):
        """The feature network (built once) and the train split's feature sums."""
        if self.reference is None:
            raise ValueError("TrialProbe.reference: the train split's reference statistics "
                             "are not set (trial_probe reads them)")
        if "features" not in self._cache:
            self._cache["features"] = FeatureNetwork.from_bytes(
                self.extractor, self.extractor_weights, str(device))
        return self._cache["features"], self.reference

    def quick_fid(self, model, diffusion) -> float:
        """FID of `fid_num_samples` DDIM samples (a seed per image) against the train split,
        the evaluate stage's FID (`pipeline.measure.stats.frechet_distance`)."""
        device = next(model.parameters()).device
        network, reference = self._features(device)
        shape = tuple(self._images("train").shape[1:])
        generators = item_generators("sweep-fid", self.seed + 1, range(self.fid_num_samples),
                                     device)
        with torch.no_grad(), matmul_precision(self.precision):
            x = sample(diffusion, with_precision(model, self.precision),
                       (self.fid_num_samples, *shape), generators, sampler="ddim",
                       device=device, steps=min(self.fid_steps, diffusion.num_timesteps),
                       eta=0.0)
        samples = to_uint8(x.clamp(-1, 1), diffusion.data_levels).cpu()
        return frechet_distance(FeatureMoments.of(network(samples)[0]), reference)


def trial_probe(sweep: SweepConfig, base: ExperimentConfig, train_data: Path, test_data: Path,
                classifier: Path, reference_stats: Path) -> TrialProbe:
    """The probe of every trial, with the study's FID feature extractor resolved and checked
    now (a missing classifier or Inception weights file stops the stage before Ray starts), and
    the train split's reference statistics read from `reference_stats` and checked against
    them (a file made for another extractor, N or data stops it too)."""
    extractor, weights = extractors.resolve_extractor(base.data.dataset, base.evaluate,
                                                   Path(classifier).resolve(),
                                                   base.data.download)
    train = load_prepared(train_data)
    stats = load_reference_stats(reference_stats, provenance(
        base.data.dataset, "train", len(train[0]), extractor, weights, train_data))

    return TrialProbe(
        test_data=load_prepared(test_data), train_data=train, reference=stats.moments,
        total_steps=sweep.steps, val_images=sweep.val_images, val_strata=sweep.val_strata,
        fid_num_samples=sweep.fid_num_samples, fid_steps=sweep.fid_steps, extractor=extractor,
        extractor_weights=Path(weights).read_bytes() if weights and Path(weights).is_file()
        else None,
        seed=base.seed, nll_batch_size=base.evaluate.nll_batch_size,
        precision=base.sample.precision)


# --------------------------------------------------------------------------------------------
# After the sweep (the driver)
# --------------------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    """One trial as Ray Tune left it: its cell (a value per sweep axis), every report, its last
    report, its error."""

    trial_id: str
    cell: Cell
    history: pd.DataFrame  # one row per report (empty if the trial never reported)
    last: dict[str, Any]
    error: Optional[str] = None
    path: Optional[str] = None


def trial_status(trial: TrialOutcome, steps: int) -> str:
    """ok | unstable | stopped (at a rung, before `steps`) | error: a `Status` value."""
    if trial.error is not None:
        status = Status.ERROR  # raised (after Ray Train's retries)
    elif trial.last.get("status") == Status.UNSTABLE:
        status = Status.UNSTABLE
    elif int(trial.last.get("step") or 0) < steps:
        status = Status.STOPPED
    else:
        status = Status.OK  # ran every step; has its FID
    return status.value


# trials.csv: what every run of the same sweep writes alike (no ids, times, hosts or paths of
# Ray Tune's own results table, which MLflow's trial runs keep); a column per sweep axis after
# `trial`
TRIAL_MEASURES = ("status", "step", "fid", "nll_bpd", "nll_bpd_se", "rung_step", "nll_bpd_rung",
                  "loss", "lr", "error")


def trial_numbers(trials: Sequence[TrialOutcome]) -> dict[str, int]:
    """{trial id: its number}: Ray Tune's trial ids are one prefix per sweep and a counter, in
    the order it creates the trials (the grid's), so their order numbers them alike in every run
    of the sweep."""
    return {trial_id: i for i, trial_id in enumerate(sorted(t.trial_id for t in trials))}


def trials_table(trials: Sequence[TrialOutcome], sweep: SweepConfig) -> pd.DataFrame:
    """One row per trial, in the grid's order: `trial`, its number (Ray Tune numbers a sweep's
    trials in the order it creates them), its value of each axis (schedule, weighting), then
    `TRIAL_MEASURES`: status, the last
    report's step, fid, nll_bpd (NaN where not measured: no FID before the last step, no metric
    at all for unstable and failed trials), loss and lr, nll_bpd_rung (the validation NLL at the
    first rung, `rung_step`, which every trial that trains reaches: the number that compares all
    cells) and error."""
    trials = list(trials)
    number = trial_numbers(trials)
    names = axis_names(sweep.axes)
    rows = []
    for trial in trials:
        status = trial_status(trial, sweep.steps)
        usable = status in (Status.OK, Status.STOPPED)
        row = {"trial": number[trial.trial_id], **dict(zip(names, trial.cell, strict=True)),
               "status": status, "step": trial.last.get("step")}
        for key in ("fid", "nll_bpd", "nll_bpd_se"):
            keep = status == Status.OK if key == "fid" else usable
            row[key] = _number(trial.last.get(key)) if keep else None
        row["rung_step"] = sweep.grace_period
        row["nll_bpd_rung"] = _value_at(trial.history, "nll_bpd", sweep.grace_period) \
            if usable else None
        row["loss"], row["lr"] = _number(trial.last.get("loss")), _number(trial.last.get("lr"))
        row["error"] = trial.error
        rows.append(row)
    table = pd.DataFrame.from_records(rows, columns=["trial", *names, *TRIAL_MEASURES])
    for key in ("fid", "nll_bpd", "nll_bpd_se", "nll_bpd_rung", "loss", "lr"):
        table[key] = pd.to_numeric(table[key], errors="coerce").astype("float64")
    table["step"] = pd.to_numeric(table["step"], errors="coerce").astype("Int64")
    order = {cell: i for i, cell in enumerate(sweep.cells())}
    table["_order"] = [order.get(tuple(cell), len(order)) for cell in
                       zip(*(table[name] for name in names))]
    return table.sort_values(["_order", "trial"]).drop(columns="_order") \
        .reset_index(drop=True)


def _value_at(history: pd.DataFrame, column: str, step: int) -> float:
    """`column` of the report at training step `step` (NaN if there is none)."""
    if history is None or column not in history.columns or "step" not in history.columns:
        return math.nan
    at = history[pd.to_numeric(history["step"], errors="coerce") == step]
    return float(pd.to_numeric(at[column], errors="coerce").iloc[-1]) if len(at) else math.nan


def best_trial(table: pd.DataFrame) -> Optional[dict[str, Any]]:
    """The finished trial with the lowest FID (lowest NLL where no trial has a FID), or None."""
    done = table[table["status"] == Status.OK]
    for key in (RANK_BY, METRIC):
        ranked = done[done[key].notna()].sort_values(key, kind="stable")
        if len(ranked):
            return {"rank_by": key, **ranked.iloc[0].to_dict()}
    return None


def best_record(best: Optional[dict[str, Any]], table: pd.DataFrame,
                sweep: SweepConfig, base: ExperimentConfig) -> dict[str, Any]:
    """best.yaml: the winning cell, its metrics, and the `experiments` entry that trains it;
    the same on every run of the sweep (its MLflow run is found by the sweep's name and the
    trial's cell)."""
    counts = table["status"].value_counts().to_dict()
    summary = {"trials": int(len(table)),
               **{f"{s}_trials": int(counts.get(s, 0))
                  for s in (Status.OK, Status.STOPPED, Status.UNSTABLE, Status.ERROR)}}
    if best is None:
        return {"best": None, **summary, "base_experiment": sweep.base_experiment}
    cell = cell_of(best, sweep.axes)
    patch = cell_patch(cell, sweep.axes)
    return {
        **{axis.name: value for axis, value in zip(sweep.axes, cell)},
        "rank_by": best["rank_by"],
        "fid": _number(best.get("fid")),
        "nll_bpd": _number(best.get("nll_bpd")),
        "nll_bpd_se": _number(best.get("nll_bpd_se")),
        "steps": int(best["step"]),
        "trial": int(best["trial"]),
        "base_experiment": sweep.base_experiment,
        # paste under `experiments:` in params.yaml to train the winner as a study row
        # (diffusion keys at its top, those of other sections under their section's name)
        "experiment": {"mean_type": base.diffusion.mean_type,
                       "var_type": base.diffusion.var_type,
                       **patch.pop("diffusion", {}), **patch},
        **summary,
    }


def _number(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _sweep_run(tracker, name: str, base_experiment: str) -> str:
    """The MLflow run of the sweep `name`: found (a resumed or repeated sweep), or created."""
    return tracker.run_with("sweep", {TAG_ROLE: "sweep", TAG_SWEEP: name,
                                      TAG_BASE_EXPERIMENT: base_experiment})


def _trial_run(tracker, parent: str, name: str, trial_id: str, cell: dict[str, str]) -> str:
    """The nested MLflow run of one trial (`trial_id`) of the sweep `name`, whose value of each
    axis is `cell` ({axis name: value}): named by its values, tagged with each."""
    return tracker.run_with("-".join(cell.values()),
                            {TAG_SWEEP: name, TAG_TRIAL_ID: trial_id,
                             **{TAG_AXIS + axis: value for axis, value in cell.items()}},
                            parent_run_id=parent)


# a trial's report -> its MLflow metric
REPORTED_METRICS = (("loss", "train_loss"), ("lr", "lr"), ("grad_norm", "grad_norm"),
                    ("images_per_s", "images_per_s"), ("nll_bpd", "nll_bpd"),
                    ("nll_bpd_se", "nll_bpd_se"))


@dataclass
class LiveTrialRuns:
    """Streams each trial's reports into its nested MLflow run as they arrive (called by the
    driver's Ray Tune callback, `pipeline.cluster.ray_tune`: one writer): the sweep's run and the
    trials' runs exist, RUNNING, from their first report. A step already logged (a trial
    resumed from an older checkpoint reports it again) is not logged twice."""

    tracker: Any
    name: str
    base_experiment: str
    axes: Sequence[SweepAxis] = SWEEP_AXES  # the sweep's (SweepConfig.axes)
    _runs: dict[str, str] = field(default_factory=dict, repr=False)

    def __call__(self, trial_id: str, config: dict, report: dict[str, Any]) -> None:
        if "parent" not in self._runs:
            self._runs["parent"] = _sweep_run(self.tracker, self.name, self.base_experiment)
        if trial_id not in self._runs:
            cell = dict(zip(axis_names(self.axes), cell_of(config, self.axes)))
            self._runs[trial_id] = _trial_run(self.tracker, self._runs["parent"], self.name,
                                              trial_id, cell)
        step = int(report["step"])
        for key, metric in REPORTED_METRICS:
            value = _number(report.get(key))
            if value is not None:
                self.tracker.log_metric_history(self._runs[trial_id], metric, [step], [value])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_runs": {}}


def log_sweep(tracker, name: str, sweep: SweepConfig, base: ExperimentConfig,
              trials: Sequence[TrialOutcome], table: pd.DataFrame,
              wall_s: float) -> tuple[str, dict[str, str]]:
    """One MLflow run for the sweep `name` and one nested run per trial (params, the train loss
    and validation NLL curves by step, final fid / nll_bpd, status), found again where a
    resumed or repeated sweep logged them before (no point is logged twice). Returns (sweep run
    id, {trial id: run id})."""
    number = trial_numbers(trials)
    parent = _sweep_run(tracker, name, sweep.base_experiment)
    tracker.log_params(parent, {"sweep": dataclasses.asdict(sweep), **base.to_dict()})
    children = {}
    for trial in trials:
        row = table[table["trial"] == number[trial.trial_id]].iloc[0]
        status = row["status"]
        exp = sweep.trial_experiment(base, *trial.cell)
        cell = dict(zip(axis_names(sweep.axes), trial.cell, strict=True))
        run_id = _trial_run(tracker, parent, name, trial.trial_id, cell)
        tracker.set_tags(run_id, {TAG_TRIAL: int(row["trial"]), TAG_STATUS: status,
                                  **({TAG_ERROR: trial.error[-4000:]} if trial.error else {})})
        tracker.log_params(run_id, {**cell, **exp.to_dict()})
        history = trial.history
        for column, metric in REPORTED_METRICS:
            if column in history.columns and "step" in history.columns:
                curve = history[["step", column]].apply(pd.to_numeric, errors="coerce")
                curve = curve[curve[column].apply(lambda v: math.isfinite(v))].dropna()
                tracker.log_metric_history(run_id, metric, curve["step"].astype(int).tolist(),
                                           curve[column].tolist())
        final = {"fid": _number(row["fid"]), "final_step": _number(row["step"]),
                 "time_total_s": _number(trial.last.get("time_total_s"))}
        tracker.log_metrics(run_id, final, step=int(final["final_step"] or 0))
        tracker.set_terminated(run_id, "FAILED" if status == Status.ERROR
                               else "KILLED" if status == Status.STOPPED else "FINISHED")
        children[trial.trial_id] = run_id
    counts = table["status"].value_counts().to_dict()
    done = table[table["status"] == Status.OK]
    tracker.log_metrics(parent, {
        "sweep_wall_s": wall_s, "trials": float(len(table)),
        **{f"{s}_trials": float(counts.get(s, 0))
           for s in (Status.OK, Status.STOPPED, Status.UNSTABLE, Status.ERROR)},
        "best_fid": _number(done["fid"].min()) if len(done) else None,
        "best_nll_bpd": _number(done["nll_bpd"].min()) if len(done) else None})
    tracker.set_terminated(parent, "FINISHED")
    return parent, children
