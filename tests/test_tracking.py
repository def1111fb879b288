"""pipeline.core.tracking against real MLflow sqlite stores in temp dirs.

Creating a fresh MLflow sqlite database runs ~50 schema migrations (seconds), so one database is
migrated once per session and copied into each test's root as `mlflow.db`.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core import tracking, tracking_store
from pipeline.core.config import StudyConfig, TrackingConfig
from pipeline.core.tracking import Tracker
from pipeline.core.tracking_store import TrackingError, resolve_artifact_root, resolve_tracking_uri

STUDY = StudyConfig(name="ddpm-test")
CONFIG = {"name": "eps_simple", "diffusion": {"mean_type": "eps", "loss": "simple"},
          "train": {"lr": 0.0002, "steps": 10}}


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def root(tmp_path, migrated_db) -> Path:
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return tmp_path


def _tracker(root: Path) -> Tracker:
    return Tracker(TrackingConfig(), STUDY, root)


def _client(tracker: Tracker):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.tracking_uri)


# -- URIs -------------------------------------------------------------------------------------


def test_relative_sqlite_uri_is_resolved_against_root(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = TrackingConfig(tracking_uri="sqlite:///db/mlflow.db", artifact_root="art")
    assert resolve_tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/db/mlflow.db"
    assert resolve_artifact_root(cfg, tmp_path) == (tmp_path.resolve() / "art").as_uri()
    absolute = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/x.db")  # sqlite:////tmp/...
    assert resolve_tracking_uri(absolute, Path("/elsewhere")) == absolute.tracking_uri
    http = TrackingConfig(tracking_uri="http://127.0.0.1:5000", artifact_root="s3://bucket/a")
    assert resolve_tracking_uri(http, tmp_path) == "http://127.0.0.1:5000"
    assert resolve_artifact_root(http, tmp_path) == "s3://bucket/a"


def test_tracking_uri_from_the_environment_with_an_unusable_scheme_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    tracker = Tracker(TrackingConfig(), STUDY, ".")
    with pytest.raises(TrackingError, match=r"^MLFLOW_TRACKING_URI: 'file:///tmp/mlruns' has "
                                            r"scheme 'file', not a store MLflow can track into"):
        tracker.check_reachable()


def test_dvc_root_is_where_a_queued_experiment_keeps_its_records(tmp_path, monkeypatch):
    """A queued DVC experiment runs in a temporary copy of the repo; DVC_ROOT names the user's
    repo, where relative tracking paths must land (else the runs vanish with the copy)."""
    copy, repo = tmp_path / "copy", tmp_path / "repo"
    copy.mkdir(), repo.mkdir()
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert Tracker(TrackingConfig(), STUDY, copy).tracking_uri == f"sqlite:///{copy}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    tracker = Tracker(TrackingConfig(artifact_root="mlartifacts"), STUDY, copy)
    assert tracker.tracking_uri == f"sqlite:///{repo}/mlflow.db"
    assert tracker.artifact_location == (repo / "mlartifacts" / "ddpm-test").as_uri()


def test_each_dvc_experiment_has_runs_of_its_own(root, monkeypatch):
    """Runs made inside a DVC experiment carry its name (DVC_EXP_NAME) and are found again by
    it; the same config in another experiment, or outside any, gets another run."""
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    plain = _tracker(root).run_for("eps_simple", CONFIG)
    runs = {}
    for name in ("exp-a", "exp-b"):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        runs[name] = _tracker(root).run_for("eps_simple", CONFIG)
        assert _tracker(root).run_for("eps_simple", CONFIG) == runs[name]
        study = _tracker(root).study_run()
        tags = _client(_tracker(root)).get_run(study).data.tags
        assert tags["dvc.exp_name"] == name
    assert len({plain, *runs.values()}) == 3
    client = _client(_tracker(root))
    assert client.get_run(runs["exp-a"]).data.tags["dvc.exp_name"] == "exp-a"
    assert "dvc.exp_name" not in client.get_run(plain).data.tags
    monkeypatch.delenv("DVC_EXP_NAME")
    assert _tracker(root).run_for("eps_simple", CONFIG) == plain


def test_env_var_overrides_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    expected = f"sqlite:///{tmp_path.resolve()}/other.db"
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://tracking.example:5000"


def test_a_tracking_server_keeps_artifacts_where_it_is_told(tmp_path, monkeypatch):
    """With an `mlflow server`, a local artifact root would be a folder of whichever machine
    logs (a Ray job's temporary copy): the server's own artifact store is used instead; an
    artifact root that is a URI is kept."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert Tracker(TrackingConfig(), STUDY, tmp_path).artifact_location is None
    shared = Tracker(TrackingConfig(artifact_root="s3://bucket/mlflow"), STUDY, tmp_path)
    assert shared.artifact_location == "s3://bucket/mlflow/ddpm-test"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    local = Tracker(TrackingConfig(), STUDY, tmp_path).artifact_location
    assert local == (tmp_path.resolve() / "mlartifacts" / "ddpm-test").as_uri()


def test_config_hash_is_stable_and_order_free():
    reordered = {"train": {"steps": 10, "lr": 0.0002}, "diffusion": CONFIG["diffusion"],
                 "name": "eps_simple"}
    assert tracking.config_hash(CONFIG) == tracking.config_hash(reordered)
    assert tracking.config_hash(CONFIG) != tracking.config_hash({**CONFIG, "name": "other"})
    assert len(tracking.config_hash(CONFIG)) == 12


def test_git_commit_outside_a_repository_is_none(tmp_path):
    assert tracking.git_commit(tmp_path) is None


# -- reachability -----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = _tracker(tmp_path)
    start = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        tracker.check_reachable(timeout_s=2)
    assert time.monotonic() - start < 10


def test_sqlite_folder_that_cannot_be_created_fails(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/a_file/sub/mlflow.db"
    tracker = Tracker(TrackingConfig(tracking_uri=uri), STUDY, tmp_path)
    with pytest.raises(TrackingError, match="a_file/sub"):
        tracker.check_reachable()


def test_sqlite_folder_is_created(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri="sqlite:///new/dir/mlflow.db"), STUDY, tmp_path)
    tracker.check_reachable()
    assert (tmp_path / "new" / "dir").is_dir()


# -- runs -------------------------------------------------------------------------------------


def test_run_for_is_shared_between_stage_processes(root, monkeypatch):
    monkeypatch.setattr(tracking, "git_commit", lambda _root: "0123abcd")
    train, sample = _tracker(root), _tracker(root)  # two stages, two Tracker instances
    run_id = train.run_for("eps_simple", CONFIG)
    assert sample.run_for("eps_simple", CONFIG) == run_id
    assert sample.run_for("x0_simple", CONFIG) != run_id

    run = _client(train).get_run(run_id)
    experiment = _client(train).get_experiment(run.info.experiment_id)
    assert experiment.name == STUDY.name
    assert experiment.artifact_location == (root.resolve() / "mlartifacts" / "ddpm-test").as_uri()
    assert run.info.run_name == "eps_simple-0"  # experiment-seed
    assert run.data.tags["ddpm.experiment"] == "eps_simple"
    assert run.data.tags["ddpm.seed"] == "0"
    assert train.run_for("eps_simple", CONFIG, seed=1) != run_id  # another seed, another run
    assert run.data.tags["ddpm.config_hash"] == tracking.config_hash(CONFIG)
    assert run.data.tags["git.commit"] == run.data.tags["mlflow.source.git.commit"] == "0123abcd"


def test_changed_config_starts_a_new_run_and_keeps_the_old(root):
    tracker = _tracker(root)
    old = tracker.run_for("eps_simple", CONFIG)
    changed = {**CONFIG, "train": {"lr": 0.001, "steps": 10}}
    new = _tracker(root).run_for("eps_simple", changed)
    assert new != old
    assert _tracker(root).run_for("eps_simple", changed) == new
    assert _client(tracker).get_run(old).info.lifecycle_stage == "active"


def test_deleted_run_is_not_reused(root):
    tracker = _tracker(root)
    old = tracker.run_for("eps_simple", CONFIG)
    _client(tracker).delete_run(old)
    assert tracker.run_for("eps_simple", CONFIG) != old


def test_study_run_and_nested_runs(root):
    tracker = _tracker(root)
    study = tracker.study_run()
    assert _tracker(root).study_run() == study
    assert _client(tracker).get_run(study).info.run_name == "tables"

    sweep = tracker.run_for("sweep", {"sweep": 1})
    trial = tracker.nested_run(sweep, "trial_0", {"schedule": "cosine"})
    run = _client(tracker).get_run(trial)
    assert run.data.tags["mlflow.parentRunId"] == sweep
    assert run.data.tags["schedule"] == "cosine"
    assert run.info.run_name == "trial_0"
    assert tracker.run_for("sweep", {"sweep": 1}) == sweep  # trials never match run_for


# -- logging ----------------------------------------------------------------------------------


def test_params_are_flattened_and_relogging_is_idempotent(root, caplog):
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    tracker.log_params(run_id, CONFIG)
    tracker.log_params(run_id, CONFIG)  # same values again: no error, no change
    params = _client(tracker).get_run(run_id).data.params
    assert params == {"name": "eps_simple", "diffusion.mean_type": "eps",
                      "diffusion.loss": "simple", "train.lr": "0.0002", "train.steps": "10"}

    tracker.log_params(run_id, {"train": {"lr": 0.001}, "x" * 3: "y" * 7000})
    run = _client(tracker).get_run(run_id)
    assert run.data.params["train.lr"] == "0.0002"  # the first value stays
    assert run.data.tags["ddpm.param_changed.train.lr"] == "0.001"
    assert run.data.params["xxx"] == "y" * 6000
    assert "train.lr" in caplog.text


def test_metric_history_round_trips(root):
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    steps = list(range(0, 2500, 1))  # more than one batch of 1000
    values = [1.0 / (1 + s) for s in steps]
    tracker.log_metric_history(run_id, "train/loss", steps, values)
    tracker.log_metric_history(run_id, "train/loss", steps[:10], values[:10])  # already there
    history = sorted(_client(tracker).get_metric_history(run_id, "train/loss"),
                     key=lambda m: m.step)
    assert [m.step for m in history] == steps
    assert [m.value for m in history] == pytest.approx(values)

    tracker.log_metrics(run_id, {"fid": 12.5, "is_mean": 3.0, "kid": None}, step=7)
    metrics = _client(tracker).get_run(run_id).data.metrics
    assert metrics["fid"] == 12.5 and metrics["is_mean"] == 3.0 and "kid" not in metrics


def test_tags_and_termination(root):
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    tracker.set_tags(run_id, {"status": "unstable", "step": 12})
    tracker.set_terminated(run_id, "FAILED")
    run = _client(tracker).get_run(run_id)
    assert run.data.tags["status"] == "unstable" and run.data.tags["step"] == "12"
    assert run.info.status == "FAILED"
    tracker.log_metrics(run_id, {"late": 1.0})  # a later stage may still log into it


def test_metric_stream_skips_the_steps_a_run_already_holds(root):
    """A resumed training reports again the steps since its last checkpoint: the stream of the
    rerun (made once, reading the run's last train_loss step) logs only the new ones, and it
    still works after travelling pickled (to the Ray Train controller)."""
    import pickle

    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    assert tracker.last_step(run_id, "train_loss") is None
    first = tracker.metric_stream(run_id, resume_key="train_loss")
    for step in (5, 10, 15, 20, 25, 30):  # killed after step 30, last checkpoint at step 20
        assert first.log(step, {"train_loss": 1.0 / step, "grad_norm": 2.0, "lr": None})
    assert tracker.last_step(run_id, "train_loss") == 30
    rerun = pickle.loads(pickle.dumps(tracker.metric_stream(run_id, resume_key="train_loss")))
    assert rerun.after_step == 30 and rerun._client is None
    logged = [rerun.log(step, {"train_loss": 1.0 / step, "grad_norm": 3.0})
              for step in (25, 30, 35, 40)]
    assert logged == [False, False, True, True]
    assert not rerun.log(35, {"train_loss": 0.0})  # a worker group restarted within the run
    client = _client(tracker)
    for name in ("train_loss", "grad_norm"):
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert sorted(steps) == [5, 10, 15, 20, 25, 30, 35, 40] and len(set(steps)) == len(steps)
    assert "lr" not in client.get_run(run_id).data.metrics  # None: not measured
    # the final record logs the whole curve: the streamed points are not logged again
    tracker.log_metric_history(run_id, "train_loss", list(range(5, 45, 5)), [0.5] * 8)
    assert len(client.get_metric_history(run_id, "train_loss")) == 8


def test_metric_stream_survives_an_unusable_store(tmp_path):
    """A tracking error while training streams is a warning; training goes on."""
    stream = tracking.MetricStream(f"sqlite:///{tmp_path}/missing/dir/x.db", "no-such-run")
    assert not stream.log(5, {"train_loss": 1.0})
    assert stream.after_step is None


def _monitor_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


@pytest.mark.parametrize("ending, status", [(None, "FINISHED"), (ValueError, "FAILED"),
                                            (KeyboardInterrupt, "KILLED"),
                                            (SystemExit, "KILLED")])
def test_live_run_is_running_with_system_metrics_then_ends_with_its_status(
        root, monkeypatch, ending, status):
    """RUNNING while the stage works, MLflow's system metrics sampled into the run (here every
    0.2 s), then FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM (SystemExit from
    Ray's handler); the sampling thread is gone however the body ended."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    tracker.set_terminated(run_id, "FINISHED")  # an earlier stage ended: this one reopens it
    client = _client(tracker)
    cpu = "system/cpu_utilization_percentage"
    try:
        with tracker.live_run(run_id):
            assert client.get_run(run_id).info.status == "RUNNING"
            deadline = time.monotonic() + 30
            while cpu not in client.get_run(run_id).data.metrics:
                assert time.monotonic() < deadline, "no system metrics within 30 s"
                time.sleep(0.2)
            if ending is not None:
                raise ending()
    except (ValueError, KeyboardInterrupt, SystemExit) as exc:
        assert ending is not None and isinstance(exc, ending)
    assert client.get_run(run_id).info.status == status
    assert not _monitor_threads()
    assert "system/system_memory_usage_megabytes" in client.get_run(run_id).data.metrics


def test_a_stage_shorter_than_the_sampling_interval_logs_one_system_metrics_sample(
        root, monkeypatch):
    """MLflow's monitor drops what it sampled when it stops before its interval is up: the live
    run logs that last sample itself, one step per stage."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    client = _client(tracker)
    cpu = "system/cpu_utilization_percentage"
    for stage in range(2):
        with tracker.live_run(run_id):
            time.sleep(0.5)
        assert [m.step for m in client.get_metric_history(run_id, cpu)] == list(range(stage + 1))
    assert not _monitor_threads()


def test_progress_logs_units_done_and_rate(root):
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    progress = tracker.progress(run_id, "sample", "images")
    for done, rate in ((100, 10.0), (200, 12.5)):
        progress(done, rate)
    client = _client(tracker)
    done = client.get_metric_history(run_id, "sample_progress_images")
    rate = client.get_metric_history(run_id, "sample_progress_images_per_s")
    assert [(m.step, m.value) for m in done] == [(100, 100.0), (200, 200.0)]
    assert [(m.step, m.value) for m in rate] == [(100, 10.0), (200, 12.5)]


def test_mlflow_ui_metadata_experiment_kind_and_descriptions(root):
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    client = _client(tracker)
    tags = client.get_experiment(tracker.experiment_id).tags
    # a training experiment for MLflow 3's UI (its runs table, not the GenAI overview)
    assert tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert tags[tracking.TAG_NOTE].startswith("DDPM study")
    # a run's description, as tabulate sets it with the run's other tags
    tracker.set_tags(run_id, {tracking.TAG_NOTE: "Table 2 row: ε prediction (ours), L_simple."})
    assert client.get_run(run_id).data.tags["mlflow.note.content"].startswith("Table 2 row")
    # an experiment made before the tag existed gets it when opened
    client.delete_experiment_tag(tracker.experiment_id, tracking.TAG_EXPERIMENT_KIND)
    _tracker(root).experiment_id
    assert client.get_experiment(tracker.experiment_id).tags[tracking.TAG_EXPERIMENT_KIND] \
        == "custom_model_development"


def test_artifacts_and_tables_land_under_the_artifact_root(root, monkeypatch):
    monkeypatch.chdir("/")  # artifacts follow the root, not the cwd
    tracker = _tracker(root)
    run_id = tracker.run_for("eps_simple", CONFIG)
    artifacts = root / "mlartifacts" / STUDY.name / run_id / "artifacts"

    grid = root / "grid.png"
    grid.write_bytes(b"\x89PNG fake")
    tracker.log_artifact(run_id, grid, "samples")
    assert (artifacts / "samples" / "grid.png").read_bytes() == b"\x89PNG fake"
    folder = root / "models"
    folder.mkdir()
    (folder / "config.yaml").write_text("a: 1\n")
    tracker.log_artifact(run_id, folder, "models")
    assert (artifacts / "models" / "config.yaml").read_text() == "a: 1\n"

    study = tracker.study_run()
    table = pd.DataFrame({"model": ["eps_simple", "x0_simple"], "fid": [12.5, 30.1]})
    tracker.log_table(study, table, "tables/table2.json")
    tracker.log_table(study, table, "tables/table2.json")  # a re-run replaces, never appends
    stored = json.loads((root / "mlartifacts" / STUDY.name / study / "artifacts" / "tables"
                         / "table2.json").read_text())
    assert stored["columns"] == ["model", "fid"]
    assert stored["data"] == [["eps_simple", 12.5], ["x0_simple", 30.1]]


def test_run_for_finds_names_with_quotes(root):
    tracker = _tracker(root)
    run_id = tracker.run_for("it's", CONFIG)
    assert tracker.run_for("it's", CONFIG) == run_id


def test_database_is_locked_is_retried_then_raised(monkeypatch):
    import sqlalchemy
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(tracking_store.time, "sleep", lambda _s: None)
    locked = sqlalchemy.exc.OperationalError("INSERT ...", {}, Exception("database is locked"))
    calls = []

    def flaky(value):
        calls.append(value)
        if len(calls) < 3:  # as MLflow raises it: an MlflowException from the OperationalError
            raise MlflowException(message=locked) from locked
        return value

    assert tracking_store.retry_if_locked(flaky, 7) == 7 and len(calls) == 3

    def always_locked():
        calls.append(None)
        raise MlflowException(message=locked) from locked

    calls.clear()
    with pytest.raises(MlflowException, match="database is locked"):
        tracking_store.retry_if_locked(always_locked)
    assert len(calls) == tracking_store.LOCK_RETRIES

    def other_error():
        calls.append(None)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST")

    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):  # passed on as it is
        tracking_store.retry_if_locked(other_error)
    assert len(calls) == 1


# -- concurrency ------------------------------------------------------------------------------


def _trial_worker(args: tuple[str, int]) -> tuple[str, str]:
    root, index = args
    tracker = _tracker(Path(root))
    parent_run_id = tracker.run_for("sweep", {"sweep": 1})  # all four race to find-or-create it
    run_id = tracker.nested_run(parent_run_id, f"trial_{index}", {"trial": index})
    for step in range(50):
        tracker.log_metrics(run_id, {"loss": 1.0 / (step + 1)}, step=step)
    tracker.set_terminated(run_id)
    return parent_run_id, run_id


def test_concurrent_processes_log_into_one_store(tmp_path):
    """Four sweep trials open a *new* sqlite store at once (one migrates it, under the lock),
    agree on one parent run, and each log a nested run with 50 metrics."""
    from mlflow.entities import ViewType

    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.map(_trial_worker, [(str(tmp_path), i) for i in range(4)])

    parents = {parent for parent, _ in results}
    run_ids = [run_id for _, run_id in results]
    assert len(parents) == 1 and len(set(run_ids)) == 4
    tracker = _tracker(tmp_path)
    client = _client(tracker)
    parent = parents.pop()
    assert [r.info.run_id for r in client.search_runs([tracker.experiment_id],
                                                      run_view_type=ViewType.ALL)
            if r.info.run_name == "sweep-0"] == [parent]
    children = client.search_runs([tracker.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                  run_view_type=ViewType.ALL)
    assert sorted(r.info.run_id for r in children) == sorted(run_ids)
    for run_id in run_ids:
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(50))
        assert client.get_run(run_id).info.status == "FINISHED"


def test_run_of_an_experiment_is_one_run_per_name_seed_and_config(root):
    """`run_of(exp)`, the stages' one way to find a row's run: the same resolved experiment finds
    its run again; another seed or another config gets its own."""
    import dataclasses

    from pipeline.core.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    exp = params.experiment("eps_simple", seed=0)
    tracker = _tracker(root)
    first = tracker.run_of(exp)
    assert tracker.run_of(params.experiment("eps_simple", seed=0)) == first
    assert tracker.run_for(exp.name, {"config_hash": exp.config_hash()}, exp.seed) == first
    other_seed = tracker.run_of(dataclasses.replace(exp, seed=1))
    changed = tracker.run_of(dataclasses.replace(exp, train=dataclasses.replace(exp.train,
                                                                               steps=5)))
    assert len({first, other_seed, changed}) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_sqlite_store_is_one_error_naming_the_file_and_left_as_it_was(root, damage):
    """A stage's first check refuses a damaged mlflow.db with the fix (move it aside) instead of
    an SQLAlchemy traceback, and does not touch the file."""
    tracker = _tracker(root)
    tracker.check_reachable()
    tracker.run_for("eps_simple", CONFIG)  # a real store with a run in it
    db = root / "mlflow.db"
    good = db.read_bytes()
    bad = b"this is not a database" * 100 if damage == "garbage" else good[: len(good) // 3]
    db.write_bytes(bad)
    with pytest.raises(TrackingError, match=r"mlflow\.db is not a readable sqlite database "
                                            r"\(.+\); move it aside \(mv "):
        _tracker(root).check_reachable()
    assert db.read_bytes() == bad
    db.write_bytes(good)
    _tracker(root).check_reachable()  # the sound file passes


def test_a_store_whose_writer_was_killed_mid_transaction_passes_and_takes_runs(root):
    """A stage killed while MLflow wrote leaves a hot journal beside mlflow.db; the read-only
    check cannot roll it back (SQLITE_READONLY_ROLLBACK) but the file is sound: the next stage
    passes the check, and its first write rolls the journal back."""
    import signal
    import subprocess
    import sys

    tracker = _tracker(root)
    tracker.check_reachable()
    first = tracker.run_for("eps_simple", CONFIG)
    db = root / "mlflow.db"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
         "db.execute('BEGIN IMMEDIATE')\n"
         "db.execute('CREATE TABLE scratch(x)')\n"
         "db.executemany('INSERT INTO scratch VALUES (?)', [(b'x' * 4000,)] * 2000)\n"
         "print('written', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    journal = db.with_name("mlflow.db-journal")
    assert journal.is_file() and journal.stat().st_size > 0
    _tracker(root).check_reachable()  # was "not a readable sqlite database" before
    again = _tracker(root)
    assert again.run_for("eps_simple", CONFIG) == first
    assert not journal.exists() or journal.stat().st_size == 0
