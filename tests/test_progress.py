"""Progress reporting: log lines when the output is not a terminal (CI, Ray job logs), tqdm on
a terminal, nothing when disabled."""

import io
import math
import re

import pytest

from pipeline.core.progress import StepProgress, eta_seconds, format_duration, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_off_a_terminal_prints_lines_with_count_rate_and_time_left():
    stream = io.StringIO()  # isatty() is False, like a CI log or a Ray worker's stdout
    items = list(progress_bar(range(5), total=5, desc="sampling", log_every_s=0.0,
                              stream=stream))
    assert items == [0, 1, 2, 3, 4]  # the items pass through unchanged
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # log_every_s=0: one line per item
    assert re.fullmatch(r"sampling: 5/5 \(100%\) [\d.]+ it/s, elapsed \d+s, left 0s", lines[-1])
    assert lines[0].startswith("sampling: 1/5 (20%)")
    assert "\r" not in stream.getvalue()  # no carriage-return redraws in a log file


def test_progress_bar_off_a_terminal_is_periodic_and_always_reports_the_end():
    stream = io.StringIO()
    list(progress_bar(range(100), total=100, desc="nll (exact)", log_every_s=3600.0,
                      stream=stream))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nll (exact): 100/100 (100%)")


def test_progress_bar_without_total_and_disabled():
    stream = io.StringIO()
    list(progress_bar(iter(range(3)), desc="x", log_every_s=0.0, stream=stream))
    assert re.fullmatch(r"x: 3 [\d.]+ it/s, elapsed \d+s", stream.getvalue().splitlines()[-1])
    quiet = io.StringIO()
    assert list(progress_bar(range(3), total=3, enabled=False, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_progress_bar_on_a_terminal_is_a_tqdm_bar():
    stream = Terminal()
    assert list(progress_bar(range(4), total=4, desc="sampling", stream=stream)) == [0, 1, 2, 3]
    text = stream.getvalue()
    assert "\r" in text and "sampling" in text and "4/4" in text


def test_step_progress_off_a_terminal_prints_a_line_per_update_with_eta(monkeypatch):
    times = [100.0, 110.0, 130.0]  # made at t=100; updates at t=110 and t=130
    monkeypatch.setattr("pipeline.core.progress.time.monotonic",
                        lambda: times.pop(0) if len(times) > 1 else times[0])
    stream = io.StringIO()
    progress = StepProgress(450, desc="train eps_simple", start_step=50, stream=stream)
    line = progress.update(100, loss=0.071234, images_per_s=803.4)
    # 50 steps in 10 s since the resume at step 50: 350 steps left take 70 s
    assert line == ("train eps_simple: step 100/450 (22%) loss 0.07123, 803 images/s, "
                    "elapsed 10s, ETA 1m10s")
    line = progress.update(450, loss=0.05)
    assert line.endswith("step 450/450 (100%) loss 0.05, elapsed 30s, ETA 0s")
    assert stream.getvalue().splitlines() == [
        "train eps_simple: step 100/450 (22%) loss 0.07123, 803 images/s, elapsed 10s, "
        "ETA 1m10s", line]


def test_step_progress_on_a_terminal_and_disabled():
    stream = Terminal()
    with StepProgress(20, desc="train", stream=stream) as progress:
        assert progress.update(10, loss=0.5, images_per_s=100.0) is None
        progress.update(20, loss=0.25)
    text = stream.getvalue()
    assert "train" in text and "20/20" in text and "loss 0.25" in text
    quiet = io.StringIO()
    assert StepProgress(20, stream=quiet, enabled=False).update(10, loss=1.0) is None
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (7.4, "7s"), (59.6, "1m00s"),
                                          (184, "3m04s"), (7500, "2h05m"), (math.inf, "?"),
                                          (math.nan, "?"), (-1, "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_eta_seconds():
    assert eta_seconds(10, 40, 5.0) == pytest.approx(15.0)
    assert eta_seconds(0, 40, 5.0) == math.inf
    assert eta_seconds(40, 40, 5.0) == 0.0
