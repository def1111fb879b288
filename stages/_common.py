"""What every stage shares: argument parsing, params loading and user-facing errors.

A stage's `main()` parses paths, loads and validates the whole params.yaml (so a typo stops
`dvc repro` in seconds, before Ray or a model starts), then calls the library. Known
problems (bad params, missing or corrupt inputs, an unreachable tracking store: every
`pipeline.errors.UserError`) print `error: <message>` and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pipeline.config import Params, load_params
from pipeline.errors import UserError

EXIT_USER_ERROR = 2


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
        return body(load_params(params_path)) or 0
    except UserError as exc:
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
