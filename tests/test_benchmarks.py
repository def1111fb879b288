"""The benchmark scripts run end to end on tiny settings and write what their README says.

They are measurements, not tests: no timing is asserted here, only that every case ran, that
ours and diffusers are the same architecture, and that the ratios are the paired ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CIFAR10_PARAMETERS = 35_746_307  # the official diffusion_tf CIFAR10 model


def bench(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["torch"] and result["args"]["threads"] == 1
    return result["results"]


@pytest.mark.slow
def test_training_benchmark_times_ours_and_diffusers_at_both_precisions(tmp_path):
    results = bench("train_throughput.py", tmp_path, "--config", "cifar10", "--batch-size", "1",
                    "--steps", "1", "--rounds", "2", "--warmup", "0",
                    "--precisions", "fp32,bf16")
    assert results["parameters"] == {"ours": CIFAR10_PARAMETERS,
                                     "diffusers": CIFAR10_PARAMETERS}
    cases = results["cases"]
    assert set(cases) == {"ours fp32", "ours bf16", "diffusers fp32", "diffusers bf16"}
    assert all(c["per_s"] > 0 for c in cases.values())
    ratios = results["ratios"]
    assert set(ratios) == {"ours fp32 / diffusers fp32", "ours bf16 / diffusers bf16",
                           "ours bf16 / diffusers fp32"}
    for label, ratio in ratios.items():  # per round: their seconds over ours, paired
        ours, theirs = label.split(" / ")
        expected = [t / o for o, t in zip(cases[ours]["seconds"], cases[theirs]["seconds"])]
        assert ratio["per_round"] == pytest.approx(expected)


@pytest.mark.slow
def test_sampling_benchmark_runs_both_samplers_against_diffusers(tmp_path):
    results = bench("sampling_throughput.py", tmp_path, "--config", "cifar10",
                    "--batch-size", "1", "--ancestral-steps", "2", "--ddim-steps", "2",
                    "--rounds", "1", "--precisions", "fp32,bf16")
    for sampler in ("ancestral", "ddim"):
        entry = results["samplers"][sampler]
        assert set(entry["cases"]) == {"ours fp32", "ours bf16", "diffusers fp32",
                                       "diffusers bf16"}
        assert "ours bf16 / diffusers fp32" in entry["ratios"]
    ancestral = results["samplers"]["ancestral"]["cases"]["ours fp32"]
    assert ancestral["full_chain_steps"] == 1000  # extrapolated to the paper's T
    assert ancestral["s_per_image_full_chain"] == pytest.approx(
        ancestral["s_per_step"] * 1000)


def test_digits_benchmark_times_ours_alone(tmp_path):
    results = bench("train_throughput.py", tmp_path, "--config", "digits", "--steps", "1",
                    "--rounds", "1", "--warmup", "0", "--batch-size", "8")
    assert list(results["cases"]) == ["ours"] and "ratios" not in results
    assert results["image_shape"] == [1, 8, 8]


def test_recipe_benchmark_scores_raw_and_ema_weights_under_each_variant(tmp_path):
    results = bench("recipe.py", tmp_path, "--experiments", "eps_simple", "--steps", "4",
                    "--eval-every", "2", "--nll-images", "4", "--nll-strata", "2",
                    "--fid-samples", "8", "--classifier-steps", "20",
                    "--variant", "flat:lr_schedule=constant",
                    "--variant", "decay:lr_schedule=cosine,lr_final=0.1")
    assert [(r["variant"], r["step"]) for r in results] == [
        ("flat", 2), ("flat", 4), ("decay", 2), ("decay", 4)]
    for row in results:
        assert row["nll_model"] > 0 and row["nll_ema"] > 0
        assert ("fid_ema" in row) == (row["step"] == 4)


def test_object_store_benchmark_hands_the_split_to_a_worker_both_ways(tmp_path):
    results = bench("object_store.py", tmp_path, "--images", "100", "--rounds", "1")
    assert set(results["seconds"]) == {"put", "get in a worker", "load in a worker"}
    assert results["size_mib"] == 100 * 3 * 32 * 32 / 2**20 and results["get_over_load"] > 0


def test_study_time_splits_each_stage_into_its_work_and_the_rest(tmp_path):
    """On a time-stamped log of `dvc repro`: a stage runs from "Running stage" to "Updating
    lock file"; its work is what it wrote down (the training loop's wall_s, "sampled ... in
    Ns", evaluate_wall_s); the rest is start-up and bookkeeping."""
    (tmp_path / "models" / "e-0").mkdir(parents=True)
    (tmp_path / "models" / "e-0" / "state.json").write_text(json.dumps({"wall_s": 50.0}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "e-0_run.json").write_text(json.dumps({"evaluate_wall_s": 8.0}))
    log = [(0.0, "Running stage 'prepare':"), (4.0, "Updating lock file 'dvc.lock'"),
           (5.0, "Running stage 'train@e-0':"), (70.0, "Updating lock file 'dvc.lock'"),
           (71.0, "Running stage 'sample@e-0':"), (75.0, "sampled e-0: 60 images in 2s"),
           (80.0, "Updating lock file 'dvc.lock'"), (81.0, "Running stage 'evaluate@e-0':"),
           (93.0, "Updating lock file 'dvc.lock'"), (95.0, "[exit 0]")]
    (tmp_path / "study.log").write_text("".join(f"{t}\t{line}\n" for t, line in log))
    results = bench("study_time.py", tmp_path, "--repo", str(tmp_path), "--log",
                    str(tmp_path / "study.log"))
    groups = {g["stages"]: g for g in results["groups"]}
    assert results["total_s"] == 95.0
    assert (groups["train"]["wall_s"], groups["train"]["work_s"]) == (65.0, 50.0)
    assert (groups["sample"]["wall_s"], groups["sample"]["work_s"]) == (9.0, 2.0)
    assert (groups["evaluate"]["wall_s"], groups["evaluate"]["work_s"]) == (12.0, 8.0)
    assert groups["prepare"]["other_s"] == 0.0
    assert groups["outside stages (install, DVC)"]["wall_s"] == 95.0 - 4.0 - 65.0 - 9.0 - 12.0


@pytest.mark.slow
def test_sharded_benchmark_times_one_loop_here_and_ray_workers(tmp_path):
    results = bench("sharded_throughput.py", tmp_path, "--num-samples", "8", "--batch-size",
                    "4", "--steps", "3", "--nll-images", "4", "--rounds", "1",
                    "--batch-sizes", "2")
    cases = results["cases"]
    for work in ("sampling", "nll"):
        assert {f"{work} one loop", f"{work} chunks here", f"{work} Ray, 1 worker",
                f"{work} Ray, 2 workers"} <= set(cases)
        ray = cases[f"{work} Ray, 1 worker"]
        assert 0 < ray["worker_share"] <= 1 and ray["chunks"] >= 2
        assert results[f"{work}_speedup_2_over_1"] > 0
    assert set(results["pixels_differing_by_batch_size"]) == {"2"}
