"""Fixtures shared by the slow end-to-end tests.

`shared_study` is one tiny digits study reproduced with a real `dvc repro` in a temporary git
repository, built once per test session and read by test_stages.py (the end-to-end checks),
test_reliability.py (faults and determinism) and test_mlflow_ui.py (the browser). Its two
experiments cover what those tests need: `eps_simple` trains normally and keeps an EMA snapshot
at every checkpoint (`evaluate.checkpoints: all`), `mu_vlb_fixed` diverges on purpose (huge
learning rate, no clipping) and must end up "unstable" while the rest of the study completes.
Tests must not change it: they copy it, or rerun stages into their own temporary folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite runs Ray workers, stages and in-process training side by side on 2 cores: OpenMP's
# threads (torch's) spinning while they wait take the CPU from each other, which made a 60-step
# training test take 69 s instead of 12 s on a busy machine. Passive waiting changes no number.
# Set before anything imports torch; the stages and Ray workers the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STABLE = "eps_simple"
UNSTABLE = "mu_vlb_fixed"  # diverges on purpose
SHARED_EXPERIMENTS = (STABLE, UNSTABLE)
STABLE_KEY, UNSTABLE_KEY = f"{STABLE}-0", f"{UNSTABLE}-0"  # their runs (seed 0): stage suffixes


def shared_study_params(params: dict, experiments=SHARED_EXPERIMENTS) -> None:
    """The shared study's params.yaml, edited in place from the project's (a subset of its
    experiments keeps their settings, so a one-experiment study trains the same `eps_simple`)."""
    from helpers import tiny

    tiny(params, experiments=experiments, sampling_steps=True)
    params["evaluate"].update(checkpoints="all", checkpoint_num_samples=40)
    if UNSTABLE in experiments:
        params["experiments"][UNSTABLE]["train"] = {"lr": 1.0e6, "grad_clip": 1.0e12}


@pytest.fixture(scope="session")
def shared_study(tmp_path_factory) -> Path:
    """The shared tiny study after one uninterrupted `dvc repro` under one local Ray instance,
    as `make study` runs it (a few minutes; test_stages.py runs a plain `dvc repro` too).
    Beside it: `first_repro_s`, its wall time, `first_repro.stdout` and `.stderr`, what it
    printed, and `scratch_left`, the training workers' scratch
    folders (`ddpm-rank*` in the temporary folder) that it left behind, one per line. The
    temporary folder is the study's own (TMPDIR; Ray's sessions stay in /tmp, whose short path
    its sockets need), so that other work on the machine does not count."""
    import sys
    import time

    from helpers import make_study_repo, sh

    root = tmp_path_factory.mktemp("shared")
    temp = root / "tmp"
    temp.mkdir()

    def scratch() -> set[Path]:
        return set(temp.glob("ddpm-rank*"))

    repo = make_study_repo(root, shared_study_params)
    before = scratch()
    start = time.monotonic()
    proc = sh([sys.executable, "-m", "stages.local_ray", "dvc", "repro"], repo, timeout=1800,
              extra={"TMPDIR": str(temp), "RAY_TMPDIR": "/tmp"})
    (repo.parent / "first_repro_s").write_text(f"{time.monotonic() - start:.1f}")
    (repo.parent / "first_repro.stdout").write_text(proc.stdout)
    (repo.parent / "first_repro.stderr").write_text(proc.stderr)
    (repo.parent / "scratch_left").write_text("".join(f"{p}\n" for p in sorted(scratch() - before)))
    return repo
