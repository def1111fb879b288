"""What every stage shares: argument parsing, params loading and user-facing errors.

A stage's `main()` parses paths, loads and validates the whole params.yaml (so a typo stops
`dvc repro` in seconds, before Ray or a model starts), then calls one pipeline function. Known
problems (bad params, missing or corrupt inputs, an unreachable tracking store) print
`error: <message>` and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pipeline.config import ConfigError, Params, load_params

EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user.

    Only the error classes of modules already imported are looked up: an error of a module that
    was never imported cannot have been raised, and importing it (torch, pandas, Ray) would
    delay the message by seconds.
    """
    from pipeline.tracking import TrackingError

    errors: list[type[BaseException]] = [ConfigError, TrackingError]
    for module, name in (("pipeline.data", "DataError"), ("pipeline.metrics", "MetricsError"),
                         ("pipeline.evaluation", "ResultsError"),

                         ("pipeline.sampling", "ModelError"), ("pipeline.tables", "TablesError"),
                         ("pipeline.training", "CheckpointError"),
                         ("pipeline.distributed", "TrainingError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def parser(prog: str, description: str, experiment: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m stages.{prog}", description=description)
    p.add_argument("--params", default="params.yaml", type=Path,
                   help="the study's params file (default: %(default)s)")
    if experiment:
        p.add_argument("--experiment", "-e", required=True,
                       help="which entry of the `experiments` mapping in params.yaml")
        p.add_argument("--seed", "-s", type=int, default=None,
                       help="which of study.seeds to train with (default: the first)")
    return p


def run(body: Callable[[Params], int | None], params_path: Path) -> int:
    """Load and validate params, run `body(params)`, turn user errors into exit code 2."""
    try:
        params = load_params(params_path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return body(params) or 0
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def tracker_for(params: Params, root: Path = Path(".")):
    """The study's MLflow tracker, checked reachable (fails fast, naming the URI)."""
    from pipeline.tracking import Tracker

    tracker = Tracker(params.tracking, params.study, root)
    tracker.check_reachable()
    return tracker


def device_for(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
