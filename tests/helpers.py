"""Builders of small test data in the real formats, tiny studies in fresh git repositories, the
environment commands run in, and assertions shared by test modules (import as
`from helpers import ...`; tests/ is on sys.path). Heavy libraries (torch, Ray, MLflow, pandas)
are imported inside the functions that need them.

The stand-in feature extractor lives in helpers_metrics.py: the pipeline loads it by name
(`helpers_metrics:TinyConvExtractor`) and it subclasses a torch-fidelity class, so it cannot be
imported without torch."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline.core.logs import LIBRARY_SETTINGS, VERBOSE_ENV

PROJECT = Path(__file__).resolve().parents[1]  # read at call time: a script may point it elsewhere
TESTS = Path(__file__).resolve().parent
COPIED = ("pipeline", "stages", "calibration", "dvc.yaml", ".dvcignore", ".gitignore",
          "params.yaml")
# Settings that point a command at a developer's own services: removed by env_for.
SERVICE_SETTINGS = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DDPM_STORAGE")
# With env_for(..., isolated=True), every variable with one of these prefixes is removed too.
ISOLATED_PREFIXES = ("RAY_", "MLFLOW_", "AWS_", "DDPM_")
# What a stage run in this process (tests that call a stage's main) leaves in os.environ to
# quiet or unquiet the libraries: each command decides that for itself.
QUIET_SETTINGS = (*LIBRARY_SETTINGS, VERBOSE_ENV)

CIFAR10_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                   b"dog", b"frog", b"horse", b"ship", b"truck"]


def make_cifar10_archive(path: str | Path, n_train: int = 250, n_test: int = 50, seed: int = 0,
                         *, image_bytes: int = 3072) -> dict[str, np.ndarray]:
    """Write a small `cifar-10-python.tar.gz` in the real format; return what it holds.

    The archive has `cifar-10-batches-py/` with `data_batch_1..5` (n_train images spread over
    them), `test_batch` and `batches.meta`; each batch is a pickled dict with the real keys
    (b'batch_label', b'labels', b'data' N x 3072 uint8 as R, G, B planes, b'filenames').
    `image_bytes` other than 3072 writes batches of the wrong shape.
    Returns {"train_data", "train_labels", "test_data", "test_labels"} (data as N x 3072).
    """
    rng = np.random.default_rng(seed)
    train_data = rng.integers(0, 256, size=(n_train, image_bytes), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=n_train).astype(np.int64)
    test_data = rng.integers(0, 256, size=(n_test, image_bytes), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=n_test).astype(np.int64)

    members: dict[str, dict] = {}
    bounds = np.linspace(0, n_train, 6).astype(int)
    for i in range(5):
        lo, hi = bounds[i], bounds[i + 1]
        members[f"data_batch_{i + 1}"] = _batch(f"training batch {i + 1} of 5",
                                                train_data[lo:hi], train_labels[lo:hi])
    members["test_batch"] = _batch("testing batch 1 of 1", test_data, test_labels)
    members["batches.meta"] = {b"num_cases_per_batch": int(bounds[1]),
                               b"label_names": CIFAR10_CLASSES, b"num_vis": image_bytes}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"train_data": train_data, "train_labels": train_labels,
            "test_data": test_data, "test_labels": test_labels}


def _batch(label: str, data: np.ndarray, labels: np.ndarray) -> dict:
    return {b"batch_label": label.encode(), b"labels": [int(v) for v in labels],
            b"data": data, b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(data))]}


def make_image_folder(path: str | Path, n: int, size: tuple[int, int] | int = (12, 10),
                      seed: int = 0) -> list[Path]:
    """Write `n` random RGB PNGs of `size` (width, height) under `path`, some in a subfolder."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    path = Path(path)
    files = []
    for i in range(n):
        folder = path / "sub" if i % 2 else path
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        file = folder / f"image_{i:03d}.png"
        Image.fromarray(pixels).save(file)
        files.append(file)
    return files


def png_pixels(path: str | Path) -> np.ndarray:
    """The PNG at `path` as an H x W x 3 uint8 RGB array (failing if it is not a PNG)."""
    with Image.open(path) as image:
        assert image.format == "PNG", (path, image.format)
        return np.asarray(image.convert("RGB"))


def pixels_of_colour(pixels: np.ndarray, colour, tolerance: int = 40) -> np.ndarray:
    """Mask of the pixels within `tolerance` (summed over R, G, B, 0..255) of `colour`, a
    matplotlib colour such as "tab:blue"."""
    from matplotlib.colors import to_rgb

    target = np.round(np.array(to_rgb(colour)) * 255).astype(int)
    return np.abs(pixels[..., :3].astype(int) - target).sum(axis=-1) < tolerance


def assert_refused(raw, needles):
    """`raw` parses if `needles` is empty; else it is refused in one short line that holds
    every needle."""
    import pytest

    from pipeline.core.config import ConfigError
    from pipeline.core.params import parse_params

    if not needles:
        parse_params(raw)
        return
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    for needle in needles:
        assert needle in message, (needle, message)


def run_record(metrics_dir: str | Path, key: str) -> dict:
    """A run's metrics/<key>.json and metrics/<key>_run.json as one dict, checking that the
    first (the file DVC compares) holds numbers only."""
    metrics_dir = Path(metrics_dir)
    numbers = json.loads((metrics_dir / f"{key}.json").read_text())
    text = {k: v for k, v in numbers.items()
            if isinstance(v, bool) or not isinstance(v, (int, float))}
    assert not text, f"{key}.json holds more than numbers: {text}"
    return {**json.loads((metrics_dir / f"{key}_run.json").read_text()), **numbers}


# --------------------------------------------------------------------------------------------
# Running the project's commands, and tiny studies in fresh git repositories
# --------------------------------------------------------------------------------------------


def env_for(repo: Path | None = None, *, isolated: bool = False,
            extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to run the project's commands in.

    The venv's bin first on PATH, Ray without authentication, a git identity, and PYTHONPATH =
    `repo` (the pipeline code to run), tests/ (none without `repo`). MLFLOW_TRACKING_URI,
    RAY_ADDRESS and DDPM_STORAGE are removed, so a command uses the study's own MLflow, a Ray
    instance of its own and its own checkpoint storage; with `isolated`, so is every RAY_*, MLFLOW_*, AWS_* and DDPM_* variable (for tests that
    start their own servers and pass their settings). `extra` is applied last.
    """
    env = dict(os.environ)
    for key in list(env):
        if key in SERVICE_SETTINGS or key in QUIET_SETTINGS or key == "PYTHONPATH" or (
                isolated and key.startswith(ISOLATED_PREFIXES)):
            del env[key]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    if repo is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(repo), str(TESTS)])
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "study"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "study@example.invalid"
    return {**env, **(extra or {})}


def sh(args, repo: Path, check=True, timeout=900,
       extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`args` run in `repo` with env_for(repo, extra=extra); with `check`, a failure shows its
    output."""
    proc = subprocess.run(args, cwd=repo, env=env_for(repo, extra=extra), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_study_repo(root: Path, edit) -> Path:
    """A fresh git repo holding the project's pipeline with a params.yaml changed by `edit`."""
    repo = root / "study"
    repo.mkdir()
    for name in COPIED:
        src = PROJECT / name
        if not src.exists():
            continue   # calibration/: a checkout may have none yet (tabulate then widens nothing)
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy2(PROJECT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(PROJECT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the charts' template
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "study"], repo)
    return repo


def tiny(params, experiments=("eps_simple", "mu_vlb_fixed"), sampling_steps=False):
    """Edit the project's params in place into a tiny digits study (T = 20, 40 steps) of
    `experiments` (the first is the sweep's base, and with `sampling_steps` the run measured
    against sampling steps: DDIM at 5 and 10 steps, ancestral at 20; else none is)."""
    params["diffusion"]["num_timesteps"] = 20
    params["train"].update(steps=40, batch_size=32, log_every=10, checkpoint_every=20,
                           warmup_steps=5)
    params["sample"].update(num_samples=60, batch_size=60, grid_size=6)
    params["evaluate"].update(nll_num_images=20, classifier_steps=300,
                              is_splits=2, reference_draws=3)
    params["experiments"] = {k: params["experiments"][k] for k in experiments}
    params["sweep"].update(base_experiment=experiments[0], schedules=["linear", "cosine"],
                           weightings=["uniform"], steps=20, report_every=10,
                           grace_period=10, val_images=20, val_strata=5,
                           fid_num_samples=50, fid_steps=5)
    params["sampling_steps"].update(experiments=[experiments[0]] if sampling_steps else [],
                                    ddim_steps=[5, 10])


def mlflow_runs(repo: Path):
    """An MlflowClient on the study's mlflow.db, and the runs (mlflow Run objects) of its
    `ddpm-digits` experiment."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm-digits")
    assert experiment is not None, "the study's MLflow experiment was not created"
    return client, client.search_runs([experiment.experiment_id])


# The six rows of the paper's Table 2 as params.yaml's experiments, in its order (not the
# table's): the synthetic studies of test_tables.py and test_calibration.py.
SIX = {
    "eps_simple": dict(mean_type="eps", var_type="fixed_large", loss="simple"),
    "mu_vlb_learned": dict(mean_type="mu", var_type="learned", loss="vlb"),
    "mu_vlb_fixed": dict(mean_type="mu", var_type="fixed_large", loss="vlb"),
    "mu_simple": dict(mean_type="mu", var_type="fixed_large", loss="simple"),
    "eps_vlb_learned": dict(mean_type="eps", var_type="learned", loss="vlb"),
    "eps_vlb_fixed": dict(mean_type="eps", var_type="fixed_large", loss="vlb"),
}
