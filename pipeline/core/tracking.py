"""MLflow tracking: every MLflow call of the project lives here.

Layout of the records (`mlflow ui` shows it as is):
- one MLflow experiment per study, named `study.name`, with its artifacts in the folder
  <tracking.artifact_root>/<study name>/<run id>/artifacts (the root resolved against the repo
  root, as a file:// URI);
- one run per study experiment E (a row of Table 2) and training seed S, named `E-S` and tagged
  `ddpm.experiment=E`, `ddpm.seed=S`, found again by the train, sample and evaluate stages
  (separate processes) so that they all log into it;
  a run is reused only while its `ddpm.config_hash` matches, so a re-run of the study after a
  params change starts a fresh run and keeps the old one for history;
- a study experiment's run holds its EMA U-Net as an MLflow 3 logged model named `ema`
  (`Tracker.log_torch_model`: pt2 format, so `mlflow.pytorch.load_model("runs:/<run id>/ema")`
  loads it without the project's code); MLflow's fluent API, which logging and loading a model
  go through, points at the study's store only for those calls;
- one study run named "tables" (`ddpm.experiment=_study`) for study-level artifacts;
- sweep trials as runs nested under a parent run (`mlflow.parentRunId`);
- inside a DVC experiment (`dvc exp run`, queued or not; DVC sets `DVC_EXP_NAME`) every run is
  tagged `dvc.exp_name=<its name>`, and the runs of one experiment are found again by that tag
  as well, so each DVC experiment has runs of its own: two queued experiments never log into
  one run, and `dvc exp show` rows match MLflow runs by name.

For `mlflow ui`: the experiment is tagged `mlflow.experimentKind = custom_model_development`
("Machine learning"), so that MLflow 3 opens it on the table of training runs and not on its
GenAI overview, and carries a description (`mlflow.note.content`); each experiment's run gets
a description naming its row of the paper's Table 2 (the `mlflow.note.content` tag the tabulate
stage sets with its other tags).

While a stage works on a run, the run shows it (`Tracker.live_run`): its status is RUNNING, MLflow's
system metrics (CPU, memory, disk, network; GPU utilization and memory where nvidia-ml-py finds
one: `system/...`) are sampled into it every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL and
MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING change that), and it ends FINISHED, FAILED where
the stage raised, KILLED where it was interrupted (Ctrl-C, or SIGTERM).
Metrics of the work stream in as it goes, each from one writer: the training's from the Ray
Train controller (`MetricStream`, which skips the steps a resumed run already logged), the
progress of a job cut into chunks from the stage's driver (`Tracker.progress`).

Only the driver process of a stage logs (never Ray workers), and the Ray Train controller that
streams the training's metrics. MLflow 3 refuses its plain file
store, so the tracking store is a sqlite database (`sqlite:///mlflow.db` by default) or a tracking
server (http URI); artifacts go to a file artifact root. Where the store lives, whether it can
be used and how writes wait for a busy sqlite file: `pipeline.core.tracking_store`.

Nothing happens at import time; mlflow is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import numpy as np

from pipeline.core.config import run_key
from pipeline.core.errors import UserError
from pipeline.core.io import sha256_hex
from pipeline.core.tracking_store import (TrackingError, check_reachable, has_scheme, is_server,
                                          refused_write, resolve_artifact_root,
                                          resolve_tracking_uri, retry_if_locked, store_lock,
                                          study_root)

if TYPE_CHECKING:
    import pandas
    import torch
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature

    from pipeline.core.config import ExperimentConfig, StudyConfig, TrackingConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Tags of the project (mlflow.* tags are MLflow's own).
TAG_EXPERIMENT = "ddpm.experiment"
TAG_SEED = "ddpm.seed"
TAG_CONFIG_HASH = "ddpm.config_hash"
TAG_ROLE = "ddpm.role"  # experiment | study | trial: keeps run_for from matching other runs
TAG_GIT_COMMIT = "git.commit"
TAG_DVC_EXPERIMENT = "dvc.exp_name"  # the DVC experiment a run belongs to (env DVC_EXP_NAME)
TAG_PARAM_CHANGED = "ddpm.param_changed."  # prefix; see Tracker.log_params
TAG_STATUS = "ddpm.status"  # how a run or trial ended (pipeline.core.status.Status)
TAG_RAY_RUN_NAME = "ddpm.ray_run_name"  # the training run's name in Ray storage
TAG_BASE_EXPERIMENT = "ddpm.base_experiment"  # a sweep's base experiment
TAG_TRIAL_ID = "ddpm.trial_id"
TAG_SWEEP = "ddpm.sweep"  # a sweep's name (its recipe): its run and its trials' runs
TAG_TRIAL = "ddpm.trial"  # a trial's number in its sweep (trials.csv's `trial`)
TAG_AXIS = "ddpm."  # prefix: a trial's value of each sweep axis (ddpm.schedule, ddpm.weighting)
TAG_ERROR = "ddpm.error"  # the end of a failed trial's traceback


def tag_dvc_stage_md5(stage: str) -> str:
    """The tag holding the md5 of a DVC stage's first output (`dvc.<stage>.md5`)."""
    return f"dvc.{stage}.md5"
STUDY_RUN_EXPERIMENT = "_study"
STUDY_RUN_NAME = "tables"
# MLflow's own tags read by its UI (mlflow/server/js: ExperimentKind, the run "Description").
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_ML = "custom_model_development"  # the UI's "Machine learning": runs table first
TAG_NOTE = "mlflow.note.content"  # an experiment's or a run's description (markdown)
STUDY_DESCRIPTION = ("DDPM study (Ho, Jain & Abbeel 2020): one run per experiment (a row of "
                     "Table 2) with its params, `train_loss` curve, FID / IS / KID / NLL "
                     "(bits/dim), sample grid and progressive figure; the `tables` run holds "
                     "Tables 1 and 2. Made by `dvc repro`.")

# MLflow's run statuses (mlflow.entities.RunStatus) as a stage leaves them: RUNNING while it works
RUN_RUNNING, RUN_FINISHED, RUN_FAILED, RUN_KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins

# MLflow's limits (mlflow.utils.validation): values longer than these are rejected.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100


# --------------------------------------------------------------------------------------------
# Hashes, git, params
# --------------------------------------------------------------------------------------------


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a resolved config dict (12 hex digits of SHA-256 of its JSON)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return sha256_hex(text, length=12)


def git_commit(root: str | Path) -> Optional[str]:
    """`git rev-parse HEAD` in `root`; None outside a git repository or without git."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(root), capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 2e-4}} -> {"train.lr": "0.0002"}; values as MLflow stores them (str).

    Values longer than MLflow's limit (6000 characters) are truncated, with a warning.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            log.warning("param %s (%d characters) truncated to %d", name, len(text),
                        MAX_PARAM_VALUE_LENGTH)
            text = text[:MAX_PARAM_VALUE_LENGTH]
        flat[name] = text
    return flat


class LoggedModelError(UserError, LookupError):
    """A logged model the tracking store does not hold: names its URI and the fix."""


# --------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """The study's MLflow records: one experiment per study, one run per study experiment.

    Opening a Tracker does no I/O; call `check_reachable()` first thing in a stage, so that a
    wrong URI stops it before training starts. All methods take and return MLflow run ids.
    """

    def __init__(self, tracking_cfg: TrackingConfig, study_cfg: StudyConfig,
                 root: str | Path = ".") -> None:
        self.root = study_root(root)
        self.dvc_experiment = os.environ.get("DVC_EXP_NAME") or None
        self.tracking_uri = resolve_tracking_uri(tracking_cfg, self.root)
        self.study_name = study_cfg.name
        # MLflow keeps a run's artifacts at <experiment artifact location>/<run id>/artifacts;
        # one folder per study keeps studies sharing an artifact root apart. A tracking server
        # given a local artifact root keeps them where it is told (`mlflow server
        # --artifacts-destination`): a local path here may be a machine's temporary folder.
        self.artifact_location: Optional[str] = (
            resolve_artifact_root(tracking_cfg, self.root).rstrip("/") + "/"
            + re.sub(r"[^A-Za-z0-9_.-]", "_", self.study_name))
        if is_server(self.tracking_uri) and not has_scheme(tracking_cfg.artifact_root):
            self.artifact_location = None
        self._client: Optional[MlflowClient] = None
        self._experiment_id: Optional[str] = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its client (a Ray Tune callback holding a tracker is saved with the
        sweep): the copy connects again on first use."""
        return {**self.__dict__, "_client": None, "_experiment_id": None}

    def __repr__(self) -> str:
        return (f"Tracker(study={self.study_name!r}, tracking_uri={self.tracking_uri!r}, "
                f"artifact_location={self.artifact_location!r})")

    def _store(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the store, retried while sqlite is busy (`retry_if_locked`);
        a store that refuses the write (read-only, full, gone) is a `TrackingError` naming it."""
        try:
            return retry_if_locked(fn, *args, **kwargs)
        except TrackingError:
            raise
        except Exception as exc:
            refused = refused_write(exc, self.tracking_uri)
            if refused is None:
                raise
            raise refused from None

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Raise `TrackingError` naming the URI, within about `timeout_s`, if unusable."""
        check_reachable(self.tracking_uri, timeout_s)

    # -- store, experiment, runs --------------------------------------------------------------

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            with store_lock(self.tracking_uri):
                # MlflowClient() builds the store at once; on a new sqlite file that runs
                # MLflow's schema migrations, which must not run in two processes at once.
                self._client = self._store(MlflowClient, tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The study's MLflow experiment (named after the study), created if missing."""
        if self._experiment_id is None:
            client = self.client
            with store_lock(self.tracking_uri):
                self._experiment_id = self._store(self._get_or_create_experiment, client)
        return self._experiment_id

    def _get_or_create_experiment(self, client: MlflowClient) -> str:
        experiment = client.get_experiment_by_name(self.study_name)
        if experiment is None:
            return client.create_experiment(
                self.study_name, artifact_location=self.artifact_location,
                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND_ML, TAG_NOTE: STUDY_DESCRIPTION})
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # made by an earlier version
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND,
                                      EXPERIMENT_KIND_ML)
        if experiment.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it", self.study_name)
            client.restore_experiment(experiment.experiment_id)
        if self.artifact_location is not None and \
                experiment.artifact_location.rstrip("/") != self.artifact_location.rstrip("/"):
            log.warning("MLflow experiment %r keeps its artifacts at %s, not at %s",
                        self.study_name, experiment.artifact_location, self.artifact_location)
        return experiment.experiment_id

    def run_for(self, experiment: str, config: Optional[Mapping[str, Any]] = None,
                seed: int = 0) -> str:
        """The run of study experiment `experiment` trained with `seed`: found by tags, or
        created (named `<experiment>-<seed>`).

        `config` is what identifies the run's configuration (`run_of` passes the experiment's
        config hash); every stage of one experiment must pass the same. A run is reused only if
        its `ddpm.config_hash` matches; otherwise a new run starts and the old one stays for
        history. Deleted runs are never reused.
        """
        digest = config_hash(config if config is not None else {})
        tags = {TAG_EXPERIMENT: experiment, TAG_SEED: str(seed), TAG_CONFIG_HASH: digest,
                TAG_ROLE: "experiment"}
        return self._find_or_create(tags, run_name=run_key(experiment, seed))

    def run_of(self, exp: ExperimentConfig) -> str:
        """The run of a resolved experiment (one row of the study, one seed): `run_for` of its
        name, config hash and seed, as every stage finds it."""
        return self.run_for(exp.name, {"config_hash": exp.config_hash()}, exp.seed)

    def study_run(self) -> str:
        """The study-level run ("tables", `ddpm.experiment=_study`) for the study's tables."""
        tags = {TAG_EXPERIMENT: STUDY_RUN_EXPERIMENT, TAG_ROLE: "study"}
        return self._find_or_create(tags, run_name=STUDY_RUN_NAME)

    def nested_run(self, parent_run_id: str, name: str,
                   tags: Optional[Mapping[str, Any]] = None) -> str:
        """A new run nested under `parent_run_id` (a sweep trial), in the parent's experiment."""
        client = self.client
        parent = self._store(client.get_run, parent_run_id)
        all_tags = {TAG_ROLE: "trial", **self._source_tags(), **_str_values(tags or {}),
                    "mlflow.parentRunId": parent_run_id}
        run = self._store(client.create_run, parent.info.experiment_id, tags=all_tags,
                               run_name=name)
        return run.info.run_id

    def run_with(self, name: str, tags: Mapping[str, Any],
                 parent_run_id: Optional[str] = None) -> str:
        """The run with `tags` (nested under `parent_run_id` if given): found, so that a resumed
        or repeated sweep logs into the runs it had, or created (named `name`)."""
        tags = _str_values(tags)
        if parent_run_id is not None:
            tags = {TAG_ROLE: "trial", **tags, "mlflow.parentRunId": parent_run_id}
        return self._find_or_create(tags, run_name=name)

    def _find_or_create(self, tags: Mapping[str, str], run_name: str) -> str:
        """The newest active run with `tags` in the same DVC experiment (or, outside one, in
        none), else a new one."""
        from mlflow.entities import ViewType

        experiment_id = self.experiment_id
        client = self.client
        tags = {**tags, **self._experiment_tag()}
        query = " and ".join(f"tags.`{key}` = {_literal(value)}" for key, value in tags.items())
        with store_lock(self.tracking_uri):
            runs = self._store(client.search_runs, [experiment_id], filter_string=query,
                                    run_view_type=ViewType.ACTIVE_ONLY, max_results=100,
                                    order_by=["attributes.start_time DESC"])
            for run in runs:  # outside a DVC experiment, skip the runs of experiments
                if run.data.tags.get(TAG_DVC_EXPERIMENT) == self.dvc_experiment:
                    return run.info.run_id
            run = self._store(client.create_run, experiment_id,
                                   tags={**tags, **self._source_tags()}, run_name=run_name)
        return run.info.run_id

    def _experiment_tag(self) -> dict[str, str]:
        return {TAG_DVC_EXPERIMENT: self.dvc_experiment} if self.dvc_experiment else {}

    def _source_tags(self) -> dict[str, str]:
        commit = git_commit(self.root)
        tags = {TAG_GIT_COMMIT: commit, "mlflow.source.git.commit": commit} if commit else {}
        return {**tags, **self._experiment_tag()}

    # -- logging --------------------------------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log `params`, nested dicts flattened with dots ("train.lr").

        MLflow params are immutable. Logging a key again with the same value does nothing; with
        a different value the param keeps its first value, the new one is recorded as the tag
        `ddpm.param_changed.<key>` and a warning is logged (a changed config normally gets a new
        run through `run_for`'s config hash, so this only happens for keys outside the hash).
        """
        from mlflow.entities import Param, RunTag

        client = self.client
        flat = flatten_params(params)
        logged = self._store(client.get_run, run_id).data.params
        new = [Param(key, value) for key, value in flat.items() if key not in logged]
        changed = {key: value for key, value in flat.items()
                   if key in logged and logged[key] != value}
        for key, value in changed.items():
            log.warning("param %s of run %s is already %r; keeping it, new value %r is logged as "
                        "tag %s%s", key, run_id, logged[key], value, TAG_PARAM_CHANGED, key)
        tags = [RunTag(f"{TAG_PARAM_CHANGED}{key}", value[:MAX_TAG_VALUE_LENGTH])
                for key, value in changed.items()]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self._store(client.log_batch, run_id, params=chunk)
        for chunk in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
            self._store(client.log_batch, run_id, tags=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, Optional[float]],
                    step: Optional[int] = None) -> None:
        """Log scalar metrics at `step` (0 if None); None values (not measured) are skipped."""
        from mlflow.entities import Metric

        timestamp = _now_ms()
        batch = [Metric(key, float(value), timestamp, step or 0)
                 for key, value in metrics.items() if value is not None]
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._store(self.client.log_batch, run_id, metrics=chunk)

    def log_metric_history(self, run_id: str, name: str, steps: Sequence[int],
                           values: Sequence[float]) -> None:
        """Log a whole curve (e.g. the training loss) in batches of MLflow's limit (1000).

        Steps already logged for `name` are skipped, so that logging the history of a resumed
        or repeated training into the same run does not duplicate points.
        """
        from mlflow.entities import Metric

        if len(steps) != len(values):
            raise ValueError(f"metric {name}: {len(steps)} steps but {len(values)} values")
        client = self.client
        done = {m.step for m in self._store(client.get_metric_history, run_id, name)}
        timestamp = _now_ms()
        batch = [Metric(name, float(value), timestamp, int(step))
                 for step, value in zip(steps, values) if int(step) not in done]
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._store(client.log_batch, run_id, metrics=chunk)

    def log_artifact(self, run_id: str, path: str | Path,
                     artifact_path: Optional[str] = None) -> None:
        """Copy a file (or a folder's contents) into the run's artifacts under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, table: pandas.DataFrame, artifact_file: str) -> None:
        """Log a DataFrame as an MLflow table artifact (`.json` or `.parquet`).

        MLflow appends to an existing table of the same name; here the new table replaces it,
        so a re-run of the tabulate stage does not duplicate rows.
        """
        self._delete_artifact(run_id, artifact_file)
        with warnings.catch_warnings():  # mlflow's own select_dtypes call, noisy on pandas 3
            warnings.filterwarnings("ignore", message=".*select_dtypes.*")
            self._store(self.client.log_table, run_id, table, artifact_file)

    def _delete_artifact(self, run_id: str, artifact_file: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        client = self.client
        parent = os.path.dirname(artifact_file) or None
        if artifact_file not in {f.path for f in client.list_artifacts(run_id, parent)}:
            return
        artifact_uri = self._store(client.get_run, run_id).info.artifact_uri
        try:
            get_artifact_repository(artifact_uri).delete_artifacts(artifact_file)
        except Exception as exc:  # a store without deletes: MLflow appends, say so
            log.warning("cannot replace table %s of run %s (%s); MLflow appends the new rows",
                        artifact_file, run_id, exc)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values are converted to str and cut to MLflow's limit."""
        from mlflow.entities import RunTag

        batch = [RunTag(key, value[:MAX_TAG_VALUE_LENGTH])
                 for key, value in _str_values(tags).items()]
        for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
            self._store(self.client.log_batch, run_id, tags=chunk)

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED (MLflow still accepts later logging)."""
        self._store(self.client.set_terminated, run_id, status)

    # -- logged models --------------------------------------------------------------------------

    def log_torch_model(self, run_id: str, model: torch.nn.Module, name: str,
                        example_inputs: Mapping[str, torch.Tensor],
                        metadata: Optional[Mapping[str, Any]] = None,
                        tags: Optional[Mapping[str, Any]] = None) -> str:
        """Log `model`, called as `model(*example_inputs.values())` (its inputs by name, in
        order), as MLflow 3 logged model `name` of the run: made in the run's experiment, with
        the run as its source and among its outputs, so that
        `mlflow.pytorch.load_model("runs:/<run id>/<name>")` loads it back. A model of that name
        the run logged before (a stage run again) is deleted once this one is logged.

        Saved in MLflow's pt2 format (`torch.export` of the module, the batch dimension of the
        inputs left free): it loads without unpickling any class, so without the project's code
        on the path and without MLFLOW_ALLOW_PICKLE_DESERIALIZATION. `metadata` goes into its
        MLmodel file (`load_torch_model` returns it). The requirements are given (torch), so
        MLflow infers none. Returns the model's URI, `models:/<model id>`."""
        import mlflow.pytorch
        import torch

        client = self.client
        experiment_id = self._store(client.get_run, run_id).info.experiment_id
        earlier = self._store(client.search_logged_models, [experiment_id],
                              filter_string=f"name = {_literal(name)} AND "
                                            f"source_run_id = {_literal(run_id)}")
        logged = self._store(client.create_logged_model, experiment_id, name=name,
                             source_run_id=run_id, tags=_str_values(tags or {}))
        inputs = tuple(example_inputs.values())
        with torch.no_grad():
            output = model(*inputs)
        version = torch.__version__.split("+")[0]
        with _fluent_api(self.tracking_uri):
            info = self._store(mlflow.pytorch.log_model, model, name=name, run_id=run_id,
                               model_id=logged.model_id, serialization_format="pt2",
                               input_example=inputs,
                               signature=_tensor_signature(example_inputs, output),
                               pip_requirements=[f"torch=={version}"],
                               metadata=dict(metadata or {}))
        for old in earlier:
            self._store(client.delete_logged_model, old.model_id)
        return info.model_uri

    def load_torch_model(self, model_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The logged model at `model_uri` (`models:/<model id>`, `runs:/<run id>/<name>`, ...)
        as `mlflow.pytorch.load_model` loads it (on the CPU), and the metadata of its MLmodel
        file. A model the store does not hold is a `LoggedModelError` naming the URI."""
        import mlflow.models
        import mlflow.pytorch
        from mlflow.exceptions import MlflowException

        try:
            with _fluent_api(self.tracking_uri):
                model = self._store(mlflow.pytorch.load_model, model_uri)
                info = self._store(mlflow.models.get_model_info, model_uri)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise LoggedModelError(
                f"{model_uri}: not in the MLflow store {self.tracking_uri} "
                f"({str(exc).splitlines()[0]}); copy a run's id from `mlflow ui`, or a model's "
                "URI from the run's Logged models, and check MLFLOW_TRACKING_URI or "
                "tracking.tracking_uri") from None
        return model, dict(info.metadata or {})

    # -- while a stage runs ---------------------------------------------------------------------

    def last_step(self, run_id: str, name: str) -> Optional[int]:
        """The largest step of metric `name` the run holds; None if it holds none."""
        history = self._store(self.client.get_metric_history, run_id, name)
        return max((m.step for m in history), default=None)

    def metric_stream(self, run_id: str, resume_key: str) -> "MetricStream":
        """A `MetricStream` into the run that skips the steps already logged for `resume_key`
        (read once, here)."""
        return MetricStream(self.tracking_uri, run_id, after_step=self.last_step(run_id,
                                                                                 resume_key))

    def progress(self, run_id: str, stage: str, unit: str) -> Callable[[int, float], None]:
        """A callback `(done, per_s)` for a job cut into chunks: logs `<stage>_progress_<unit>`
        (units done, finished ones found in storage included) and `<stage>_progress_<unit>_per_s`
        at step `done`. A tracking error is one warning, and the progress of this job is not
        logged any more: the work goes on, and the stage's final record says what the store
        does."""
        failed = []

        def log_progress(done: int, per_s: float) -> None:
            name = f"{stage}_progress_{unit}"
            if failed:
                return
            try:
                self.log_metrics(run_id, {name: done, f"{name}_per_s": per_s}, step=int(done))
            except Exception as exc:
                failed.append(exc)
                log.warning("could not log %s of run %s to MLflow, so its progress is not "
                            "logged: %s", name, run_id, exc)

        return log_progress

    @contextmanager
    def live_run(self, run_id: str, system_metrics: bool = True) -> Iterator[str]:
        """The run while a stage works on it: RUNNING, with MLflow's system metrics sampled into
        it (`system_metrics`); then FINISHED, FAILED where the body raised, KILLED where it was
        interrupted: KeyboardInterrupt (Ctrl-C, SIGTERM before Ray starts:
        `stages._common.Terminated`) or SystemExit (the SIGTERM handler `ray.init` installs in
        the driver exits). The sampling thread stops however the body ends."""
        self._store(self.client.update_run, run_id, status=RUN_RUNNING)
        monitor = self._start_system_metrics(run_id) if system_metrics else None
        status = RUN_FINISHED
        try:
            yield run_id
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (Ray's handler exits)
            status = RUN_KILLED
            raise
        except BaseException:
            status = RUN_FAILED
            raise
        finally:
            if monitor is not None:
                monitor.finish()
                _publish_last_sample(monitor)
            try:
                self.set_terminated(run_id, status)
            except Exception as exc:
                if status == RUN_FINISHED:
                    raise
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)

    def _start_system_metrics(self, run_id: str):
        """MLflow's `SystemMetricsMonitor` on the run, started; None (with a warning) where it
        cannot run: the stage goes on without system metrics."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                           resume_logging=True, tracking_uri=self.tracking_uri)
            monitor.start()
        except Exception as exc:  # no psutil, a store that refuses the first read
            log.warning("no system metrics for MLflow run %s: %s", run_id, exc)
            return None
        return monitor


def _publish_last_sample(monitor) -> None:
    """Log the system metrics a stopped `SystemMetricsMonitor` sampled since it last logged:
    its loop drops them when it stops, so a stage shorter than the sampling interval would
    otherwise log none."""
    try:
        metrics = monitor.aggregate_metrics()
        if metrics:
            monitor.publish_metrics(metrics)
            monitor.mlflow_logger.flush()
    except Exception as exc:  # nothing sampled, or a store that refuses the write
        log.warning("the last system metrics sample was not logged: %s", exc)


class MetricStream:
    """Metrics logged into one run as a running job reports them, from one writer (the Ray
    Train controller, where it travels pickled and opens its own client).

    A step at or below `after_step` (the last the run holds, read once when the stream is made)
    or below one this stream already logged is skipped: a training resumed from a checkpoint
    older than its last logged step reports those steps again. A tracking error is a warning:
    training goes on, and the stage's final record logs what the stream missed.
    """

    def __init__(self, tracking_uri: str, run_id: str, after_step: Optional[int] = None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.after_step = after_step
        self._client: Optional[MlflowClient] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def log(self, step: int, metrics: Mapping[str, Optional[float]]) -> bool:
        """Log `metrics` at `step` unless the run has that step already; True if logged."""
        from mlflow.entities import Metric

        step = int(step)
        if self.after_step is not None and step <= self.after_step:
            return False
        timestamp = _now_ms()
        batch = [Metric(key, float(value), timestamp, step)
                 for key, value in metrics.items() if value is not None]
        try:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            retry_if_locked(self._client.log_batch, self.run_id, metrics=batch)
        except Exception as exc:
            log.warning("could not log step %d of run %s to MLflow: %s", step, self.run_id, exc)
            return False
        self.after_step = step
        return True


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextmanager
def _fluent_api(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API, which `mlflow.pytorch.log_model` and `load_model` use, on
    `tracking_uri` within the block, without its download progress bars; after it, the
    process's tracking URI and environment as they were (`mlflow.set_tracking_uri` sets
    MLFLOW_TRACKING_URI, and setting it back to none deletes the variable)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_uri = utils._tracking_uri
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _tensor_signature(inputs: Mapping[str, torch.Tensor],
                      output: torch.Tensor) -> ModelSignature:
    """The signature of a module called on `inputs` (by name) giving `output`: one tensor spec
    each, of their dtype and shape, the first (batch) dimension free."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(tensor: torch.Tensor, name: Optional[str] = None) -> TensorSpec:
        dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
        return TensorSpec(dtype, (-1, *tensor.shape[1:]), name)

    return ModelSignature(inputs=Schema([spec(x, name) for name, x in inputs.items()]),
                          outputs=Schema([spec(output)]))


def _str_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(key): str(value) for key, value in tags.items()}


def _literal(value: str) -> str:
    """A string literal for an MLflow filter; its parser has no escapes, only two quote kinds."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow runs for a tag value with both quote kinds: {value!r}")
