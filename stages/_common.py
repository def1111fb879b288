"""What every stage shares: argument parsing, params loading and user-facing errors.

A stage's `main()` parses paths, loads and validates the whole params.yaml (so a typo stops
`dvc repro` in seconds, before Ray or a model starts), then calls the library. Known
problems (bad params, missing or corrupt inputs, an unreachable tracking store: every
`pipeline.core.errors.UserError`) print `error: <message>` and exit 2, without a traceback.
SIGTERM (how DVC, Ray and a cluster's scheduler stop a process) is raised in the stage as
`Terminated`, a KeyboardInterrupt, so that its cleanup runs as for Ctrl-C: Ray is shut down,
the MLflow run is marked KILLED (`pipeline.core.tracking.Tracker.live_run`); the stage then
exits 143 (128 + SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from pipeline.core.errors import UserError
from pipeline.core.params import Params, load_params

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


def parser(prog: str, description: str, experiment: bool = False, folders: tuple[str, ...] = (),
           out: tuple[str, str] | None = None) -> argparse.ArgumentParser:
    """The stage's argument parser: --params, with `experiment` --experiment and --seed, an
    option per name of `folders` (FOLDERS), and with `out` = (default, what) --out."""
    p = argparse.ArgumentParser(prog=f"python -m stages.{prog}", description=description)
    p.add_argument("--params", default="params.yaml", type=Path,
                   help="the study's params file (default: %(default)s)")
    if experiment:
        p.add_argument("--experiment", "-e", required=True,
                       help="which entry of the `experiments` mapping in params.yaml")
        p.add_argument("--seed", "-s", type=int, default=None,
                       help="which of study.seeds to train with (default: the first)")
    for name in folders:
        default, what = FOLDERS[name]
        p.add_argument(f"--{name}", default=default, type=Path,
                       help=f"folder of {what} (default: %(default)s)")
    if out is not None:
        p.add_argument("--out", default=out[0], type=Path,
                       help=f"{out[1]} (default: %(default)s)")
    return p


def run(body: Callable[[Params], int | None], params_path: Path) -> int:
    """Load and validate params, run `body(params)`, turn user errors into exit code 2 and
    SIGTERM into `Terminated` (exit code 143)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return body(load_params(params_path)) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated as exc:
        print(f"error: {exc}; a rerun goes on from where it stopped", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def tracker_for(params: Params, root: Path = Path(".")):
    """The study's MLflow tracker, checked reachable (fails fast, naming the URI)."""
    from pipeline.core.tracking import Tracker

    tracker = Tracker(params.tracking, params.study, root)
    tracker.check_reachable()
    return tracker
