"""What a stage prints: its own lines (progress, what it wrote, warnings, one line for an error)
and the libraries' chatter only when asked for it.

`DDPM_VERBOSE=1` (or a stage's `-v`) shows everything Ray, Ray Train, Ray Tune and MLflow log
at their INFO level. Without it:
- MLflow logs warnings only (not "Creating initial MLflow database tables...", nor the system
  metrics monitor starting and stopping), and none of the database errors it logs with their
  tracebacks before raising them: the stage reports those itself, in one line naming the store
  (`pipeline.core.tracking_store.refused_write`);
- Ray Train and Ray Tune log warnings only, on their workers too (not "Reporting training
  result N: TrainingReport(...)" and "Checkpoint successfully created at: ..." at every report;
  `worker_log_level` goes to the workers with their config, since a cluster's workers do not
  share the driver's environment), Tune nothing about result files of its own that the sweep
  does not use, nor its advice to snapshot the sweep's state less often, and the sweep prints
  one line per report instead of Tune's tables and boxes;
  Ray does not fold the stages' own lines from several workers into one ("[repeated 2x
  across cluster]");
- the prefix Ray puts on a worker's lines, `(RayTrainWorker pid=...)`, has no ANSI colour codes
  where stdout is not a terminal (a log file, `dvc repro > log`).
"""

from __future__ import annotations

import logging
import os
import sys

VERBOSE_ENV = "DDPM_VERBOSE"
# What `quiet_libraries` sets in the environment (for this process and those it starts).
LIBRARY_SETTINGS = ("MLFLOW_LOGGING_LEVEL", "RAY_AIR_NEW_OUTPUT", "RAY_DEDUP_LOGS",
                    "RAY_COLOR_PREFIX",
                    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S")


def verbose() -> bool:
    """Whether the libraries' own logs are asked for (DDPM_VERBOSE set, and not to 0)."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def set_verbose() -> None:
    """Ask for the libraries' logs in this process and the processes it starts (a stage's -v)."""
    os.environ[VERBOSE_ENV] = "1"


def worker_log_level() -> str:
    """The log level of Ray's workers for this stage: INFO when verbose, else WARNING."""
    return "INFO" if verbose() else "WARNING"


def quiet_libraries() -> None:
    """Quiet MLflow and Ray's driver side in this process unless verbose (the module's
    docstring says what goes). Call before MLflow is imported: MLflow reads its level then."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # where MLflow was imported already
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Tune's own result files (result.json, progress.csv: the sweep keeps its trials itself)
    # that it fails to copy back for a trial resumed from a checkpoint before it wrote them
    logging.getLogger("ray.tune.logger").setLevel(logging.ERROR)
    # Tune's output engine prints its experiment box and paths even at verbose 0; the one
    # before it prints nothing there
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # the stages' own lines differ in their numbers only: Ray would fold them, with a note
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Tune's advice to snapshot its experiment state less often, three lines each time: the
    # sweep checkpoints at every report on purpose (a trial stopped at a rung resumes there)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def quiet_worker(level: str) -> None:
    """On a Ray worker (a Train worker, a Tune trial): the root logger at `level`. Ray Train logs
    "Reporting training result" from a logger named by its file, outside `ray.train`, which its
    own log level setting (`RunConfig(logging_config=...)`) does not reach. Below INFO, the
    SystemExit that Ray's SIGTERM handler raises when it stops an actor (a sweep's stopped
    trial) inside a garbage collector callback is not printed as "Exception ignored in ...
    Traceback": the actor is meant to end there."""
    logging.getLogger().setLevel(level)
    logging.getLogger("ray.train").setLevel(level)
    logging.getLogger("ray.tune").setLevel(level)
    if logging.getLevelName(level) > logging.INFO:
        sys.unraisablehook = _unraisable_unless_exit


def _unraisable_unless_exit(unraisable) -> None:
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit):
        return
    sys.__unraisablehook__(unraisable)
