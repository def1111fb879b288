"""The one user-facing error type.

A `UserError` is a problem the user can fix (a params.yaml key, a missing or corrupt input, an
unreachable server, a diverged run that cannot continue); its message names the problem and the
fix in one line. Each module subclasses it for its own problems (ConfigError, DataError, ...),
and every stage catches it in one place (`stages._common.run`): `error: <message>`, exit 2, no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Iterator


class UserError(Exception):
    """A problem phrased for the user: what is wrong and what to do about it."""


def remake(command: str, what: str = "it") -> str:
    """The fix for a stage's output that cannot be read: "remake it with <command>"."""
    return f"remake {what} with {command}"


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it wraps, outermost first, each once: Ray's `.cause` (a
    worker's error, handed back wrapped), else `__cause__` (raise ... from), else `__context__`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "cause", None)
        current = (wrapped if isinstance(wrapped, BaseException)
                   else current.__cause__ or current.__context__)
