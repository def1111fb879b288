"""The sweep: the `sweep` section of params.yaml, what a trial measures, what the results become,
a tiny real Ray Tune sweep (ASHA, nested MLflow runs). A stage submitted to a Ray cluster as a
job: test_cluster.py (the whole study, through `stages.submit`)."""

import copy
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pandas as pd
import pytest
import yaml

from helpers import assert_refused, env_for
from pipeline.training.sweep_trials import TrialOutcome, best_record, best_trial, trial_status, trials_table
from pipeline.core.config import ConfigError, SWEEP_WEIGHTINGS, SweepConfig
from pipeline.core.params import load_params, parse_params
from pipeline.core.sweep_axes import SWEEP_AXES, SweepAxis

PROJECT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEFAULT = yaml.safe_load((PROJECT / "params.yaml").read_text())


# --------------------------------------------------------------------------------------------
# params.yaml: the sweep section
# --------------------------------------------------------------------------------------------


def with_sweep(**changes):
    raw = copy.deepcopy(DEFAULT)
    raw["sweep"].update(changes)
    return raw


def test_default_sweep_section_is_typed_and_every_trial_is_a_valid_experiment():
    params = load_params(PROJECT / "params.yaml")
    sweep = params.sweep
    assert isinstance(sweep, SweepConfig)
    assert sweep.base_experiment in params.experiments
    assert set(sweep.schedules) <= {"linear", "cosine", "quadratic", "sigmoid"}
    assert set(sweep.weightings) <= set(SWEEP_WEIGHTINGS)
    assert params.to_dict()["sweep"]["steps"] == sweep.steps
    cells = sweep.cells()
    assert len(cells) == len(sweep.schedules) * len(sweep.weightings)
    for schedule, weighting in cells:
        exp = params.sweep_experiment(schedule, weighting)
        assert exp.diffusion.schedule == schedule
        assert exp.train.steps == sweep.steps and exp.train.log_every == sweep.report_every


def test_weighting_names_map_to_objectives():
    params = parse_params(with_sweep(ema_decay=0.9, num_workers=2, cpus_per_worker=0.5))
    base = params.experiment(params.sweep.base_experiment)
    expected = {"uniform": ("simple", "uniform"), "vlb": ("simple", "vlb"),
                "p2": ("simple", "p2"), "min_snr": ("simple", "min_snr"),
                "hybrid": ("hybrid", "uniform")}
    for weighting, (loss, loss_weighting) in expected.items():
        d = params.sweep_experiment("cosine", weighting).diffusion
        assert (d.loss, d.weighting, d.schedule) == (loss, loss_weighting, "cosine")
        assert (d.mean_type, d.var_type) == (base.diffusion.mean_type, base.diffusion.var_type)
    exp = params.sweep_experiment("linear", "p2")
    assert exp.name == f"{base.name}-linear-p2"
    assert exp.train.checkpoint_every == params.sweep.report_every  # paused at a rung: kept
    assert (exp.train.num_workers, exp.train.cpus_per_worker) == (2, 0.5)
    assert exp.train.ema_decay == 0.9
    assert exp.model == base.model and exp.data == base.data
    assert params.experiment(base.name) == base  # the study's row is untouched


def test_without_a_sweep_section_the_defaults_need_not_fit():
    raw = copy.deepcopy(DEFAULT)
    del raw["sweep"], raw["sampling_steps"]  # (it names eps_simple too)
    raw["experiments"] = {"mine": {"mean_type": "eps"}}  # no eps_simple: the default base
    params = parse_params(raw)
    assert params.sweep == SweepConfig()
    with pytest.raises(ConfigError, match="sweep.base_experiment.*mine"):
        params.sweep_experiment("linear", "uniform")


SWEEP_CATALOGUE = [
    (with_sweep(colour=1), ["sweep", "colour", "allowed", "schedules"]),
    (with_sweep(schedule=["linear"]), ["schedule", "did you mean 'schedules'"]),
    (with_sweep(schedules=["cosin"]), ["sweep.schedules[0]", "cosin", "linear, cosine"]),
    (with_sweep(schedules=["jsd"]), ["sweep.schedules[0]", "quadratic, sigmoid"]),
    (with_sweep(schedules="cosine"), ["sweep.schedules", "list"]),
    (with_sweep(schedules=[]), ["sweep.schedules", "non-empty", "linear"]),
    (with_sweep(schedules=["cosine", "cosine"]), ["sweep.schedules", "twice"]),
    (with_sweep(weightings=["snr"]), ["sweep.weightings[0]", "snr", "min_snr, hybrid"]),
    (with_sweep(base_experiment="eps_smple"), ["sweep.base_experiment", "eps_smple",
                                               "eps_simple"]),
    (with_sweep(base_experiment="eps_vlb_learned"), ["sweep", "eps_vlb_learned", "learned"]),
    (with_sweep(search="bayes"), ["sweep.search", "grid, random"]),
    (with_sweep(num_samples=4), ["sweep.num_samples", "grid", "random"]),
    (with_sweep(steps=0), ["sweep.steps", ">= 1"]),
    (with_sweep(steps="many"), ["sweep.steps", "integer"]),
    (with_sweep(report_every=10_000), ["sweep.report_every", "steps"]),
    (with_sweep(grace_period=0), ["sweep.grace_period", "steps"]),
    (with_sweep(reduction_factor=1), ["sweep.reduction_factor", "> 1"]),
    (with_sweep(grace_period=45), ["sweep.grace_period", "[45]", "report_every = 30"]),
    (with_sweep(steps=400, grace_period=60, reduction_factor=2.5),
     ["sweep.grace_period", "[375]", "multiples of report_every"]),
    (with_sweep(max_concurrent_trials=-1), ["sweep.max_concurrent_trials", ">= 0"]),
    (with_sweep(num_workers=3), ["sweep.num_workers", "batch_size"]),
    (with_sweep(cpus_per_worker=0), ["sweep.cpus_per_worker", "> 0"]),
    (with_sweep(use_gpu="yes"), ["sweep.use_gpu", "true or false"]),
    (with_sweep(ema_decay=1.0), ["sweep.ema_decay", "[0, 1)"]),
    (with_sweep(val_images=1), ["sweep.val_images", ">= 2"]),
    (with_sweep(fid_num_samples=1), ["sweep.fid_num_samples", ">= 2"]),
    (with_sweep(fid_steps=100_000), ["sweep.fid_steps", "num_timesteps"]),
    (with_sweep(search="random", num_samples=6), []),  # valid
    (with_sweep(cpus_per_worker=0.5, num_workers=2, max_concurrent_trials=0), []),  # valid
]


@pytest.mark.parametrize("raw,needles", SWEEP_CATALOGUE,
                         ids=[str(i) for i in range(len(SWEEP_CATALOGUE))])
def test_broken_sweep_params_are_refused_naming_the_key(raw, needles):
    assert_refused(raw, needles)


def test_a_sweep_is_named_by_its_recipe_not_its_resources(tmp_path):
    from pipeline.cluster.ray_tune import other_sweeps, sweep_name

    def name(**sweep):
        params = parse_params(with_sweep(**sweep))
        return sweep_name(params.sweep, params.experiment(params.sweep.base_experiment))

    default = name()
    assert default.startswith("ddpm-digits-sweep-")
    # where and how fast it runs: the same sweep, which a rerun resumes
    assert name(max_concurrent_trials=1) == default
    assert name(cpus_per_worker=0.5) == default
    raw = with_sweep()
    raw["tracking"] = {"tracking_uri": "sqlite:///elsewhere.db"}
    raw["cluster"] = {"storage": "s3://bucket/prefix", "placement": "spread"}
    raw["train"]["max_failures"] = 5
    params = parse_params(raw)
    assert sweep_name(params.sweep, params.experiment("eps_simple")) == default
    # what it finds: another sweep
    changed = {name(steps=240), name(schedules=["cosine", "linear"]), name(grace_period=30),
               name(reduction_factor=3.0), name(fid_num_samples=100), name(num_workers=2)}
    assert len(changed) == 6 and default not in changed
    raw = with_sweep()
    raw["train"]["lr"] = 0.001  # the base experiment's recipe
    params = parse_params(raw)
    assert sweep_name(params.sweep, params.experiment("eps_simple")) != default

    for folder in (default, name(steps=240), f"{default}.state", "ddpm-digits-eps_simple-0-x"):
        (tmp_path / folder).mkdir()
    base = parse_params(with_sweep()).experiment("eps_simple")
    assert other_sweeps(str(tmp_path), base, default) == [name(steps=240)]
    assert other_sweeps(str(tmp_path / "absent"), base, default) == []


def test_sweep_section_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):

        load_params(PROJECT / "params.yaml").sweep.steps = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# After the sweep: statuses, trials.csv, best.yaml, the sweep table and heat map
# --------------------------------------------------------------------------------------------


def outcome(trial_id, schedule, weighting, steps, *, status="ok", fid=None, nll=4.0,
            error=None):
    history = pd.DataFrame({"step": list(range(10, steps + 1, 10)),
                            "loss": [0.5] * (steps // 10),
                            "nll_bpd": [nll] * (steps // 10)})
    last = {"trial_id": trial_id, "step": steps, "status": status, "nll_bpd": nll}
    if fid is not None:
        last["fid"] = fid
    return TrialOutcome(trial_id, (schedule, weighting), history, last, error)


def synthetic_sweep():
    sweep = SweepConfig(schedules=("linear", "cosine"), weightings=("uniform", "p2"), steps=40,
                        grace_period=20)
    trials = [outcome("t0", "linear", "uniform", 40, fid=30.0, nll=4.1),
              outcome("t1", "cosine", "uniform", 40, fid=20.0, nll=3.9),
              outcome("t2", "linear", "p2", 20, nll=4.5),  # stopped by ASHA at step 20
              outcome("t3", "cosine", "p2", 30, status="unstable", nll=math.nan),
              TrialOutcome("t4", ("cosine", "p2"), pd.DataFrame(), {"trial_id": "t4"},
                           "RuntimeError: boom")]
    return sweep, trials


def test_trial_status_and_trials_table():
    sweep, trials = synthetic_sweep()
    statuses = [trial_status(t, sweep.steps) for t in trials]
    # plain strings, as trials.csv and best.yaml store them (yaml.safe_dump refuses an Enum)
    assert statuses == ["ok", "ok", "stopped", "unstable", "error"]
    assert {type(s) for s in statuses} == {str}
    table = trials_table(reversed(trials), sweep)  # in any order
    # the same columns on every run of a sweep: no Tune ids, times, hosts or paths
    assert list(table.columns) == ["trial", "schedule", "weighting", "status", "step", "fid",
                                   "nll_bpd", "nll_bpd_se", "rung_step", "nll_bpd_rung", "loss",
                                   "lr", "error"]
    rows = table.set_index("trial")  # t0..t4: numbered in the order Tune created them
    assert rows.loc[2, "status"] == "stopped" and math.isnan(rows.loc[2, "fid"])
    assert rows.loc[2, "nll_bpd"] == 4.5  # the estimate it stopped on
    assert math.isnan(rows.loc[3, "nll_bpd"]) and rows.loc[4, "error"].startswith("Runt")
    # the NLL at the first rung (step 20), which every trial that trains reports
    assert (rows["rung_step"] == 20).all()
    assert rows.loc[0, "nll_bpd_rung"] == 4.1 and rows.loc[2, "nll_bpd_rung"] == 4.5
    assert math.isnan(rows.loc[3, "nll_bpd_rung"]) and math.isnan(rows.loc[4, "nll_bpd_rung"])
    # ordered as the grid: schedules outermost
    assert list(zip(table["schedule"], table["weighting"]))[:3] == [
        ("linear", "uniform"), ("linear", "p2"), ("cosine", "uniform")]

    best = best_trial(table)
    assert (best["trial"], best["rank_by"]) == (1, "fid")
    base = load_params(PROJECT / "params.yaml").experiment("eps_simple")
    record = best_record(best, table, sweep, base)
    assert record["schedule"] == "cosine" and record["fid"] == 20.0 and record["trial"] == 1
    assert (record["ok_trials"], record["stopped_trials"], record["unstable_trials"],
            record["error_trials"]) == (2, 1, 1, 1)
    assert record["experiment"] == {"mean_type": "eps", "var_type": "fixed_large",
                                    "schedule": "cosine", "loss": "simple",
                                    "weighting": "uniform"}
    yaml.safe_load(yaml.safe_dump(record))  # plain types only


def test_log_sweep_nests_one_run_per_trial(tmp_path):
    import mlflow

    from pipeline.training.sweep_trials import log_sweep
    from pipeline.core.config import StudyConfig, TrackingConfig
    from pipeline.core.tracking import Tracker

    sweep, trials = synthetic_sweep()
    table = trials_table(trials, sweep)
    tracker = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                     artifact_root=str(tmp_path / "art")), StudyConfig(),
                      tmp_path)
    base = load_params(PROJECT / "params.yaml").experiment("eps_simple")
    parent, children = log_sweep(tracker, "a-sweep", sweep, base, trials, table, wall_s=12.0)
    assert set(children) == {"t0", "t1", "t2", "t3", "t4"}
    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    runs = {r.info.run_id: r for r in client.search_runs([tracker.experiment_id])}
    assert runs[parent].data.tags["ddpm.role"] == "sweep"
    statuses = {t: runs[r].info.status for t, r in children.items()}
    assert statuses == {"t0": "FINISHED", "t1": "FINISHED", "t2": "KILLED",
                        "t3": "FINISHED", "t4": "FAILED"}
    for run_id in children.values():
        assert runs[run_id].data.tags["mlflow.parentRunId"] == parent
    assert runs[children["t4"]].data.tags["ddpm.error"] == "RuntimeError: boom"
    assert runs[children["t1"]].data.metrics["fid"] == 20.0
    assert [m.step for m in client.get_metric_history(children["t2"], "nll_bpd")] == [10, 20]
    assert runs[parent].data.metrics["stopped_trials"] == 1
    # a resumed or repeated sweep logs into the same runs, with no point twice
    again, children_again = log_sweep(tracker, "a-sweep", sweep, base, trials, table, 13.0)
    assert (again, children_again) == (parent, children)
    assert [m.step for m in client.get_metric_history(children["t2"], "nll_bpd")] == [10, 20]
    assert len(client.search_runs([tracker.experiment_id])) == 1 + len(trials)
    other, _ = log_sweep(tracker, "another-sweep", sweep, base, trials, table, 1.0)
    assert other != parent  # another recipe: runs of its own


def test_sweep_table_and_heatmap_show_stopped_and_unstable_cells(tmp_path):
    from pipeline.artifacts.figures import save_sweep_heatmap
    from pipeline.artifacts.trials import load_sweep_trials
    from pipeline.reporting.sweep_report import SWEEP_CORNER, sweep_raw, sweep_table

    sweep, trials = synthetic_sweep()
    path = tmp_path / "trials.csv"
    trials_table(trials, sweep).to_csv(path, index=False)
    loaded = load_sweep_trials(path)
    cells = sweep_table(loaded).set_index(SWEEP_CORNER)
    assert cells.loc["cosine", "uniform"] == "20.00 / 3.90 #1"
    assert cells.loc["linear", "uniform"] == "30.00 / 4.10 #2"
    assert cells.loc["linear", "p2"] == "stopped / 4.50 #3"

    assert cells.loc["cosine", "p2"] == "–"  # unstable and failed
    raw = sweep_raw(loaded).set_index(["schedule", "weighting"])
    assert raw.loc[("linear", "p2"), "status"] == "stopped"
    save_sweep_heatmap(sweep_raw(loaded), tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 1000


@dataclass(frozen=True)
class ThreeAxes(SweepConfig):
    """The sweep with a third axis, added as docs/layout.md's recipe says: a field that lists
    its values, and its entry in the axes (`SWEEP_AXES` for the study's own sweep)."""

    lr_schedules: tuple[Literal["constant", "cosine"], ...] = ("constant", "cosine")
    axes: ClassVar = (*SWEEP_AXES,
                      SweepAxis("lr_schedule", "lr_schedules", "learning-rate schedule",
                                lambda value: {"train": {"lr_schedule": value}}))


def test_a_third_sweep_axis_reaches_the_grid_trials_table_best_yaml_and_report(tmp_path):
    """A third axis declared in one place is in every cell, Tune's search space, each trial's
    experiment, trials.csv, best.yaml's `experiment` entry (which parses as a study row that
    trains the winner), the sweep table's columns and the heat map."""
    from pipeline.artifacts.figures import save_sweep_heatmap
    from pipeline.artifacts.trials import load_sweep_trials
    from pipeline.cluster.ray_tune import search_space
    from pipeline.reporting.sweep_report import sweep_corner, sweep_raw, sweep_table

    sweep = ThreeAxes(schedules=("linear", "cosine"), weightings=("uniform", "p2"), steps=40,
                      report_every=10, grace_period=20)
    sweep.validate("sweep")
    cells = sweep.cells()
    assert len(cells) == 8 and cells[:3] == [("linear", "uniform", "constant"),
                                             ("linear", "uniform", "cosine"),
                                             ("linear", "p2", "constant")]
    assert search_space(sweep, list) == {"schedule": ["linear", "cosine"],
                                         "weighting": ["uniform", "p2"],
                                         "lr_schedule": ["constant", "cosine"]}
    params = load_params(PROJECT / "params.yaml")
    base = params.experiment("eps_simple")
    exp = sweep.trial_experiment(base, "cosine", "p2", "cosine")
    assert exp.name == "eps_simple-cosine-p2-cosine"
    assert (exp.diffusion.schedule, exp.diffusion.loss, exp.diffusion.weighting) == (
        "cosine", "simple", "p2")
    assert (exp.train.lr_schedule, exp.train.steps) == ("cosine", 40)
    assert base.train.lr_schedule == "constant"
    with pytest.raises(ConfigError, match=r"sweep\.lr_schedules: 'warm' is not allowed; "
                                          r"choose from: constant, cosine"):
        sweep.trial_experiment(base, "cosine", "p2", "warm")
    with pytest.raises(ConfigError, match=r"one value per axis \(schedule, weighting, "
                                          r"lr_schedule\)"):
        sweep.trial_experiment(base, "cosine", "p2")

    trials = [outcome("t0", "linear", "uniform", 40, fid=30.0, nll=4.1),
              outcome("t1", "linear", "p2", 40, fid=25.0, nll=4.0),
              outcome("t2", "cosine", "uniform", 40, fid=20.0, nll=3.9),
              outcome("t3", "cosine", "uniform", 20, nll=4.4)]
    for trial, lr_schedule in zip(trials, ("cosine", "constant", "cosine", "constant")):
        trial.cell = (*trial.cell, lr_schedule)
    table = trials_table(reversed(trials), sweep)
    assert list(table.columns[:5]) == ["trial", "schedule", "weighting", "lr_schedule",
                                       "status"]
    assert list(table["trial"]) == [0, 1, 3, 2]  # the grid's order, schedules outermost
    record = best_record(best_trial(table), table, sweep, base)
    assert (record["schedule"], record["weighting"], record["lr_schedule"]) == (
        "cosine", "uniform", "cosine")
    assert record["experiment"] == {"mean_type": "eps", "var_type": "fixed_large",
                                    "schedule": "cosine", "loss": "simple",
                                    "weighting": "uniform", "train": {"lr_schedule": "cosine"}}
    raw = copy.deepcopy(DEFAULT)
    raw["experiments"]["winner"] = record["experiment"]
    winner = parse_params(raw).experiment("winner")
    trial = sweep.trial_experiment(base, "cosine", "uniform", "cosine")
    assert winner.diffusion == trial.diffusion
    assert winner.train.lr_schedule == "cosine"

    path = tmp_path / "trials.csv"
    table.to_csv(path, index=False)
    loaded = load_sweep_trials(path)
    assert sweep_corner(sweep) == sweep_corner()  # rows: the first axis, as before
    cells = sweep_table(loaded, sweep).set_index(sweep_corner(sweep))
    assert list(cells.columns) == ["uniform / constant", "uniform / cosine", "p2 / constant"]
    assert cells.loc["cosine", "uniform / cosine"] == "20.00 / 3.90 #1"
    assert cells.loc["cosine", "uniform / constant"] == "stopped / 4.40 #4"
    assert cells.loc["linear", "p2 / constant"] == "25.00 / 4.00 #2"
    assert cells.loc["cosine", "p2 / constant"] == ""  # no such trial
    save_sweep_heatmap(sweep_raw(loaded, sweep), tmp_path / "heat.png", axes=sweep.axes)
    assert (tmp_path / "heat.png").stat().st_size > 1000


def test_trial_probe_measures_nll_every_report_and_fid_at_the_end(tmp_path):
    """The on_log hook of a sweep trial, on an untrained tiny model (no Ray)."""
    import numpy as np

    from pipeline.training.sweep_trials import TrialProbe
    from pipeline.diffusion.gaussian import GaussianDiffusion
    from pipeline.model.unet import build_model

    sys.path.insert(0, str(TESTS))
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 12)):
        images = rng.integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)
        np.savez(tmp_path / f"{split}.npz", images=images, labels=np.zeros(n, np.int64),
                 levels=np.asarray(256))
    raw = copy.deepcopy(DEFAULT)
    raw["diffusion"]["num_timesteps"] = 10
    raw["sampling_steps"].update(ddim_steps=[5, 10])
    raw["model"].update(ch=8, ch_mult=[1], attn_resolutions=[])
    raw["sweep"].update(fid_steps=5)
    exp = parse_params(raw).sweep_experiment("cosine", "p2")
    model = build_model(exp, (1, 8, 8))
    diffusion = GaussianDiffusion.from_config(exp.diffusion)
    from pipeline.measure.extractors import FeatureNetwork
    from pipeline.measure.stats import FeatureMoments

    extractor = "helpers_metrics:TinyConvExtractor"
    train_features, _ = FeatureNetwork(extractor, None)(np.load(tmp_path / "train.npz")["images"])
    probe = TrialProbe(test_data=str(tmp_path / "test.npz"),
                       train_data=str(tmp_path / "train.npz"), total_steps=20, val_images=8,
                       val_strata=3, fid_num_samples=10, fid_steps=5,
                       extractor=extractor, extractor_weights=None,
                       reference=FeatureMoments.of(train_features))
    model.train()
    early = probe(10, {"ema": model, "diffusion": diffusion})
    assert set(early) == {"nll_bpd", "nll_bpd_se"} and early["nll_bpd"] > 0
    assert model.training  # the hook leaves the model as it found it
    again = probe(10, {"ema": model, "diffusion": diffusion})
    assert again["nll_bpd"] == early["nll_bpd"]  # same draws at every report
    final = probe(20, {"ema": model, "diffusion": diffusion})
    assert math.isfinite(final["fid"]) and final["fid"] > 0
    assert pickle.loads(pickle.dumps(probe)).val_images == 8  # it travels to Ray workers


def test_sweep_stage_help_and_bad_params(tmp_path):
    env = env_for(PROJECT)
    proc = subprocess.run([sys.executable, "-m", "stages.sweep", "--help"], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--params", "--data", "--models", "--out", "--storage"):
        assert flag in proc.stdout
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_sweep(weightings=["uniform", "snr"])))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stages.sweep", "--params", str(bad)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 15
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "sweep.weightings[1]" in proc.stderr and "min_snr" in proc.stderr


# --------------------------------------------------------------------------------------------
# Real runs: a tiny sweep, and a stage submitted to a Ray cluster
# --------------------------------------------------------------------------------------------


def tiny_params(root: Path) -> Path:
    """A tiny digits study (T = 20, the test_stages size) with a 2 x 2 sweep, under `root`."""
    params = copy.deepcopy(DEFAULT)
    params["diffusion"]["num_timesteps"] = 20
    params["sampling_steps"].update(experiments=[], ddim_steps=[5, 10])
    params["train"].update(steps=20, batch_size=32, log_every=10, checkpoint_every=10,
                           warmup_steps=5)
    params["evaluate"].update(classifier_steps=300)
    params["tracking"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                          "artifact_root": str(root / "mlartifacts")}
    params["sweep"] = {"base_experiment": "eps_simple", "schedules": ["linear", "cosine"],
                       "weightings": ["uniform", "p2"], "steps": 20, "report_every": 5,
                       "ema_decay": 0.5, "grace_period": 5, "reduction_factor": 2.0,
                       "max_concurrent_trials": 2, "num_workers": 1, "cpus_per_worker": 1.0,
                       "val_images": 20, "val_strata": 5, "fid_num_samples": 50,
                       "fid_steps": 5}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(args, cwd, timeout=600, env=None):
    env = env_for(PROJECT, extra=env)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_study(shared_study, tmp_path_factory):
    """Prepared digits, the digits classifier and the train split's reference statistics of a
    tiny study: the shared study's (conftest.py), made with the same data and classifier
    settings, copied (the stages refuse a reference file made for other data or extractor)."""
    root = tmp_path_factory.mktemp("sweep-study")
    params = tiny_params(root)
    for ours, theirs in (("data", "data/prepared"), ("models/classifier", "models/classifier"),
                         ("stats", "data/reference_stats")):
        shutil.copytree(shared_study / theirs, root / ours)
    return root, params


def sweep_args(root: Path, params: Path, out: Path, storage: Path) -> list[str]:
    return ["stages.sweep", "--params", str(params), "--data", str(root / "data"),
            "--stats", str(root / "stats"), "--models", str(root / "models"), "--out", str(out),
            "--storage", str(storage)]


@pytest.fixture(scope="module")
def tiny_sweep(tiny_study):
    """The tiny study's 2 x 2 sweep (20 steps, rungs at 5 and 10), run once uninterrupted."""
    root, params = tiny_study
    start = time.monotonic()
    proc = run_stage(sweep_args(root, params, root / "results/sweep", root / "storage/sweep"),
                     root, timeout=900)
    return root, params, proc, time.monotonic() - start


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tiny_sweep):
    """2 schedules x 2 weightings, 20 steps: trials.csv, best.yaml, successive halving at steps
    5 and 10, nested MLflow runs."""
    import mlflow

    root, params, proc, wall = tiny_sweep
    assert "started a local Ray instance" in proc.stdout
    assert "go on at steps 5, 10" in proc.stdout

    trials = pd.read_csv(root / "results/sweep/trials.csv")
    assert len(trials) == 4
    assert set(zip(trials["schedule"], trials["weighting"])) == {
        ("linear", "uniform"), ("linear", "p2"), ("cosine", "uniform"), ("cosine", "p2")}
    assert set(trials["status"]) <= {"ok", "stopped"}, trials[["status", "error"]]
    assert sorted(trials["trial"]) == [0, 1, 2, 3]
    ok, stopped = trials[trials["status"] == "ok"], trials[trials["status"] == "stopped"]
    assert (ok["step"] == 20).all() and ok["fid"].notna().all() and ok["nll_bpd"].notna().all()
    # successive halving (rungs at 5 and 10 steps, reduction factor 2): the best 2 of 4 by the
    # NLL at step 5 go on, the best 1 of those 2 by the NLL at step 10 finishes
    assert len(ok) == 1 and sorted(stopped["step"]) == [5, 5, 10]
    at_5 = trials.sort_values(["nll_bpd_rung", "trial"])
    assert set(at_5["step"].iloc[:2]) == {10, 20} and set(at_5["step"].iloc[2:]) == {5}
    assert stopped["fid"].isna().all()

    best = yaml.safe_load((root / "results/sweep/best.yaml").read_text())
    assert (best["schedule"], best["weighting"]) == (ok["schedule"].iloc[0],
                                                     ok["weighting"].iloc[0])
    assert best["fid"] == pytest.approx(ok["fid"].iloc[0])
    assert best["trials"] == 4 and best["stopped_trials"] == 3
    assert best["sweep"].startswith("ddpm-digits-sweep-")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm-digits")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["ddpm.sweep"] == best["sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    by_trial = {int(r.data.tags["ddpm.trial"]): r for r in children}
    assert set(by_trial) == set(trials["trial"])
    for row in trials.to_dict("records"):
        run = by_trial[row["trial"]]
        assert run.data.tags["ddpm.status"] == row["status"]
        assert run.data.params["schedule"] == row["schedule"]
        assert run.data.params["diffusion.schedule"] == row["schedule"]
        assert run.data.params["train.steps"] == "20"
        curve = client.get_metric_history(run.info.run_id, "nll_bpd")
        assert [m.step for m in curve] == list(range(5, int(row["step"]) + 1, 5))
        assert run.data.metrics["nll_bpd"] == pytest.approx(row["nll_bpd"])
        if row["status"] == "ok":
            assert run.data.metrics["fid"] == pytest.approx(row["fid"])
            assert run.info.status == "FINISHED"
        else:
            assert "fid" not in run.data.metrics and run.info.status == "KILLED"
    assert parent.data.metrics["trials"] == 4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/trials.csv", "sweep/best.yaml"}
    print(f"tiny sweep: {wall:.0f}s, {len(stopped)} of 4 trials stopped at a rung")


def _result_lines(storage: Path) -> dict[str, list[int]]:
    """{trial folder name: the steps of its result.json}: what each trial reported."""
    import json

    out = {}
    for path in storage.glob("*/*/result.json"):
        out[path.parent.name] = [json.loads(line)["step"] for line in
                                 path.read_text().splitlines() if line.strip()]
    return out


@pytest.mark.slow
def test_a_stopped_sweep_resumes_and_any_concurrency_writes_the_same_files(tiny_sweep,
                                                                          tmp_path):
    """The tiny sweep again with one trial at a time, stopped (SIGINT, as Ctrl-C) as soon as a
    trial has ended, then run again: the rerun resumes the sweep (the ended trial is kept, the
    others go on from their checkpoints, no step is reported twice) and writes the files of the
    uninterrupted sweep, run two at a time, byte for byte."""
    root, params, _, _ = tiny_sweep
    raw = yaml.safe_load(params.read_text())
    raw["sweep"]["max_concurrent_trials"] = 1  # a resource: the same sweep, its name unchanged
    raw["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                       "artifact_root": str(tmp_path / "mlartifacts")}
    one = tmp_path / "params.yaml"
    one.write_text(yaml.safe_dump(raw, sort_keys=False))
    out, storage = tmp_path / "sweep", tmp_path / "storage"
    args = [sys.executable, "-m", *sweep_args(root, one, out, storage)]
    first = subprocess.Popen(args, cwd=root, env=env_for(PROJECT), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    ended: list[str] = []
    while time.monotonic() < deadline and first.poll() is None and not ended:
        time.sleep(1)
        for state in storage.glob("*/experiment_state-*.json"):
            text = state.read_text(errors="replace")
            if '\\"status\\": \\"TERMINATED\\"' in text or '"status": "TERMINATED"' in text:
                ended.append(state.name)
    assert first.poll() is None, f"the sweep ended before a stop:\n{first.stdout.read()[-3000:]}"
    assert ended, "no trial ended in 10 minutes"
    before = _result_lines(storage)
    os.killpg(first.pid, signal.SIGINT)
    log = first.communicate(timeout=300)[0]
    assert first.returncode != 0, log[-3000:]
    assert not (out / "trials.csv").exists()  # nothing for DVC from a stopped sweep
    assert "run the sweep stage again to resume it" in log, log[-3000:]

    again = run_stage(sweep_args(root, one, out, storage), root, timeout=900)
    assert "sweep: resuming" in again.stdout
    after = _result_lines(storage)
    for trial, steps in after.items():
        assert steps == sorted(set(steps)), f"{trial} reported a step twice: {steps}"
        assert steps[:len(before.get(trial, []))] == before.get(trial, [])
    for name in ("trials.csv", "best.yaml"):
        assert (out / name).read_bytes() == (root / "results/sweep" / name).read_bytes(), name


@pytest.mark.slow
def test_a_ddp_trial_trains_through_a_torch_trainer_of_its_own(tiny_study, tmp_path):
    """sweep.num_workers 2: each trial is a DDP run (its own TorchTrainer, 2 workers of half a
    CPU), reported to Tune like a single-worker trial; the same cell trained by one worker in
    the trial's actor reports the same steps."""
    root, params = tiny_study
    raw = yaml.safe_load(params.read_text())
    raw["sweep"].update(schedules=["cosine"], weightings=["uniform"], num_workers=2,
                        cpus_per_worker=0.5, steps=10, grace_period=5)
    ddp = tmp_path / "params.yaml"
    ddp.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run_stage(sweep_args(root, ddp, tmp_path / "out", tmp_path / "storage"), root,
                     timeout=600, env={"DDPM_VERBOSE": "1"})  # Ray Train's INFO lines too
    assert "world_size=2" in proc.stdout + proc.stderr  # the trial's own TorchTrainer
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert len(trials) == 1 and trials["status"].tolist() == ["ok"], trials
    assert trials["step"].tolist() == [10] and trials["fid"].notna().all()
    assert any((tmp_path / "storage").glob("*/trainers/*"))  # Ray Train's run folder
