"""stages.submit and pipeline.artifacts.bundle without a cluster: the results bundle on a small DVC
repo, and the refusals before anything is submitted (the cluster itself: test_cluster.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT, env_for
from pipeline.artifacts import bundle as cluster_job
from pipeline.artifacts.bundle import BundleError
from pipeline.core.io import fetch_from_storage, write_to_storage

DVC_YAML = {"stages": {"count": {
    "cmd": "python count.py", "deps": ["count.py"], "params": ["n"],
    "outs": ["out/data.bin", {"out/table.md": {"cache": False}}],
    "metrics": [{"metrics/m.json": {"cache": False}}],
    "plots": [{"plots/curve": {"cache": False}}]}}}
COUNT = """import json, pathlib, yaml
n = yaml.safe_load(open("params.yaml"))["n"]
for d in ("out", "metrics", "plots/curve"):
    pathlib.Path(d).mkdir(parents=True, exist_ok=True)
pathlib.Path("out/data.bin").write_bytes(bytes(range(n)))
pathlib.Path("out/table.md").write_text(f"| n |\\n| {n} |\\n")
pathlib.Path("metrics/m.json").write_text(json.dumps({"n": n}))
for i in range(2):
    pathlib.Path(f"plots/curve/{i}.csv").write_text(f"step,v\\n{i},{n}\\n")
"""


def run(args, cwd):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture
def study(tmp_path) -> Path:
    """A one-stage DVC project (no git) after `dvc repro`."""
    repo = tmp_path / "job"
    repo.mkdir()
    run(["dvc", "init", "--no-scm", "-q"], repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (repo / "params.yaml").write_text("n: 5\n")
    (repo / "count.py").write_text(COUNT)
    run(["dvc", "repro", "-q"], repo)
    return repo


def test_a_bundle_holds_the_lock_and_the_uncached_outputs_and_applies_where_sources_match(
        study, tmp_path):
    files = cluster_job.uncached_outputs(study)
    assert files == ["metrics/m.json", "out/table.md", "plots/curve/0.csv", "plots/curve/1.csv"]
    assert cluster_job.source_files(study) == ["count.py", "dvc.yaml", "params.yaml"]
    bundle, members = cluster_job.make_bundle(study)
    manifest, content = cluster_job.read_bundle(bundle)
    assert set(content) == {*files, "dvc.lock"} == set(members) and "out/data.bin" not in content
    assert content["metrics/m.json"] == (study / "metrics/m.json").read_bytes()

    client = tmp_path / "client"  # the checkout the job was submitted from, before the run
    client.mkdir()
    for name in ("dvc.yaml", "params.yaml", "count.py"):
        (client / name).write_bytes((study / name).read_bytes())
    assert cluster_job.changed_sources(client, manifest) == []
    written = cluster_job.apply_bundle(client, content)
    assert written[-1] == "dvc.lock"  # last: a crash before it leaves the old lock
    assert json.loads((client / "metrics/m.json").read_text()) == {"n": 5}
    assert (client / "dvc.lock").read_bytes() == (study / "dvc.lock").read_bytes()

    (client / "params.yaml").write_text("n: 6\n")
    assert cluster_job.changed_sources(client, manifest) == ["params.yaml"]
    (client / "count.py").unlink()
    assert cluster_job.changed_sources(client, manifest) == ["count.py", "params.yaml"]


def test_fetch_refuses_a_bundle_whose_sources_changed_and_writes_nothing(study, tmp_path):
    lock = (study / "dvc.lock").read_bytes()
    no_remote = subprocess.run([sys.executable, "-m", "stages.submit", "--fetch", "job-1"],
                               cwd=study, capture_output=True, text=True, timeout=120,
                               env=env_for(PROJECT, isolated=True))
    assert no_remote.returncode == 2, no_remote.stderr
    assert no_remote.stderr.startswith("error: no default DVC remote in this checkout")
    assert "dvc remote add -d" in no_remote.stderr and no_remote.stderr.count("\n") == 1
    assert (study / "dvc.lock").read_bytes() == lock
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "store", str(remote)], study)
    write_to_storage(remote / cluster_job.bundle_key("job-1"), cluster_job.make_bundle(study)[0])
    (study / "params.yaml").write_text("n: 7\n")
    lock = (study / "dvc.lock").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "stages.submit", "--fetch", "job-1"],
                          cwd=study, capture_output=True, text=True, timeout=120,
                          env=env_for(PROJECT, isolated=True))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: params.yaml changed since job job-1 was submitted")
    assert "--fetch job-1" in line and "\n" not in line
    assert (study / "dvc.lock").read_bytes() == lock
    missing = subprocess.run([sys.executable, "-m", "stages.submit", "--fetch", "job-2"],
                             cwd=study, capture_output=True, text=True, timeout=120,
                             env=env_for(PROJECT, isolated=True))
    assert missing.returncode == 2 and "no results bundle" in missing.stderr
    assert str(remote / "ddpm-jobs" / "job-2.tar.gz") in missing.stderr


def test_a_bundle_with_unsafe_paths_or_no_lock_is_refused():
    def tar(members):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    with pytest.raises(BundleError, match=r"unsafe path '\.\./evil'"):
        cluster_job.read_bundle(tar({"manifest.json": b"{}", "dvc.lock": b"", "../evil": b""}))
    with pytest.raises(BundleError, match="no manifest.json or dvc.lock"):
        cluster_job.read_bundle(tar({"manifest.json": b"{}"}))
    with pytest.raises(BundleError, match="not a .tar.gz"):
        cluster_job.read_bundle(b"plain bytes")


def test_storage_round_trip_through_a_local_folder(tmp_path):
    write_to_storage(tmp_path / "store" / "ema" / "ema_20.pt", b"weights")
    assert fetch_from_storage(tmp_path / "store" / "ema", tmp_path / "scratch") == \
        tmp_path / "store" / "ema"  # local storage is read in place
    assert (tmp_path / "store" / "ema" / "ema_20.pt").read_bytes() == b"weights"
    assert not (tmp_path / "scratch").exists()


def submit(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.submit", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120,
                          env=env_for(PROJECT, isolated=True))


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The project's files in a DVC repo (no git), as a user's checkout."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        (repo / name).write_bytes((PROJECT / name).read_bytes())
    run(["dvc", "init", "--no-scm", "-q"], repo)
    return repo


def test_submit_refuses_without_a_remote_a_server_or_a_cluster(checkout, tmp_path):
    """Each refusal is one line naming the fix, before anything is uploaded."""
    no_address = submit(checkout)
    assert no_address.returncode == 2 and "--address http://HEAD:8265" in no_address.stderr
    address = ["--address", "http://127.0.0.1:9"]
    no_remote = submit(checkout, *address)
    assert no_remote.returncode == 2
    assert "no default DVC remote" in no_remote.stderr and "dvc remote add -d" in no_remote.stderr
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], checkout)
    local_mlflow = submit(checkout, *address)
    assert local_mlflow.returncode == 2
    assert "sqlite:///" in local_mlflow.stderr and "MLFLOW_TRACKING_URI" in local_mlflow.stderr
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    params["tracking"]["tracking_uri"] = "http://127.0.0.1:9"  # nothing listens on port 9
    (checkout / "params.yaml").write_text(yaml.safe_dump(params))
    no_server = submit(checkout, *address)
    assert no_server.returncode == 2 and "unreachable" in no_server.stderr
    for proc in (no_address, no_remote, local_mlflow, no_server):
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
