"""benchmarks/gpu_check.py: its CPU mode (`--device cpu --tiny`) writes every row of the real
check, it needs nothing that the GPU machine lacks, and without a GPU it stops at once.

No figure is asserted: on a CPU they mean nothing. What is asserted is that every row ran (or
says why not), that the seeds check holds, and what the JSON and the table carry.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
# not on the GPU machine (ray, mlflow, dvc, torch-fidelity), or only as a carried wheel
ABSENT = ("ray", "mlflow", "dvc", "torch_fidelity")
TINY = ("--device", "cpu", "--tiny", "--compile-backend", "eager", "--threads", "1")
PRECISIONS = ("fp32", "tf32", "bf16")
BATCHES = (2, 4)  # the tiny sizes' training batches


def run_check(tmp_path: Path, *args: str, blocked=ABSENT, env=None):
    """Run the script as `python3 benchmarks/gpu_check.py ARGS` would, with the modules
    `blocked` unimportable (None in sys.modules: `import ray` raises ImportError)."""
    shim = (f"import runpy, sys\n"
            f"for name in {tuple(blocked)!r}:\n    sys.modules[name] = None\n"
            f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
            f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
            f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", shim, *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)


def expected_rows(cuda: bool = False) -> set[tuple]:
    """(check, case) of every row of the tiny run, in the script's vocabulary."""
    rows = {("seeds", p, None) for p in PRECISIONS}
    rows |= {("train", p, b, cl) for p in PRECISIONS for b in BATCHES for cl in (True, False)}
    rows |= {("diffusers", p, b, False) for p in PRECISIONS for b in BATCHES}
    rows |= {("sample", p, s) for p in PRECISIONS for s in ("ancestral", "ddim")}
    rows |= {("bound", "fp32", None), ("precision", "tf32 vs fp32", None),
             ("precision", "bf16 vs fp32", None)}
    rows |= {("compile", p, b, cuda) for p in PRECISIONS for b in BATCHES}  # as train_worker
    return rows


def row_key(row: dict) -> tuple:
    if row["check"] in ("train", "diffusers", "compile"):
        return row["check"], row["precision"], row["batch"], row["channels_last"]
    return row["check"], row["precision"], row.get("sampler")


def check_run(tmp_path: Path, done, diffusers: bool, cuda: bool = False) -> dict:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    payload = json.loads((tmp_path / "check.json").read_text())
    results = payload["results"]
    rows = results["rows"]
    assert sorted(map(row_key, rows), key=str) == sorted(expected_rows(cuda), key=str)
    for row in rows:
        if row["check"] == "diffusers" and not diffusers:
            assert row["status"] == "skipped"
            assert row["note"].startswith("skipped: diffusers not importable")
        else:
            assert row["status"] == "ok", row
    for row in rows:
        if "per_s" in row and row["status"] == "ok":  # no peak for a CPU
            assert row["per_s"] > 0 and (row["mfu"] is None) == (results["peak_tflops"] is None)
    seeds = {r["precision"]: r for r in rows if r["check"] == "seeds"}
    assert seeds["fp32"]["batches"] == [8, 3]
    assert seeds["fp32"]["equal"] is (seeds["fp32"]["pixels_differing"] == 0)
    if not cuda:  # the same kernels in every batch size here; on a GPU that is the question
        assert seeds["fp32"]["equal"] is True
    ancestral = next(r for r in rows if r.get("sampler") == "ancestral")
    assert ancestral["extrapolated"] and ancestral["chain_steps"] == results["num_timesteps"]
    for row in (r for r in rows if r["check"] == "precision"):
        assert row["images"] > 0 and 0 <= row["fraction_differing"] <= 1
        assert row["max_abs_diff"] >= row["mean_abs_diff"] >= 0
    if not cuda:
        assert results["peak"] == "unknown peak" and results["peak_tflops"] is None
    assert set(results["peak_table_tflops"]["H100"]) == set(PRECISIONS)
    assert results["flops_per_image"]["train_step"] > results["flops_per_image"]["forward"] > 0
    assert ("diffusers_forward" in results["flops_per_image"]) == diffusers
    assert payload["machine"]["torch"] == torch.__version__
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "check" and len(table) == 1 + len(rows)
    return results


def test_cpu_mode_writes_every_row_and_the_table(tmp_path):
    pytest.importorskip("diffusers")
    done = run_check(tmp_path, *TINY, "--json", "check.json")
    results = check_run(tmp_path, done, diffusers=True)
    assert results["diffusers_missing"] is None


def test_runs_where_only_torch_numpy_and_the_project_are_importable(tmp_path):
    """As on the GPU machine without the diffusers wheel: ray, mlflow, dvc, torch_fidelity and
    diffusers cannot be imported; the diffusers rows say so and every other row runs."""
    done = run_check(tmp_path, *TINY, "--json", "check.json", blocked=ABSENT + ("diffusers",))
    results = check_run(tmp_path, done, diffusers=False)
    assert "import of diffusers halted" in results["diffusers_missing"]


def test_without_a_gpu_it_stops_at_once_with_one_line_and_exit_code_2(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    done = run_check(tmp_path, "--json", "check.json", env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device (torch ")
    assert "cuda available: False" in lines[0] and done.stdout == ""
    assert not (tmp_path / "check.json").exists()
    assert time.monotonic() - start < 60


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def test_a_row_past_the_budget_is_stopped_and_later_rows_skipped(gpu_check, monkeypatch):
    monkeypatch.setitem(gpu_check.ESTIMATE_S, "seeds", 0.0)
    check = gpu_check.Check(exp=None, image_shape=(3, 8, 8), device=torch.device("cpu"),
                            sizes=gpu_check.TINY, budget=gpu_check.Budget(0.5), flops={},
                            peaks=None, compile_backend="eager", missing_diffusers=None)
    check.run({"check": "seeds"}, lambda: {"result": "ran"})
    check.run({"check": "seeds"}, lambda: 1 / 0)
    check.run({"check": "seeds"}, lambda: time.sleep(5))
    check.run({"check": "seeds"}, lambda: {"result": "ran"})
    ok, failed, stopped, skipped = check.rows
    assert ok["status"] == "ok" and ok["result"] == "ran"
    assert failed["status"] == "failed" and failed["note"].startswith("ZeroDivisionError")
    assert stopped["status"] == "skipped" and stopped["wall_s"] < 2
    assert stopped["note"] == "stopped: the time budget ran out in this row"
    assert skipped["status"] == "skipped" and skipped["note"].startswith("skipped: time budget")


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", "H100"),
                                        ("NVIDIA H100 PCIe", "H100 PCIe"),
                                        ("NVIDIA H100 NVL", "H100 NVL"),
                                        ("NVIDIA H200", "H200"),
                                        ("NVIDIA A100-SXM4-80GB", None)])
def test_the_peak_is_read_off_the_device_name(gpu_check, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_check.peak_of(torch.device("cuda"))[0] == peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_mode_on_the_gpu_runs_every_row(tmp_path):
    """A minute's check of every CUDA path (synchronization, generators on the device,
    channels_last, autocast, TF32 settings) before the real run."""
    done = run_check(tmp_path, "--device", "cuda", "--tiny", "--json", "check.json")
    check_run(tmp_path, done, diffusers=importlib.util.find_spec("diffusers") is not None,
              cuda=True)


def test_wheels_are_imported_from_their_zip(gpu_check, tmp_path, monkeypatch):
    """--wheels DIR: a pure-Python wheel (as diffusers') is importable from the .whl itself."""
    import zipfile

    monkeypatch.setattr(sys, "path", list(sys.path))
    with zipfile.ZipFile(tmp_path / "wheelpkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("wheelpkg/__init__.py", "ANSWER = 42\n")
    assert gpu_check.add_wheels(tmp_path) == [str(tmp_path / "wheelpkg-1.0-py3-none-any.whl")]
    import wheelpkg

    sys.modules.pop("wheelpkg")
    assert wheelpkg.ANSWER == 42 and ".whl" in wheelpkg.__file__
