"""Progress reporting: a tqdm bar on a terminal, periodic log lines elsewhere (CI, Ray job logs).

Two shapes of loop:
- `progress_bar(iterable, ...)`: a loop that advances one item at a time (sampling steps, NLL
  terms): on a terminal a tqdm bar, otherwise a line every `log_every_s` seconds and at the end;
- `StepProgress`: a loop that reports at its own times (training, every `log_every` steps) with
  values to show (loss, images/s): on a terminal a tqdm bar with those values, otherwise one
  line per report. Both show the estimated time left.

Whether the stream is a terminal decides; Ray workers, `dvc repro > log` and CI never are.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _write_line(stream: TextIO, line: str) -> None:
    """One line, written to the stream itself: Ray Train patches `print` in its workers to also
    send it to its logger, which the driver then shows a second time."""
    stream.write(line + "\n")
    stream.flush()


def format_duration(seconds: float) -> str:
    """A short duration for log lines: '7s', '3m04s', '2h05m'; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta_seconds(done: int, total: int, elapsed: float) -> float:
    """Seconds left at the mean rate so far (`done` units in `elapsed` s); inf if unknown."""
    if done <= 0 or elapsed <= 0:
        return math.inf
    return max(total - done, 0) * elapsed / done


def progress_bar(iterable: Iterable[T], total: Optional[int] = None, desc: str = "",
                 enabled: bool = True, log_every_s: float = 30.0, stream=None) -> Iterator[T]:
    """Iterate with progress: tqdm when `stream` (default stderr) is a terminal, else a line
    every `log_every_s` seconds (and at the end) with the count, rate and estimated time left."""
    if not enabled:
        yield from iterable
        return
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):

        yield from tqdm(iterable, total=total, desc=desc, file=stream, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    count = 0
    for item in iterable:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= log_every_s or (total is not None and count == total):
            last = now
            _write_line(stream, _status_line(desc, count, total, now - start))


def _status_line(desc: str, count: int, total: Optional[int], elapsed: float) -> str:
    rate = count / elapsed if elapsed > 0 else float("inf")
    if total:
        return (f"{desc}: {count}/{total} ({100.0 * count / total:.0f}%) "
                f"{rate:.2f} it/s, elapsed {format_duration(elapsed)}, "
                f"left {format_duration(eta_seconds(count, total, elapsed))}")
    return f"{desc}: {count} {rate:.2f} it/s, elapsed {format_duration(elapsed)}"


def _format_value(key: str, value: Any) -> str:
    if key == "images_per_s":
        return f"{value:.0f} images/s"
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class StepProgress:
    """Progress of a loop that reports every few steps, with values to show (training).

    On a terminal: a tqdm bar (step / total, rate, ETA) with the values as its postfix.
    Elsewhere: one line per `update`, e.g.
    `train eps_simple: step 100/450 (22%) loss 0.0712, 803 images/s, elapsed 16s, ETA 56s`.
    The ETA uses the mean rate since this object was made, counted from `start_step` (a
    resumed run does not count the steps it did before).
    """

    def __init__(self, total: int, desc: str = "", start_step: int = 0,
                 stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.total = int(total)
        self.desc = desc
        self.start_step = int(start_step)
        self.enabled = enabled
        self.stream = sys.stdout if stream is None else stream
        self.start = time.monotonic()
        self._bar = None
        if enabled and _is_terminal(self.stream):

            self._bar = tqdm(total=self.total, initial=self.start_step, desc=desc,
                             file=self.stream, dynamic_ncols=True, unit="step")

    def update(self, step: int, **values: Any) -> Optional[str]:
        """Report that `step` steps are done; returns the log line (None on a terminal)."""
        if not self.enabled:
            return None
        shown = ", ".join(_format_value(key, value) for key, value in values.items()
                          if value is not None)
        if self._bar is not None:
            self._bar.update(max(step - self._bar.n, 0))
            self._bar.set_postfix_str(shown, refresh=True)
            return None
        elapsed = time.monotonic() - self.start
        eta = eta_seconds(step - self.start_step, self.total - self.start_step, elapsed)
        line = (f"{self.desc}: step {step}/{self.total} ({100.0 * step / self.total:.0f}%)"
                f"{' ' + shown if shown else ''}, elapsed {format_duration(elapsed)}, "
                f"ETA {format_duration(eta)}")
        _write_line(self.stream, line)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ChunkProgress:
    """One progress line for a job cut into chunks and spread over workers, e.g.
    `sample eps_simple-0: 200/400 images (50%), 2/4 chunks (1 from storage), 15.3 images/s,
    2 workers, elapsed 13s, ETA 13s`.

    `done(units)` when a chunk comes back: a line at most every `every_s` seconds, and always
    for the last chunk; `idle()` while waiting: a line when none was written for
    `heartbeat_s`. The rate counts what this run computed (not chunks found in storage), over
    the time since the job started, worker start-up included."""

    def __init__(self, label: str, total_units: int, total_chunks: int, unit: str = "images",
                 reused_units: int = 0, reused_chunks: int = 0, workers: int = 1,
                 stream: Optional[TextIO] = None, every_s: float = 5.0,
                 heartbeat_s: float = 60.0, clock=time.monotonic):
        self.label, self.unit, self.workers = label, unit, workers
        self.total_units, self.total_chunks = int(total_units), int(total_chunks)
        self.reused_units, self.reused_chunks = int(reused_units), int(reused_chunks)
        self.units = self.chunks = 0
        self.stream = sys.stdout if stream is None else stream
        self.every_s, self.heartbeat_s, self.clock = every_s, heartbeat_s, clock
        self.start = self.last = clock()

    @property
    def rate(self) -> float:
        elapsed = self.clock() - self.start
        return self.units / elapsed if elapsed > 0 else math.nan

    def line(self) -> str:
        elapsed = self.clock() - self.start
        done_units = self.reused_units + self.units
        left = self.total_units - done_units
        eta = left / self.rate if self.units and self.rate > 0 else math.inf
        reused = f" ({self.reused_chunks} from storage)" if self.reused_chunks else ""
        pct = 100.0 * done_units / self.total_units if self.total_units else 100.0
        return (f"{self.label}: {done_units}/{self.total_units} {self.unit} ({pct:.0f}%), "
                f"{self.reused_chunks + self.chunks}/{self.total_chunks} chunks{reused}, "
                f"{self.rate:.4g} {self.unit}/s, {self.workers} "
                f"worker{'s' if self.workers != 1 else ''}, elapsed "
                f"{format_duration(elapsed)}, ETA {format_duration(eta if left else 0)}")

    def done(self, units: int) -> Optional[str]:
        """A chunk of `units` came back; returns the line written, if any."""
        self.units += int(units)
        self.chunks += 1
        finished = self.reused_chunks + self.chunks >= self.total_chunks
        if finished or self.clock() - self.last >= self.every_s:
            return self._write()
        return None

    def idle(self) -> Optional[str]:
        if self.clock() - self.last >= self.heartbeat_s:
            return self._write()
        return None

    def _write(self) -> str:
        self.last = self.clock()
        line = self.line()
        _write_line(self.stream, line)
        return line
