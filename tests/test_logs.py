"""pipeline.core.logs: what a stage's process and its Ray workers print, quiet or verbose."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from helpers import PROJECT, env_for

WORKER = """
import gc, logging, sys, weakref
from pipeline.core import logs
logging.basicConfig()  # a Ray worker's handler
logs.quiet_worker(sys.argv[1])
class Thing: pass
def stopped(ref): raise SystemExit(1)   # what Ray's SIGTERM handler raises in an actor
def broken(ref): raise ValueError("a real error in a callback")
a, b = Thing(), Thing()
refs = [weakref.ref(a, stopped), weakref.ref(b, broken)]
del a, b
gc.collect()
logging.getLogger("ray.tune.trainable").info("Restored from checkpoint")
logging.getLogger("ray.tune.trainable").warning("a warning")
"""


@pytest.mark.parametrize("level, exit_shown, info_shown", [("WARNING", False, False),
                                                           ("INFO", True, True)])
def test_a_quiet_worker_drops_info_logs_and_an_actors_exit_in_a_callback_only(level, exit_shown,
                                                                              info_shown):
    """quiet_worker("WARNING") (the default): INFO records and the SystemExit of a stopped actor
    raised in a garbage collector callback are not printed; a warning and any other error in a
    callback are. quiet_worker("INFO") (verbose) prints all of it."""
    proc = subprocess.run([sys.executable, "-c", WORKER, level], env=env_for(PROJECT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: a real error in a callback" in proc.stderr
    assert ("SystemExit" in proc.stderr) == exit_shown, proc.stderr
    assert ("Restored from checkpoint" in proc.stderr) == info_shown, proc.stderr
    assert "a warning" in proc.stderr


@pytest.mark.parametrize("verbose", ["", "1"])
def test_quiet_libraries_sets_the_libraries_defaults_unless_verbose(verbose):
    """Quiet (DDPM_VERBOSE unset): MLflow at WARNING, Tune's legacy output, no folding of the
    workers' lines, no colour codes in a pipe; verbose: none of it; a setting the user made is
    kept either way."""
    code = ("import logging, os; from pipeline.core import logs; logs.quiet_libraries(); "
            "print({**{k: os.environ.get(k) for k in ('MLFLOW_LOGGING_LEVEL', "
            "'RAY_AIR_NEW_OUTPUT', 'RAY_DEDUP_LOGS', 'RAY_COLOR_PREFIX', "
            "'RAY_BACKEND_LOG_LEVEL')}, "
            "'tune_logger': logging.getLogger('ray.tune.logger').getEffectiveLevel()})")
    env = env_for(PROJECT, extra={"DDPM_VERBOSE": verbose, "RAY_DEDUP_LOGS": "1"})
    for key in ("MLFLOW_LOGGING_LEVEL", "RAY_AIR_NEW_OUTPUT", "RAY_COLOR_PREFIX"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    settings = eval(proc.stdout)
    assert settings["RAY_DEDUP_LOGS"] == "1"  # the user's own setting
    quiet = {"MLFLOW_LOGGING_LEVEL": "WARNING", "RAY_AIR_NEW_OUTPUT": "0",
             "RAY_COLOR_PREFIX": "0"}
    for key, value in quiet.items():
        assert settings[key] == (None if verbose else value), (key, settings)
    assert settings["RAY_BACKEND_LOG_LEVEL"] is None
    # Tune's "Remote file not found: .../result.json" (a WARNING) for a resumed trial
    assert (settings["tune_logger"] > logging.WARNING) == (not verbose), settings
