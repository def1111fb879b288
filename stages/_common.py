"""What every stage shares: argument parsing, params loading and user-facing errors.

Every stage has one shape. Its `main()` parses its arguments and hands its `body` to `run`,
which loads and validates the whole params.yaml (so a typo stops `dvc repro` in seconds, before
Ray or a model starts) and checks the study's MLflow store reachable.
`body(params, tracker)` then imports its job's modules (one block: they load torch and Ray),
reads and checks its inputs, runs its job (`pipeline.jobs.<stage>_job`) inside the run's MLflow
record (`tracker.live_run`) with Ray shut down in a `finally`, writes its outputs, logs them,
and prints one line of what it made.

Under `dvc repro` (DVC names the stage in $DVC_STAGE) a stage also checks, as it ends, that the
params DVC records for it and its own code files are what they were when it started
(`InputsWatch`): DVC reads both only after the command, so an edit made while a 15-hour stage
ran would otherwise be written into dvc.lock beside outputs made without it. A change fails the
stage in one line, before DVC records anything.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from pipeline.core import logs
from pipeline.core.errors import UserError, error_chain
from pipeline.core.io import file_digest
from pipeline.core.params import Params, load_params
from pipeline.core.tracking import Tracker

EXIT_USER_ERROR = 2
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The stage got SIGTERM: raised in its main thread, so that its cleanup runs."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


# The study's folders, as every stage names them: --<name> (default: the folder).
FOLDERS = {
    "data": ("data/prepared", "the prepared data, <dataset>/{train,test}.npz"),
    "stats": ("data/reference_stats", "the real data's reference statistics, <split>.npz"),
    "models": ("models", "the trained models, models/<E>-<S>/ and models/classifier/"),
    "samples": ("samples", "the samples, samples/<E>-<S>/"),
    "metrics": ("metrics", "the metrics, <E>-<S>.json, _run.json, _nll.csv, reference.json"),
    "plots": ("plots/loss", "the training loss curves, <E>-<S>.csv"),
}


# The seed calibration: `stages.calibrate` writes it, `stages.tabulate` reads it.
CALIBRATION_FILE = Path("calibration/seeds.json")


def parser(prog: str, description: str, experiment: bool = False, folders: tuple[str, ...] = (),
           out: tuple[str, str] | None = None,
           seed_use: str = "to train with") -> argparse.ArgumentParser:
    """The stage's argument parser: --params, with `experiment` --experiment and --seed, an
    option per name of `folders` (FOLDERS), and with `out` = (default, what) --out."""
    p = argparse.ArgumentParser(prog=f"python -m stages.{prog}", description=description)
    p.add_argument("--params", default="params.yaml", type=Path,
                   help="the study's params file (default: %(default)s)")
    if experiment:
        p.add_argument("--experiment", "-e", required=True,
                       help="which entry of the `experiments` mapping in params.yaml")
        p.add_argument("--seed", "-s", type=int, default=None,
                       help=f"which of study.seeds {seed_use} (default: the first)")
    for name in folders:
        default, what = FOLDERS[name]
        p.add_argument(f"--{name}", default=default, type=Path,
                       help=f"folder of {what} (default: %(default)s)")
    if out is not None:
        p.add_argument("--out", default=out[0], type=Path,
                       help=f"{out[1]} (default: %(default)s)")
    p.add_argument("-v", "--verbose", action=_Verbose, nargs=0,
                   help=f"print what Ray, Ray Train, Ray Tune and MLflow log too (as "
                        f"{logs.VERBOSE_ENV}=1 does for every stage of `dvc repro`)")
    return p


class _Verbose(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        logs.set_verbose()
        setattr(namespace, self.dest, True)


class InputsChanged(UserError):
    """params.yaml or a code file of the stage was edited while the stage ran."""


class InputsWatch:
    """What DVC will record of stage `stage` (its addressing, e.g. train@eps_simple-0) besides
    its outputs, read as the stage starts: the values of the params keys it lists and the
    digests of its Python deps (its code; data deps are the outputs of stages before, which
    `dvc repro` does not run meanwhile, and hashing them would cost minutes at scale).
    `check()` as the stage ends raises `InputsChanged` naming every key and file that changed."""

    def __init__(self, stage: str, root: Path = Path(".")):
        from dvc.repo import Repo

        self.stage_name = stage
        with Repo(str(root)) as repo:
            self.stage = repo.stage.collect_granular(stage)[0].stage
        self.params = self._params()
        self.code = self._code()

    def _params(self) -> dict[str, dict]:
        return {str(dep.def_path): dep.read_params() for dep in self.stage.deps
                if hasattr(dep, "read_params")}

    def _code(self) -> dict[str, str | None]:
        def digest(path: Path) -> str | None:
            return file_digest(path) if path.is_file() else None

        return {str(dep.def_path): digest(Path(dep.fs_path)) for dep in self.stage.deps
                if str(dep.def_path).endswith(".py")}

    def check(self) -> None:
        try:
            params = self._params()
        except Exception as exc:  # params.yaml half-edited: unreadable as YAML, or gone
            raise InputsChanged(f"{self.stage_name}: its params file became unreadable while "
                                f"the stage ran ({type(exc).__name__}: {exc}); fix it, then "
                                "rerun `dvc repro`") from None
        changed = [f"{key} {_short(old)} -> {_short(new)}"
                   for file, before in self.params.items()
                   for key, old, new in _changed_keys(before, params.get(file, {}))]
        now = self._code()
        changed += [path for path, digest in self.code.items() if now.get(path) != digest]
        if changed:
            shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more"
                                              if len(changed) > 6 else "")
            raise InputsChanged(f"{self.stage_name}: edited while the stage ran ({shown}); its "
                                "outputs were made with the values it started with, so DVC "
                                "must not record it: rerun `dvc repro`")


def _changed_keys(before: dict, after: dict, prefix: str = ""):
    """(dotted key, old, new) of every leaf that differs between two params mappings."""
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key, _ABSENT), after.get(key, _ABSENT)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _changed_keys(old, new, f"{name}.")
        elif old != new:
            yield name, old, new


_ABSENT = type("Absent", (), {"__repr__": lambda self: "(absent)"})()


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def watch_inputs() -> InputsWatch | None:
    """The stage's `InputsWatch` under `dvc repro` ($DVC_STAGE), else None: a stage run by hand
    records nothing, and reads its params once. The repo is the folder the stage runs in (DVC
    runs a command in its stage's folder, the repo's root here): a queued experiment runs in a
    temporary copy of the repo, where $DVC_ROOT names the user's checkout, whose params.yaml the
    user may edit meanwhile without touching the experiment's."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return None
    try:
        return InputsWatch(stage, Path.cwd())
    except Exception as exc:  # DVC's API moved, or dvc.yaml cannot be read here
        print(f"warning: {stage}: DVC's record of the stage cannot be read ({exc}), so edits "
              "to params.yaml made while it runs go unnoticed", file=sys.stderr)
        return None


def run(body: Callable[..., int | None], params_path: Path, tracking: bool = False) -> int:
    """Load and validate params, run `body(params)`, turn user errors into exit code 2 and
    SIGTERM into `Terminated` (exit code 143). With `tracking`, the study's MLflow tracker is
    checked reachable first and handed on, `body(params, tracker)`: an unreachable store stops
    the stage before its job's modules load. Under `dvc repro`, a stage whose recorded params
    or code changed while it ran fails as it ends (`InputsWatch`)."""
    logs.quiet_libraries()  # unless -v or DDPM_VERBOSE=1
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        watch = watch_inputs()  # before params.yaml is read: an edit in between is seen too
        params = load_params(params_path)
        code = (body(params, tracker_for(params)) if tracking else body(params)) or 0
        if watch is not None and code == 0:
            watch.check()
        return code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        message = disk_error(exc)
        if message is None:
            raise  # a bug: keep its traceback
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated as exc:
        print(f"error: {exc}; a rerun goes on from where it stopped", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# What the machine refuses a stage's write for: errno -> (what it means, what to do).
_FULL = ("no space left on its device", "free space there, or point the output (--out, "
         "cluster.storage, $TMPDIR) at a larger disk")
_DENIED = ("not writable", "make it writable, or point the output (--out, cluster.storage) "
           "elsewhere")
DISK_ERRORS = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EROFS: _DENIED,
               errno.EACCES: _DENIED, errno.EPERM: _DENIED}


def disk_error(exc: BaseException) -> str | None:
    """One line for a write the machine refused (a full disk or quota, a read-only or
    unwritable path) anywhere in `exc`'s chain (Ray hands a worker's error back wrapped:
    `.cause`), naming the path and what to do; None for any other error. Outputs are written
    whole or not at all (`pipeline.core.io.atomic_path`), so nothing half-written is left."""
    for error in error_chain(exc):
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            meaning, fix = DISK_ERRORS[error.errno]
            where = error.filename or "a file the stage writes"
            return (f"cannot write {where}: {meaning} ({error.strerror}); nothing "
                    f"half-written was kept; {fix}, then rerun `dvc repro`")
    return None


def tracker_for(params: Params, root: Path = Path(".")):
    """The study's MLflow tracker, checked reachable (fails fast, naming the URI)."""
    tracker = Tracker(params.tracking, params.study, root)
    tracker.check_reachable()
    return tracker
