"""A trained run one call away (pipeline/measure/trained.py; pipeline/artifacts/logged_model.py
and `Tracker.log_torch_model` and `load_torch_model` of pipeline/core/tracking.py): the snippets
of docs/dvc.md run as written, the sample stage's images drawn again, the refusals, and the EMA
model the train stage's record logs to MLflow, loaded back by `mlflow.pytorch.load_model` and
sampling the images of models/<E>-<S>/."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import PROJECT, png_pixels

KEY = "eps_simple-0"
DOC = PROJECT / "docs" / "dvc.md"
SECTION = "## Using a trained model"


def doc_snippets(doc: Path = DOC) -> list[str]:
    """The python blocks of `doc`'s section "Using a trained model" (docs/dvc.md, README.md),
    in order."""
    text = doc.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def tiny_params() -> dict:
    """The project's params.yaml as a one-run study that trains in seconds: 8x8 digits, T = 20,
    4 steps of a small U-Net; 24 samples in chunks of 8."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["diffusion"]["num_timesteps"] = 20
    params["sampling_steps"].update(ddim_steps=[5, 10])
    params["model"].update(ch=16)
    params["train"].update(steps=4, batch_size=16, log_every=2, checkpoint_every=4,
                           warmup_steps=1)
    params["train"]["cpus_per_worker"] = 1.0
    params["sample"].update(num_samples=24, batch_size=8, grid_size=4, cpus_per_worker=1.0)
    params["experiments"] = {"eps_simple": params["experiments"]["eps_simple"]}
    params.pop("sweep", None)
    return params


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here, as the stage's workers of these params have (cpus_per_worker 1):
    two threads on a busy 2-core machine wait on each other for most of a tiny network's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder holding params.yaml and models/eps_simple-0/ as the train stage writes it, from
    the shared training loop run here (no Ray); beside it `training/state.pt`, the final state."""
    from pipeline.artifacts.models import write_model_dir
    from pipeline.training.loop import STATE_FILE, LocalSession, train_worker
    from pipeline.core.params import load_params
    from pipeline.data.datasets import prepare_dataset, prepared_path

    root = tmp_path_factory.mktemp("checkout")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    params = load_params(root / "params.yaml")
    exp = params.experiment("eps_simple", 0)
    prepare_dataset(params.data, root / "data", seed=0)
    session = LocalSession(root / "training")
    train_worker(exp, prepared_path(root / "data", "digits", "train"), session,
                 checkpoint_root=root / "training")
    shutil.copyfile(session.latest_checkpoint() / STATE_FILE, root / "training" / "state.pt")
    state = torch.load(root / "training" / "state.pt", weights_only=False)
    write_model_dir(root / "models" / KEY, state, {"config_hash": exp.config_hash()})
    return root


def experiment(checkout: Path):
    from pipeline.core.params import load_params

    return load_params(checkout / "params.yaml").experiment("eps_simple", 0)


@pytest.mark.parametrize("doc", [DOC, PROJECT / "README.md"], ids=["docs/dvc.md", "README.md"])
def test_the_documented_snippet_runs_as_written(checkout, monkeypatch, doc):
    """The first block of docs/dvc.md's and of the README's "Using a trained model", run in a
    checkout: 16 images of the data's levels, the same at every call with one seed and others
    with another, and their grid as a PNG."""
    from pipeline import load_run

    monkeypatch.chdir(checkout)
    (checkout / "eps_simple-0.png").unlink(missing_ok=True)
    scope: dict = {}
    exec(doc_snippets(doc)[0], scope)
    images = scope["images"]
    assert images.dtype == np.uint8 and images.shape == (16, 1, 8, 8)
    levels = {round(k * 255 / 16) for k in range(17)}  # digits: 17 grey levels
    assert set(np.unique(images).tolist()) <= levels and len(np.unique(images)) > 2
    again = load_run(KEY)
    assert np.array_equal(again.sample(16, seed=0), images)
    assert not np.array_equal(again.sample(16, seed=1), images)
    grid = png_pixels(checkout / "eps_simple-0.png")
    assert grid.shape[0] == grid.shape[1] >= 4 * 8  # 4 x 4 tiles of 8 x 8, upscaled


def test_sampling_without_a_seed_draws_the_sample_stages_first_images(checkout):
    """run.sample(n) with the stage's seed: the first n images of samples.npz as the sample
    stage's job makes them (3 chunks of 8, here in one process), across chunk boundaries."""
    from pipeline.artifacts.models import read_model_info
    from pipeline.artifacts.samples import load_samples, save_samples
    from pipeline.measure.chunks import run_here
    from pipeline.jobs.sample_job import sample_job
    from pipeline.measure.trained import load_run

    exp = experiment(checkout)
    model_dir = checkout / "models" / KEY
    info = read_model_info(model_dir, exp)
    job = sample_job(exp, model_dir, info)
    assert len(job.chunks) == 3
    parts = run_here(job).of(job.chunks)
    folder = checkout / "samples" / KEY
    folder.mkdir(parents=True, exist_ok=True)
    save_samples(folder, np.concatenate([p["images"] for p in parts]), "ok", (1, 8, 8))
    stage, _ = load_samples(folder, exp)

    run = load_run(KEY, params=checkout / "params.yaml")
    assert run.sample_seed == exp.seed + 1 == job.chunks[0].args["seed"]
    images = run.sample(20)
    assert images.shape == (20, 1, 8, 8)
    assert np.array_equal(images, stage[:20])
    assert not np.array_equal(run.sample(20, seed=run.sample_seed + 1), stage[:20])


def one_line_error(error, *needles):
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_bad_key_or_folder_is_refused_in_one_line_naming_the_fix(checkout, tmp_path):
    from pipeline.artifacts.models import ModelError
    from pipeline.measure.trained import UnknownRun, load_run

    params = checkout / "params.yaml"
    with pytest.raises(UnknownRun) as error:
        load_run("eps_simpel-0", params=params)
    one_line_error(error, "no run 'eps_simpel-0'", "its runs", KEY, str(params))
    with pytest.raises(ModelError) as error:
        load_run(KEY, params=params, models=tmp_path / "models")
    one_line_error(error, str(tmp_path / "models" / KEY / "state.json"), "not found",
                   f"dvc repro train@{KEY}")

    # a folder trained with other params, and one whose training diverged
    other = tmp_path / "params.yaml"
    raw = tiny_params()
    raw["train"]["lr"] = 1e-3
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelError) as error:
        load_run(KEY, params=other, models=checkout / "models")
    one_line_error(error, "trained with other params", str(other), f"dvc repro train@{KEY}")
    diverged = tmp_path / "diverged"
    shutil.copytree(checkout / "models", diverged)
    state = diverged / KEY / "state.json"
    state.write_text(state.read_text().replace('"status": "ok"', '"status": "unstable"'))
    with pytest.raises(ModelError) as error:
        load_run(KEY, params=params, models=diverged)
    one_line_error(error, "diverged", "'unstable'", "no model to sample")


def test_import_pipeline_imports_neither_torch_nor_mlflow():
    import subprocess
    import sys

    from helpers import env_for

    code = ("import sys, pipeline; assert 'torch' not in sys.modules and 'mlflow' not in "
            "sys.modules; from pipeline import load_run, TrainedModel; "
            "assert 'torch' in sys.modules and load_run.__module__ == 'pipeline.measure.trained'")
    subprocess.run([sys.executable, "-c", code], env=env_for(PROJECT), check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# The EMA model in the run's MLflow record
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(checkout):
    """The train stage's MLflow record of the run (`log_training`) in the checkout's sqlite
    store (params.yaml's tracking section): (tracker, MLflow run id)."""
    from pipeline.core.params import load_params
    from pipeline.core.tracking import Tracker
    from pipeline.jobs.train_job import TrainedRun, log_training

    params = load_params(checkout / "params.yaml")
    exp = params.experiment("eps_simple", 0)
    tracker = Tracker(params.tracking, params.study, checkout)
    assert tracker.tracking_uri == f"sqlite:///{checkout / 'mlflow.db'}"
    run_id = tracker.run_of(exp)
    state = torch.load(checkout / "training" / "state.pt", weights_only=False)
    run = TrainedRun(exp=exp, model_dir=checkout / "models" / KEY, state=state,
                     run_name="tiny", images_per_s=1.0, wall_s=1.0, snapshots={})
    log_training(tracker, run_id, run)
    return tracker, run_id


@pytest.fixture
def mlflow_here(logged, monkeypatch):
    """MLflow's own functions pointed at the checkout's store, as a researcher sets them."""
    tracker, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)


def test_the_train_record_logs_the_ema_model_that_mlflow_loads_back(checkout, logged,
                                                                    mlflow_here):
    import mlflow.pytorch

    from pipeline.artifacts.models import load_model

    tracker, run_id = logged
    outputs = tracker.client.get_run(run_id).outputs.model_outputs
    assert len(outputs) == 1
    model = tracker.client.get_logged_model(outputs[0].model_id)
    assert model.name == "ema" and model.source_run_id == run_id
    assert model.experiment_id == tracker.experiment_id
    assert model.tags["ddpm.experiment"] == "eps_simple" and model.tags["ddpm.seed"] == "0"

    net = mlflow.pytorch.load_model(f"runs:/{run_id}/ema")
    ema = load_model(experiment(checkout), checkout / "models" / KEY)
    assert not isinstance(net, type(ema))  # a torch.export program: no project class pickled
    x_t, t = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 7, 12, 19])
    with torch.no_grad():
        assert torch.equal(net(x_t, t), ema(x_t, t))
    for key, value in ema.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_the_logged_model_samples_the_images_of_the_models_folder(checkout, logged,
                                                                 monkeypatch):
    """load_logged_model, by the MLflow run's id and by the model's URI, gives the run's
    experiment and the images of load_run, and leaves MLflow's settings as they were; the
    second documented block runs as written."""
    import mlflow

    from pipeline.measure.trained import load_logged_model, load_run

    tracker, run_id = logged
    params = checkout / "params.yaml"
    here = load_run(KEY, params=params)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    from_run = load_logged_model(run_id, params=params)
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == before
    assert before != tracker.tracking_uri
    assert from_run.exp == here.exp and from_run.source == f"runs:/{run_id}/ema"
    assert np.array_equal(from_run.sample(12, seed=5), here.sample(12, seed=5))
    assert np.array_equal(from_run.sample(12), here.sample(12))
    model_id = tracker.client.get_run(run_id).outputs.model_outputs[0].model_id
    by_uri = load_logged_model(f"models:/{model_id}", params=params)
    assert np.array_equal(by_uri.sample(4, seed=2), here.sample(4, seed=2))

    snippet = doc_snippets()[1]
    assert "<run id>" in snippet
    scope: dict = {}
    monkeypatch.chdir(checkout)
    exec(snippet.replace("<run id>", run_id), scope)
    assert np.array_equal(scope["images"], here.sample(16, seed=0))


def test_a_model_the_store_does_not_hold_is_one_line(checkout, logged):
    from pipeline.core.tracking import LoggedModelError
    from pipeline.measure.trained import load_logged_model

    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(LoggedModelError) as error:
        load_logged_model(missing, params=checkout / "params.yaml")
    one_line_error(error, f"runs:/{missing}/ema", "not in the MLflow store", "mlflow ui")


def test_a_diverged_run_logs_no_model(checkout, logged):
    from pipeline.jobs.train_job import TrainedRun, log_training

    tracker, _ = logged
    exp = experiment(checkout)
    run_id = tracker.run_for("diverged", {"config_hash": "x"}, 0)
    state = torch.load(checkout / "training" / "state.pt", weights_only=False)
    run = TrainedRun(exp=exp, model_dir=checkout / "models" / KEY,
                     state={**state, "status": "unstable"}, run_name="tiny",
                     images_per_s=None, wall_s=1.0, snapshots={})
    log_training(tracker, run_id, run)
    assert tracker.client.get_run(run_id).data.tags["ddpm.status"] == "unstable"
    assert not tracker.client.get_run(run_id).outputs.model_outputs


def test_a_stage_run_again_replaces_the_runs_logged_model(checkout, logged, mlflow_here):
    """Logged twice into one run (the train stage run again): one `ema` model is left, the
    second, and runs:/<run id>/ema loads its weights."""
    import mlflow.pytorch

    from pipeline.artifacts.logged_model import log_ema_model

    tracker, _ = logged
    exp = experiment(checkout)
    run_id = tracker.run_for("relogged", {"config_hash": "y"}, 0)
    first = log_ema_model(tracker, run_id, exp, checkout / "models" / KEY)
    changed = checkout / "relogged"  # the folder trained again, to other weights
    shutil.copytree(checkout / "models", changed)
    weights = torch.load(changed / KEY / "ema.pt")
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    torch.save(weights, changed / KEY / "ema.pt")
    second = log_ema_model(tracker, run_id, exp, changed / KEY)
    kept = tracker.client.search_logged_models(
        [tracker.experiment_id], filter_string=f"name = 'ema' AND source_run_id = '{run_id}'")
    assert [f"models:/{m.model_id}" for m in kept] == [second] != [first]
    net = mlflow.pytorch.load_model(f"runs:/{run_id}/ema")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
