"""Bringing a study that ran as a Ray job home: what the job hands back, and how the checkout
takes it.

`ray job submit --working-dir .` runs `dvc repro` in a copy of the checkout on the cluster's
head node, which Ray deletes with its session. The job (`stages.submit --in-job`) therefore
pushes what DVC caches (models, samples, prepared data, per-run records, and DVC's run cache)
to the DVC remote, and packs the rest of what the checkout keeps with git into a results
bundle, stored beside the remote's data as `<remote>/ddpm-jobs/<job id>.tar.gz`:

- `dvc.lock`, and every `cache: false` output of dvc.yaml that exists (the headline numbers
  results/metrics.json, the tables and figures in results/, the charts' data plots/*.csv);
- `manifest.json`: the SHA-256 of every file of the checkout that the job's stages depended on
  and that git keeps (params.yaml, dvc.yaml, the code), as the job saw them.

The client (`stages.submit`) applies a bundle only where the checkout still has those files
unchanged (else `dvc.lock` would describe code or params the checkout does not have), writes
each file atomically, `dvc.lock` last, then `dvc pull`s the cached outputs.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from pipeline.core.errors import UserError
from pipeline.core.io import atomic_path, sha256_hex

BUNDLE_FOLDER = "ddpm-jobs"
MANIFEST = "manifest.json"
LOCK = "dvc.lock"


class BundleError(UserError, RuntimeError):
    """A results bundle that cannot be made or applied; the message says why and what to do."""


def bundle_key(job_id: str) -> str:
    return f"{BUNDLE_FOLDER}/{job_id}.tar.gz"


def uncached_outputs(repo: Path) -> list[str]:
    """The `cache: false` outputs (headline metrics, tables, charts) of dvc.yaml's stages that
    exist in `repo`, as paths relative to it (a folder as its files)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        paths = sorted({out.def_path for out in dvc_repo.index.outs if not out.use_cache})
    files = []
    for rel in paths:
        path = repo / rel
        if path.is_file():
            files.append(rel)
        elif path.is_dir():
            files.extend(str(p.relative_to(repo)) for p in sorted(path.rglob("*")) if p.is_file())
    return files


def source_files(repo: Path) -> list[str]:
    """The files of `repo` that dvc.lock's stages depend on and that are no stage's output
    (params.yaml, the code), plus dvc.yaml: what a bundle's dvc.lock describes."""
    lock = yaml.safe_load((repo / LOCK).read_text()) or {}
    stages = (lock.get("stages") or {}).values()
    outputs = {out["path"] for stage in stages for out in stage.get("outs") or []}
    files = {"dvc.yaml"}
    for stage in stages:
        for dep in stage.get("deps") or []:
            path = dep["path"]
            inside_output = any(path == o or path.startswith(f"{o}/") for o in outputs)
            if not inside_output and (repo / path).is_file():
                files.add(path)
        files.update(p for p in stage.get("params") or {} if (repo / p).is_file())
    return sorted(files)


def make_bundle(repo: Path) -> tuple[bytes, list[str]]:
    """The results bundle of the study in `repo` (after `dvc repro`), as .tar.gz bytes, and
    the files it holds (besides its manifest)."""
    repo = Path(repo)
    if not (repo / LOCK).is_file():
        raise BundleError(f"{repo / LOCK}: not found; the job ran no stage")
    manifest = {"sources": {rel: sha256_hex((repo / rel).read_bytes()) for rel in source_files(repo)}}
    members = [*uncached_outputs(repo), LOCK]
    manifest["files"] = members
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        payload = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
        for rel in members:
            tar.add(repo / rel, arcname=rel, recursive=False)
    return buffer.getvalue(), members


def read_bundle(data: bytes) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {path: content}) of a bundle; BundleError if it is not one."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            files = {}
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                if member.name.startswith(("/", "..")) or "/../" in member.name:
                    raise BundleError(f"results bundle: unsafe path {member.name!r}")
                files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"results bundle: not a .tar.gz ({exc})") from None
    if MANIFEST not in files or LOCK not in files:
        raise BundleError(f"results bundle: no {MANIFEST} or {LOCK} in it")
    return json.loads(files.pop(MANIFEST)), files


def changed_sources(repo: Path, manifest: Mapping) -> list[str]:
    """The files the job depended on that differ in (or are missing from) `repo` now."""
    return [rel for rel, digest in manifest["sources"].items()
            if not (repo / rel).is_file() or sha256_hex((repo / rel).read_bytes()) != digest]


def apply_bundle(repo: Path, files: Mapping[str, bytes]) -> list[str]:
    """Write the bundle's files into `repo`, each atomically, dvc.lock last; return them."""
    order = [rel for rel in files if rel != LOCK] + [LOCK]
    for rel in order:
        with atomic_path(repo / rel) as tmp:
            tmp.write_bytes(files[rel])
    return order


def summary(files: Iterable[str]) -> str:
    files = list(files)
    metrics = [f for f in files if f.startswith("metrics/") and f.endswith(".json")]
    tables = [f for f in files if f.startswith("results/")]
    return (f"{LOCK}, {len(metrics)} metrics files, {len(tables)} result files, "
            f"{len(files) - len(metrics) - len(tables) - 1} plot files")
