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
