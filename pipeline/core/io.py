"""Atomic file output: a stage killed mid-write never leaves a file a later stage would accept.

Every writer goes to a temporary file in the destination folder and renames it into place
(`os.replace` is atomic on POSIX within one filesystem).

Storage locations (Ray Train / Tune storage, `cluster.storage`) are a local path or a URI
(`s3://bucket/prefix`, `gs://...`) that every node of a cluster reaches; `write_to_storage` and
`fetch_from_storage` move files there and back through pyarrow's filesystems, as Ray does (an
S3-compatible endpoint such as MinIO through `AWS_ENDPOINT_URL`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError that names no file (a full disk: ENOSPC) names the output `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming(path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _naming(path):
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual mode
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_hex(*chunks: bytes | str, length: int | None = None) -> str:
    """SHA-256 of `chunks` in order (str as UTF-8) as hex digits, the first `length` of them:
    the one hash of the project (run names, config hashes, the job bundle's source manifest)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
    return digest.hexdigest()[:length]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_load(path: str | Path, **kwargs: Any) -> Any:
    """`torch.load(path, **kwargs)` of a file whose bytes are checked first: torch's reader does
    not check the CRC-32 its writer stores for every entry of the zip, so a byte flipped in a
    tensor's data loads silently as other weights. `zipfile`'s check reads the file once more
    (about a second per GB) and raises `zipfile.BadZipFile` naming the damaged entry."""
    import torch

    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise zipfile.BadZipFile(f"bad CRC-32 for {damaged!r}: its bytes were changed after "
                                 "it was written")
    return torch.load(path, **kwargs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def is_uri(location: str | Path) -> bool:
    """Whether a storage location is a URI (`s3://...`) rather than a local path."""
    return "://" in str(location)


def storage_location(location: str | Path) -> str:
    """A storage location as Ray takes it: a URI as is, a local path made absolute."""
    return str(location).rstrip("/") if is_uri(location) else str(Path(location).resolve())


def storage_filesystem(location: str | Path):
    """(pyarrow filesystem, path within it) of a storage location."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(str(location))
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def write_to_storage(location: str | Path, data: bytes) -> None:
    """Write `data` as the file `location` (atomically: a rename locally, one PUT on S3)."""
    if not is_uri(location):
        with atomic_path(location) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = storage_filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_from_storage(location: str | Path) -> bytes:
    """The bytes of the storage file `location`."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = storage_filesystem(location)
    with fs.open_input_stream(path) as src:
        return src.read()


def list_storage(location: str | Path, folders: bool = False) -> list[str]:
    """The names of the files (with `folders`, the folders) in the storage folder `location`
    (none if it does not exist)."""
    if not is_uri(location):
        folder = Path(location)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p.is_dir() if folders else p.is_file()))
    import pyarrow.fs

    fs, path = storage_filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return []
    kind = pyarrow.fs.FileType.Directory if folders else pyarrow.fs.FileType.File
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    return sorted(i.base_name for i in infos if i.type == kind)


def fetch_from_storage(location: str | Path, scratch: str | Path) -> Path:
    """A local folder with the files of the storage folder `location`: the folder itself where
    it is local, else a copy under `scratch` (empty if `location` does not exist)."""
    if not is_uri(location):
        return Path(location)
    import pyarrow.fs

    fs, path = storage_filesystem(location)
    local = Path(scratch)
    local.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        pyarrow.fs.copy_files(path, str(local.resolve()), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def delete_from_storage(location: str | Path) -> None:
    """Delete the storage folder `location` and everything in it, or the file `location`
    (nothing if it is absent)."""
    if not is_uri(location):
        if Path(location).is_file():
            Path(location).unlink(missing_ok=True)
        else:
            shutil.rmtree(location, ignore_errors=True)
        return
    import pyarrow.fs

    fs, path = storage_filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pyarrow.fs.FileType.File:
        fs.delete_file(path)
    elif kind != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)
