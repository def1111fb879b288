"""The MLflow tracking store: where it lives, whether it can be used, and writes that survive a
busy sqlite file. `pipeline.core.tracking` makes every MLflow call through these.

Where the store lives. A relative sqlite path and a relative artifact root are resolved against
the repo root: `DVC_ROOT` where DVC sets it (queued experiments run in a temporary copy of the
repo; DVC_ROOT names the user's repo, so their runs land in the user's mlflow.db), else the
folder the stage runs in.

Concurrency. Several processes may write the same sqlite file at once (sweep trials). MLflow
already sets `PRAGMA busy_timeout = 20000` on every session, but sqlite still answers
"database is locked" at once where waiting could deadlock (a read transaction upgrading to a
write), and MLflow re-raises that as an `MlflowException`. Every write of the Tracker therefore
goes through `retry_if_locked`: up to `LOCK_RETRIES` attempts with jittered exponential backoff,
then the error propagates. Finding-or-creating the experiment and a run, and the first opening
of a fresh database (MLflow runs its schema migrations without a lock), are serialized between
processes with an advisory file lock (POSIX `flock`), so that two stages never create two runs
for one experiment and two trials never migrate the same new file at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import sqlite3
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TypeVar

from pipeline.core.config import tracking_uri_problem
from pipeline.core.errors import UserError, error_chain
from pipeline.core.io import sha256_hex

try:
    import fcntl
except ImportError:  # Windows: no inter-process lock
    fcntl = None

if TYPE_CHECKING:
    from pipeline.core.config import TrackingConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_RETRIES = 8


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable sqlite folder, ...)."""


# --------------------------------------------------------------------------------------------
# URIs, hashes, git
# --------------------------------------------------------------------------------------------


def resolve_tracking_uri(tracking_cfg: TrackingConfig, root: str | Path) -> str:
    """The tracking URI: `MLFLOW_TRACKING_URI` if set, else `tracking.tracking_uri`.

    A relative sqlite path (`sqlite:///mlflow.db`) is made absolute against `root` (the repo
    root), so that stages started from another cwd (Ray workers, DVC) open the same file.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_cfg.tracking_uri
    return _absolute_sqlite_uri(uri, Path(root))


def resolve_artifact_root(tracking_cfg: TrackingConfig, root: str | Path) -> str:
    """The artifact root as a URI: a local path resolved against `root`, as `file://...`.

    A value that already is a URI (`s3://...`, `mlflow-artifacts:/...`) is returned as is.
    """
    value = tracking_cfg.artifact_root
    if has_scheme(value):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(root) / path
    return path.resolve().as_uri()


def is_server(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def study_root(root: str | Path = ".") -> Path:
    """The repo the study's records belong to: `DVC_ROOT` where DVC sets it (in a queued DVC
    experiment, the user's repo, not the temporary copy the stage runs in), else `root`."""
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and Path(dvc_root).is_dir():
        return Path(dvc_root).resolve()
    return Path(root).resolve()


def has_scheme(value: str) -> bool:
    scheme = urllib.parse.urlparse(value).scheme
    return len(scheme) > 1  # not a Windows drive letter


def _absolute_sqlite_uri(uri: str, root: Path) -> str:
    if not uri.startswith("sqlite:///"):
        return uri  # sqlite:// (in memory), http(s)://, postgresql://, ...
    rest = uri[len("sqlite:///"):]
    path_part, sep, query = rest.partition("?")
    if path_part in ("", ":memory:") or path_part.startswith("/"):
        return uri  # in memory, or already absolute (sqlite:////abs/path.db)
    path = (root / urllib.parse.unquote(path_part)).resolve()
    return f"sqlite:///{path.as_posix()}{sep}{query}"  # /abs -> sqlite:////abs


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a sqlite URI, None for other URIs and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path_part = uri[len("sqlite:///"):].partition("?")[0]
    if path_part in ("", ":memory:"):
        return None
    return Path(urllib.parse.unquote(path_part))


# --------------------------------------------------------------------------------------------
# Reachability, locking, retries
# --------------------------------------------------------------------------------------------


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with `TrackingError` naming the URI if the store cannot be used.

    http(s): a TCP connect (and, for http, a GET of /health) with a short timeout, before
    MLflow's own retries (which can take minutes) get a chance. sqlite: the database folder is
    created if missing and must be writable. A scheme MLflow cannot track into (see
    `pipeline.core.config.TRACKING_SCHEMES`; MLFLOW_TRACKING_URI is not checked with params.yaml) is
    refused; other database schemes are left to MLflow.
    """
    problem = tracking_uri_problem(tracking_uri)
    if problem is not None:
        source = ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == tracking_uri
                  else "tracking store")
        raise TrackingError(f"{source}: {problem}")
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        _probe_http(tracking_uri, parsed, timeout_s)
    elif parsed.scheme == "sqlite":
        _probe_sqlite(tracking_uri)


def _probe_http(uri: str, parsed: urllib.parse.ParseResult, timeout_s: float) -> None:
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({exc}); start it "
                            "(mlflow server ...) or set MLFLOW_TRACKING_URI / "
                            "tracking.tracking_uri to a reachable store") from None
    if parsed.scheme != "http":
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # something answered (auth, proxy): the server is there, MLflow reports the rest
    except (OSError, urllib.error.URLError) as exc:
        raise TrackingError(f"MLflow tracking server {uri} accepts connections but does not "
                            f"answer GET /health within {timeout_s:g} s ({exc})") from None


def _probe_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(f"tracking store {uri}: cannot create the folder {path.parent} "
                            f"({exc.strerror or exc})") from None
    # sqlite writes a journal beside the file: its folder must be writable too
    unwritable = [p for p in (path, path.parent) if p.exists() and not os.access(p, os.W_OK)]
    if unwritable:
        raise TrackingError(f"tracking store {uri}: {unwritable[0]} is not writable; make it "
                            "writable, or set MLFLOW_TRACKING_URI or tracking.tracking_uri to a "
                            "store that accepts writes")
    problem = _sqlite_problem(path)
    if problem is not None:
        raise TrackingError(f"tracking store {uri}: {path} is not a readable sqlite database "
                            f"({problem}); move it aside (mv {path} {path}.bad) and rerun to "
                            "start a fresh store, or set tracking.tracking_uri / "
                            "MLFLOW_TRACKING_URI to another store")


def _sqlite_problem(path: Path) -> str | None:
    """What is wrong with the sqlite file at `path` (None: missing, empty or sound); read only."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            return "no sqlite header"
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return None  # another stage is writing it: a database, in use
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK":
            return None  # a writer was killed mid-transaction: the next writer rolls it back
        return str(exc)
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if verdict == "ok" else verdict


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """An inter-process lock per sqlite store (no-op for other stores and off POSIX)."""
    path = sqlite_path(tracking_uri)
    if path is None or fcntl is None:
        yield
        return
    lock_path = Path(tempfile.gettempdir()) / f"ddpm-mlflow-{sha256_hex(str(path), length=16)}.lock"
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_locked_error(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it wraps) is sqlite's "database is locked"."""
    return any("database is locked" in str(error) for error in error_chain(exc))


# What a store that refuses writes says, in sqlite's, SQLAlchemy's, the OS's and an MLflow
# server's words: (text in the error chain, lower case; what it means).
REFUSED_WRITES = (("readonly database", "it is read-only"),
                  ("read-only file system", "its file system is read-only"),
                  ("permission denied", "permission denied"),
                  ("permission_denied", "the server denies this client writes"),
                  ("unable to open database file", "the sqlite file cannot be opened for writing"),
                  ("database or disk is full", "its disk is full"),
                  ("no space left on device", "its disk is full"),
                  ("disk i/o error", "a disk I/O error"))


def refused_write(exc: BaseException, tracking_uri: str) -> Optional[TrackingError]:
    """A one-line `TrackingError` naming the store `tracking_uri` if `exc` (or an exception it
    wraps) says the store refused a write; None for any other error."""
    for error in error_chain(exc):
        text = str(error).lower()
        for needle, meaning in REFUSED_WRITES:
            if needle in text:
                return TrackingError(
                    f"the MLflow store {tracking_uri} refuses writes ({meaning}); make it "
                    "writable (the sqlite file and its folder), or set MLFLOW_TRACKING_URI or "
                    "tracking.tracking_uri to a store that accepts them, then rerun `dvc repro`")
    return None


def retry_if_locked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`, retrying on "database is locked" with jittered exponential backoff."""
    for attempt in range(LOCK_RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == LOCK_RETRIES - 1 or not _is_locked_error(exc):
                raise
            delay = min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random())
            log.warning("tracking store busy (database is locked); retry %d/%d in %.2f s",
                        attempt + 1, LOCK_RETRIES - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
