"""The cost plan (pipeline/reporting/cost_plan.py, stages/plan.py): its counts and arithmetic on a
hand-computed case, and the command as a user runs it."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from helpers import PROJECT, env_for
from pipeline.core.params import parse_params
from pipeline.reporting.cost_plan import (STARTUP_S, Work, plan_lines, plan_table, reference_saving,
                                     split_sizes, study_work, unet_gflops)


def small_params(**evaluate):
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["diffusion"]["num_timesteps"] = 10
    raw["sampling_steps"].update(ddim_steps=[2, 5])
    raw["train"].update(steps=3, batch_size=4, num_workers=2, warmup_steps=1)
    raw["sample"].update(num_samples=6, batch_size=4, num_workers=3)
    raw["evaluate"].update(nll_num_images=5, nll="exact", num_workers=2, **evaluate)
    raw["experiments"] = {"eps_simple": raw["experiments"]["eps_simple"]}
    raw["sweep"].update(base_experiment="eps_simple", schedules=["linear", "cosine"],
                        weightings=["uniform"], steps=8, report_every=4, grace_period=4,
                        val_images=3, val_strata=2, fid_num_samples=5, fid_steps=2,
                        cpus_per_worker=1.0, max_concurrent_trials=0)
    return parse_params(raw)


def test_the_study_work_counted_by_hand():
    """T = 10; 3 training steps of 4 images on 2 workers; 6 samples in batches of 4 (2 chunks,
    so 2 of the 3 workers have work); the exact bound of 5 test and 5 train images; the digits
    split of 1,797 images, 20 % test: 1,437 train, 360 test."""
    params = small_params()
    assert split_sizes(params) == (1437, 360)
    works = {w.stage: w for w in study_work(params, cluster_cpus=2)}
    assert list(works) == ["prepare", "classifier", "reference_stats", "train@eps_simple-0",
                           "sample@eps_simple-0", "evaluate@eps_simple-0",
                           "sampling_steps@eps_simple-0", "reference", "sweep", "tabulate"]
    exp = params.experiment("eps_simple")
    unet = unet_gflops(exp, (1, 8, 8))
    train, sample = works["train@eps_simple-0"], works["sample@eps_simple-0"]
    assert (train.evaluations, train.workers, train.batch) == (3 * 4, 2, 2)
    assert train.gflop == pytest.approx(12 * unet["train"])
    assert (sample.evaluations, sample.workers) == (6 * 10, 2)
    assert sample.gflop == pytest.approx(60 * unet["forward"])
    evaluate = works["evaluate@eps_simple-0"]
    # the bound: (5 + 5) images x 10 terms; features: the 6 samples alone (the 1,437 train
    # images' are the reference statistics, extracted once)
    assert evaluate.evaluations == 100 + 6 and evaluate.workers == 2
    assert evaluate.note == "100 U-Net forwards + 6 feature extractions"
    steps = works["sampling_steps@eps_simple-0"]
    # the 6 samples drawn with DDIM at 2 and 5 steps and ancestrally at all 10, each set of
    # 6 featurized; 3 settings x 2 chunks keep all 3 sample workers busy
    assert steps.evaluations == 6 * (2 + 5 + 10) + 3 * 6 and steps.workers == 3
    assert steps.note == "102 U-Net forwards + 18 feature extractions"
    stats = works["reference_stats"]
    assert (stats.evaluations, stats.workers) == (1437, 2)
    reference = works["reference"]
    # the untrained model's 6 samples x 10 steps and its bound; every prepared image's features
    # and the 6 samples'
    assert reference.evaluations == 60 + 100 + 1797 + 6
    sweep = works["sweep"]
    assert sweep.evaluations == 2 * 8 * 4 and sweep.workers == 2  # 2 trials, 2 at once
    assert works["prepare"].evaluations == 0


def test_the_reference_statistics_are_counted_once_and_their_saving_shown():
    """Two experiments x two seeds: four evaluate rows read the 1,437 train images' statistics
    that reference_stats extracts once (three passes fewer); the sweep's 2 trials extracted
    them at their last step too."""
    raw = small_params().to_dict()
    raw["study"]["seeds"] = [0, 1]
    raw["experiments"] = {"eps_simple": {}, "mu_simple": {"mean_type": "mu"}}
    params = parse_params(raw)
    works = study_work(params, cluster_cpus=2)
    features = sum(int(w.note.split(" + ")[1].split()[0].replace(",", ""))
                   for w in works if w.stage.startswith("evaluate@"))
    assert features == 4 * 6  # the samples' alone
    assert sum(w.stage == "reference_stats" for w in works) == 1
    assert reference_saving(params) == {"images": 1437, "rows": 4, "trials": 2,
                                        "saved": 3 * 1437, "trials_saved": 2 * 1437}


def test_checkpoints_add_their_quick_scores():
    """evaluate.checkpoints all (steps 2 and 3 with checkpoint_every 2): per step 4 samples x
    10 steps, their 4 features and the stratified bound of 5 test images at 3 strata."""
    raw_params = small_params(checkpoints="all", checkpoint_num_samples=4, nll_strata=3)
    raw = raw_params.to_dict()
    raw["train"]["checkpoint_every"] = 2
    raw["experiments"] = {"eps_simple": {}}
    params = parse_params(raw)
    without = small_params()
    evaluate = {w.stage: w for w in study_work(params)}["evaluate@eps_simple-0"]
    plain = {w.stage: w for w in study_work(without)}["evaluate@eps_simple-0"]
    assert evaluate.evaluations - plain.evaluations == 2 * (4 * 10 + 4 + 5 * 3)


def test_time_is_flops_over_the_workers_throughput_plus_start_up():
    works = [Work("sample@e-0", "infer", 1000, 0.5, 4, 1, 100),
             Work("train@e-0", "train", 200, 3.0, 2, 1, 64),
             Work("prepare", "none", 0, 0.0, 1, 1, 1)]
    table = plan_table(works, gflops=25.0).set_index("stage")
    assert table.loc["sample@e-0", "compute_s"] == pytest.approx(1000 * 0.5 / (25 * 4))
    assert table.loc["sample@e-0", "total_s"] == pytest.approx(5.0 + STARTUP_S["sample"])
    assert table.loc["train@e-0", "compute_s"] == pytest.approx(600 / 50)
    assert table.loc["prepare", "total_s"] == STARTUP_S["prepare"]
    assert table.loc["total", "gflop"] == pytest.approx(1100.0)
    assert table.loc["total", "total_s"] == pytest.approx(
        5.0 + 12.0 + STARTUP_S["sample"] + STARTUP_S["train"] + STARTUP_S["prepare"])
    measured = plan_table(works, rates={("infer", 100, 1): 10.0, ("train", 64, 1): 60.0})
    assert measured.set_index("stage").loc["sample@e-0", "compute_s"] == pytest.approx(12.5)


def test_the_printed_columns_are_as_wide_as_their_widest_cell():
    """CIFAR10's plan has GFLOP counts such as 3,824,144,928 and evaluations past a billion:
    every cell stays under its column name (right-aligned cells end where the name ends), with
    a space before it, whatever its length."""
    works = [Work("prepare", "none", 0, 0.0, 1, 1, 1),
             Work("train@eps_vlb_learned-0", "train", 102_400_000, 37.345, 8, 1, 128),
             Work("sweep", "train", 12_800_000_000, 40.24, 8, 1, 128, "a note")]
    table = plan_table(works, gflops=8640.0)
    lines = plan_lines(table)
    header = lines[0]
    names = ["stage", "workers", "evaluations", "GFLOP", "compute", "start-up", "total"]
    assert header.split() == names
    assert "3,824,128,000" in lines[2] and "12,800,000,000" in lines[3]
    widths = {len(header)}
    for line, row in zip(lines[1:], table.to_dict("records")):
        cells = line.split("  " + row["note"])[0] if row["note"] else line
        widths.add(len(cells))
        assert cells.split()[0] == row["stage"]
        for name, cell in zip(names[2:4], (f"{row['evaluations']:,.0f}",
                                           f"{row['gflop']:,.0f}")):
            end = header.index(name) + len(name)
            assert cells[end - len(cell):end] == cell, (name, line)
            assert cells[end - len(cell) - 1] == " ", (name, line)
    assert lines[3].endswith("  a note") and not lines[1].endswith(" ")
    assert widths == {len(header)}  # the last column's cells end where its name ends


def test_a_training_step_costs_about_three_forwards():
    """The backward pass costs about twice the forward: a check on the counter's totals."""
    exp = small_params().experiment("eps_simple")
    unet = unet_gflops(exp, (1, 8, 8))
    assert 2.8 < unet["train"] / unet["forward"] < 3.2
    assert math.isclose(unet["forward"], 0.0324, rel_tol=0.05)  # benchmarks/RESULTS.md


def test_the_plan_command_prints_every_stage_and_refuses_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.plan", "--gflops", "50",
                           "--csv", str(tmp_path / "plan.csv")], cwd=PROJECT,
                          env=env_for(PROJECT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "50 GFLOP/s per worker (given)" in proc.stdout
    for stage in ("reference_stats", "train@eps_simple-0", "sample@mu_simple-0",
                  "evaluate@eps_vlb_fixed-0", "reference", "sweep", "total"):
        assert stage in proc.stdout, stage
    # six evaluate rows read the 1,437 train images' statistics extracted once
    assert (f"the 1,437 train images' features are extracted once (reference_stats) and read "
            f"by 6 evaluate rows: {5 * 1437:,} fewer extractions") in proc.stdout
    assert (tmp_path / "plan.csv").read_text().startswith("stage,workers,evaluations,gflop")
    bad = subprocess.run([sys.executable, "-m", "stages.plan", "--gflops", "0"], cwd=PROJECT,
                         env=env_for(PROJECT), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--gflops must be > 0" in bad.stderr
