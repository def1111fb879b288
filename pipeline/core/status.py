"""How a run or a sweep trial ended: the one vocabulary every writer and reader of a status uses.

The values are the strings stored in model state.json, metrics/<run>_run.json, samples.npz and
the sweep's trials.csv; `Status` members compare equal to them (`Status.OK == "ok"`).
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    OK = "ok"              # trained (or trial finished) with a finite loss throughout
    UNSTABLE = "unstable"  # the loss became non-finite: training diverged
    STOPPED = "stopped"    # a sweep trial stopped at a rung (an NLL, no FID)
    ERROR = "error"        # a sweep trial that raised
