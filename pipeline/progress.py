"""Progress reporting: a tqdm bar on a terminal, periodic log lines elsewhere (CI, Ray job logs)."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], total: Optional[int] = None, desc: str = "",
                 enabled: bool = True, log_every_s: float = 30.0, stream=None) -> Iterator[T]:
    """Iterate with progress: tqdm when `stream` is a terminal, else a line every `log_every_s`
    seconds (and at the end) with the count, rate and estimated time left."""
    if not enabled:
        yield from iterable
        return
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

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
            print(_status_line(desc, count, total, now - start), file=stream, flush=True)


def _status_line(desc: str, count: int, total: Optional[int], elapsed: float) -> str:
    rate = count / elapsed if elapsed > 0 else float("inf")
    if total:
        left = (total - count) / rate if rate > 0 else float("inf")
        return (f"{desc}: {count}/{total} ({100.0 * count / total:.0f}%) "
                f"{rate:.2f} it/s, elapsed {elapsed:.0f}s, left {left:.0f}s")
    return f"{desc}: {count} {rate:.2f} it/s, elapsed {elapsed:.0f}s"
