"""Faults a long run meets, each injected for real: a stored chunk damaged before a rerun (garbage,
or one byte flipped), a disk that fills while a stage writes (a small tmpfs in a mount
namespace), a tracking store that turns read-only, and params.yaml or a stage's code edited
while the stage runs. Each is caught in one line (exit 2, no traceback) and nothing is recorded
that is not true: no half-written output, dvc.lock untouched. docs/reliability.md lists them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import PROJECT, env_for, make_study_repo, sh, tiny


# --------------------------------------------------------------------------------------------
# params.yaml or the stage's code edited while the stage runs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch) -> Path:
    """A fresh study repo (git and DVC initialised), the current folder, seen from a stage that
    `dvc repro` started as prepare (DVC_STAGE, DVC_ROOT as DVC sets them)."""
    repo = make_study_repo(tmp_path, tiny)
    sh(["dvc", "init", "-q", "-f"], repo)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_STAGE", "prepare")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    return repo


def run_stage(body) -> tuple[int, str]:
    """`stages._common.run(body)` on ./params.yaml: its exit code and what it printed to stderr."""
    from stages import _common

    err = io.StringIO()
    with redirect_stderr(err):
        code = _common.run(body, Path("params.yaml"))
    return code, err.getvalue()


def edit_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("edit, needle", [
    (lambda repo: edit_param(repo, "data", "seed", 7), "data.seed 0 -> 7"),
    (lambda repo: (repo / "stages" / "prepare.py").write_text(
        (repo / "stages" / "prepare.py").read_text() + "\n# edited\n"), "stages/prepare.py"),
    (lambda repo: (repo / "params.yaml").write_text("data: [unclosed\n"),
     "its params file became unreadable"),
])
def test_a_stage_whose_recorded_params_or_code_change_while_it_runs_fails_in_one_line(
        dvc_repo, edit, needle):
    """prepare's body edits, as a user would mid-run, a key DVC records for it (dvc.yaml's
    `params: [data]`), one of its code deps, or leaves params.yaml half-written: the stage ends
    with exit 2 and one line naming the change and `dvc repro`, though the body succeeded."""
    seen = []

    def body(params):
        seen.append(params.data.seed)
        edit(dvc_repo)
        return 0

    code, err = run_stage(body)
    assert seen == [0]
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: prepare: ") and needle in line, err
    assert "rerun `dvc repro`" in line and "Traceback" not in err


def test_edits_the_stage_does_not_record_or_none_pass(dvc_repo):
    """A key prepare does not list (train.steps: DVC records it for train only) edited mid-run,
    or no edit at all: the stage ends as its body did."""
    assert run_stage(lambda params: edit_param(dvc_repo, "train", "steps", 99)) == (0, "")
    assert run_stage(lambda params: 0) == (0, "")
    assert run_stage(lambda params: 3) == (3, "")  # a failed body is not checked again


def test_a_stage_run_by_hand_is_not_watched(dvc_repo, monkeypatch):
    """Outside `dvc repro` (no DVC_STAGE) nothing records the stage: an edit is not an error."""
    monkeypatch.delenv("DVC_STAGE")
    assert run_stage(lambda params: edit_param(dvc_repo, "data", "seed", 7)) == (0, "")


# --------------------------------------------------------------------------------------------
# A file damaged on disk or in storage after it was written: one byte flipped
# --------------------------------------------------------------------------------------------


def flip_in_largest_entry(path: Path) -> None:
    """Flip one bit in the middle of the largest entry's data of the zip file `path` (a torch
    file's biggest tensor): what torch's own reader loads silently as other numbers."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = entry.header_offset
    name_len = int.from_bytes(data[header + 26:header + 28], "little")
    extra_len = int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len
    data[start + entry.compress_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_torch_reads_a_flipped_byte_silently_and_the_checked_loader_does_not(tmp_path):
    """Why `pipeline.core.io.torch_load` exists: `torch.load` returns other weights from a file
    with one bit flipped in a tensor; the checked loader raises, naming the damaged entry."""
    import zipfile

    import torch

    from pipeline.core.io import torch_load

    weights = {"w": torch.linspace(-1, 1, 4096)}
    path = tmp_path / "weights.pt"
    torch.save(weights, path)
    flip_in_largest_entry(path)
    assert not torch.equal(torch.load(path, weights_only=True)["w"], weights["w"])
    with pytest.raises(zipfile.BadZipFile, match="bad CRC-32 for 'weights/data/0'"):
        torch_load(path, weights_only=True)


def test_model_classifier_and_checkpoint_with_a_flipped_byte_are_refused_naming_the_file(
        tmp_path):
    """A trained model's ema.pt, the digits classifier and a training checkpoint, each with one
    bit flipped in its largest tensor: each reader refuses it in one line naming the file and
    what to rerun (it never loads other weights)."""
    import json

    import torch

    from pipeline.artifacts.models import ModelError, load_model
    from pipeline.training.loop import CheckpointError, load_training_state
    from pipeline.core.params import load_params
    from pipeline.measure.digits_classifier import (ClassifierError, DigitsClassifier, load_classifier,
                                             save_classifier)
    from pipeline.model.unet import build_model

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    tiny(params, experiments=("eps_simple",))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    exp = load_params(tmp_path / "params.yaml").experiment("eps_simple", 0)
    folder = tmp_path / "models" / exp.key
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 40, "status": "ok",
                                                   "image_shape": [1, 8, 8], "data_levels": 17}))
    torch.save(build_model(exp, (1, 8, 8)).state_dict(), folder / "ema.pt")
    classifier = tmp_path / "classifier.pt"
    save_classifier(DigitsClassifier(), classifier)
    checkpoint = tmp_path / "state.pt"
    torch.save({"format": "ddpm-train-state/1", "model": torch.randn(5000)}, checkpoint)

    for path in (folder / "ema.pt", classifier, checkpoint):
        flip_in_largest_entry(path)
    with pytest.raises(ModelError, match=rf"^{re.escape(str(folder / 'ema.pt'))}: corrupt or "
                                         rf"truncated weights .*dvc repro train@{exp.key}"):
        load_model(exp, folder)
    with pytest.raises(ClassifierError, match=rf"^{re.escape(str(classifier))}: .*corrupt"):
        load_classifier(classifier)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(checkpoint))}: corrupt or "
                                              "truncated checkpoint"):
        load_training_state(checkpoint)


# --------------------------------------------------------------------------------------------
# A full disk, a read-only tracking store
# --------------------------------------------------------------------------------------------


def in_mount_namespace(script: str, cwd: Path, env: dict, timeout: float = 600):
    """`sh -c script` in a mount namespace of its own (`unshare -m`): what it mounts is seen by
    its processes only, and gone when it ends."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_full_disk_while_prepare_writes_is_one_line_and_keeps_the_earlier_output(tmp_path):
    """prepare's --out on a 64 KiB tmpfs that holds an earlier output: the new splits (115 KB)
    do not fit; exit 2, one line naming the file, "no space left" and the fix; the earlier
    output is there byte for byte and nothing else is left on the disk."""
    from test_reliability import assert_user_error, tiny_params

    params = tiny_params(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && mkdir -p {disk}/prepared/digits && "
              f"printf earlier > {disk}/prepared/digits/train.npz && "
              f"{sys.executable} -m stages.prepare --params {params} --out {disk}/prepared; "
              f"code=$?; (cd {disk} && find . -type f | sort) > {tmp_path}/left.txt; "
              f"cat {disk}/prepared/digits/train.npz > {tmp_path}/earlier.txt; exit $code")
    proc = in_mount_namespace(script, tmp_path, env_for(PROJECT))
    line = assert_user_error(proc, f"cannot write {disk}/prepared/", "no space left on its "
                             "device", "nothing half-written was kept", "rerun `dvc repro`")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (tmp_path / "left.txt").read_text().split() == ["./prepared/digits/train.npz"], line
    assert (tmp_path / "earlier.txt").read_text() == "earlier"


@pytest.mark.slow
def test_a_full_disk_while_sample_writes_is_one_line_and_loses_nothing(shared_study, tmp_path):
    """The shared study's sample@eps_simple-0 again, its --out on a tmpfs of one page (4 KiB)
    and its chunks in storage elsewhere: exit 2, one line naming the file and "no space left";
    no samples folder or temporary is left on that disk, the chunks stay in storage for the
    rerun, and the study's own samples are untouched."""
    from test_reliability import assert_user_error, snapshot

    disk, storage = tmp_path / "disk", tmp_path / "storage"
    disk.mkdir()
    before = snapshot(shared_study)
    script = (f"mount -t tmpfs -o size=4k tmpfs {disk} && {sys.executable} -m stages.sample "
              f"-e eps_simple --params {shared_study / 'params.yaml'} --models "
              f"{shared_study / 'models'} --out {disk}/samples; code=$?; "
              f"(cd {disk} && find . | sort) > {tmp_path}/left.txt; exit $code")
    proc = in_mount_namespace(script, tmp_path, env_for(shared_study, extra={
        "DDPM_STORAGE": str(storage)}))
    assert_user_error(proc, f"cannot write {disk}/samples/", "no space left on its device",
                      "rerun `dvc repro`")
    assert (tmp_path / "left.txt").read_text().split() in (["."], [".", "./samples"])
    assert len(list(storage.glob("chunks/*/*.npz"))) == 1  # the one chunk, kept
    assert snapshot(shared_study) == before


def read_only_script(folder: Path, command: str, trigger: Path | None = None) -> str:
    """A mount-namespace script that runs `command` with `folder` made read-only (a read-only
    bind mount of it over itself: root writes through file modes, not through that), at once,
    or with `trigger` once that file appears while `command` runs (a fresh mount stacked on the
    folder: Linux refuses to remount read-only a mount with files open for writing)."""
    read_only = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"
    if trigger is None:
        return f"{read_only} && {command}"
    return (f"{command} & pid=$!; "
            f"while [ ! -e {trigger} ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done; "
            f"{read_only} || echo 'the store was not made read-only' >&2; wait $pid")


def test_a_read_only_tracking_store_stops_a_stage_before_it_works(tmp_path):
    """The study's mlflow.db in a folder mounted read-only: prepare (the study's first stage)
    stops in one line naming the store and the fix, and writes nothing."""
    from test_reliability import assert_user_error, tiny_params

    params = tiny_params(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    env = env_for(PROJECT, extra={"MLFLOW_TRACKING_URI": uri})
    made = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params),
                           "--out", str(tmp_path / "first")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr  # the store exists, with its tables
    command = f"{sys.executable} -m stages.prepare --params {params} --out {tmp_path}/prepared"
    proc = in_mount_namespace(read_only_script(store, command), tmp_path, env)
    assert_user_error(proc, f"tracking store {uri}: {store}", "is not writable",
                      "MLFLOW_TRACKING_URI or tracking.tracking_uri")
    assert not (tmp_path / "prepared").exists()


@pytest.mark.slow
def test_a_tracking_store_turned_read_only_mid_evaluate_is_one_line(shared_study, tmp_path):
    """The shared study's evaluate@eps_simple-0 again on a copy of its mlflow.db, whose folder
    turns read-only (a bind mount remounted) once the stage computes: the stage ends with exit
    2 and one line naming the store and the fix (no traceback), its outputs written whole, its
    chunks kept in storage for the rerun, and nothing of the study touched."""
    from test_reliability import snapshot

    store, storage, trigger = tmp_path / "store", tmp_path / "storage", tmp_path / "go"
    store.mkdir()
    shutil.copy2(shared_study / "mlflow.db", store / "mlflow.db")
    uri = f"sqlite:///{store}/mlflow.db"
    before = snapshot(shared_study)
    log = tmp_path / "evaluate.log"
    command = (f"{sys.executable} -m stages.evaluate -e eps_simple --params "
               f"{shared_study / 'params.yaml'} --data {shared_study / 'data' / 'prepared'} "
               f"--stats {shared_study / 'data' / 'reference_stats'} --models "
               f"{shared_study / 'models'} --samples {shared_study / 'samples'} --out "
               f"{tmp_path}/metrics --figures {tmp_path}/figures > {log} 2>&1")
    env = env_for(shared_study, extra={"MLFLOW_TRACKING_URI": uri,
                                       "DDPM_STORAGE": str(storage)})
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c",
                             read_only_script(store, command, trigger)], cwd=shared_study,
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and "chunks to compute" in log.read_text():
            trigger.touch()
            break
        time.sleep(0.05)
    _, mount_errors = proc.communicate(timeout=300)
    output = log.read_text()
    assert proc.returncode == 2 and not mount_errors, (mount_errors, output[-3000:])
    assert trigger.exists() and "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    # sqlite says "readonly database" or, on a connection opened before, that it cannot open
    # the file (for its journal)
    assert re.match(rf"error: the MLflow store {re.escape(uri)} refuses writes \((it is "
                    r"read-only|the sqlite file cannot be opened for writing)\); make it "
                    "writable", last), output[-3000:]
    assert "rerun `dvc repro`" in last
    record = json.loads((tmp_path / "metrics" / "eps_simple-0.json").read_text())
    assert record == json.loads((shared_study / "metrics" / "eps_simple-0.json").read_text())
    assert not list(tmp_path.rglob("*.tmp*"))
    assert list(storage.glob("chunks/*/*.npz"))  # kept: the rerun computes nothing again
    assert snapshot(shared_study) == before


@pytest.mark.slow
def test_params_edited_while_sample_runs_leave_dvc_lock_untouched(shared_study, tmp_path):
    """A copy of the shared study (its results committed); `dvc repro -f -s
    sample@eps_simple-0` (that stage alone),
    and `sample.num_samples` set from 60 to 120 in params.yaml while the stage computes: the
    stage draws its 60 images, then fails with one line naming the key and `dvc repro`; DVC
    records nothing (dvc.lock byte for byte), and `dvc status` shows the stage changed, so the
    next `dvc repro` makes the 120 images the lock will claim."""
    from conftest import STABLE_KEY

    repo = tmp_path / "study"
    shutil.copytree(shared_study, repo, symlinks=True)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "the tiny study"], repo)
    lock = (repo / "dvc.lock").read_bytes()
    target = f"sample@{STABLE_KEY}"
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", target], cwd=repo, env=env_for(repo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, edited = [], False
    for line in proc.stdout:
        output.append(line)
        if not edited and "chunks to compute" in line:
            edit_param(repo, "sample", "num_samples", 120)
            edited = True
    text = "".join(output)
    assert proc.wait(timeout=300) != 0 and edited, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    error = [line for line in output if line.startswith("error: ")]
    assert error == [f"error: {target}: edited while the stage ran (sample.num_samples 60 -> "
                     "120); its outputs were made with the values it started with, so DVC "
                     "must not record it: rerun `dvc repro`\n"], text[-3000:]
    assert (repo / "dvc.lock").read_bytes() == lock
    with np.load(repo / "samples" / STABLE_KEY / "samples.npz") as f:
        assert len(f["images"]) == 60  # what the stage drew, from the params it started with
    status = sh(["dvc", "status", target], repo).stdout
    assert target in status and "sample.num_samples" in status, status


@pytest.mark.parametrize("damaged", ["halving.json", "reports/abc_00001.json"])
def test_a_damaged_file_of_a_stopped_sweeps_state_is_refused_before_it_resumes(tmp_path,
                                                                                damaged):
    """A stopped sweep keeps its rung decisions and its trials' reports beside Tune's folder;
    one of them cut short: the check run before `Tuner.restore` names it and the fix (the
    sweep from its start); sound files pass."""
    from pipeline.cluster.ray_tune import SweepStateError, check_sweep_state

    state = tmp_path / "sweep-x.state"
    (state / "reports").mkdir(parents=True)
    (state / "halving.json").write_text(json.dumps({"kept": {"10": ["abc_00001"]}}))
    for trial in ("abc_00000", "abc_00001"):
        (state / "reports" / f"{trial}.json").write_text(json.dumps([{"step": 10,
                                                                      "nll_bpd": 3.5}]))
    check_sweep_state(str(state), str(tmp_path / "sweep-x"))
    path = state / damaged
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(SweepStateError, match=rf"^{re.escape(str(path))}: damaged .*delete "
                                              rf"{re.escape(str(tmp_path / 'sweep-x'))} and "):
        check_sweep_state(str(state), str(tmp_path / "sweep-x"))
