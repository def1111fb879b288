"""Faults a long run meets, each injected for real: a stored chunk damaged before a rerun (garbage,
or one byte flipped), a disk that fills while a stage writes (a small tmpfs in a mount
namespace), a tracking store that turns read-only, and params.yaml or a stage's code edited
while the stage runs. Each is caught in one line (exit 2, no traceback) and nothing is recorded
that is not true: no half-written output, dvc.lock untouched. docs/reliability.md lists them.
"""

from __future__ import annotations

import io
import re
import os
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT, make_study_repo, sh, tiny


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
    from pipeline.cluster.training import CheckpointError, load_training_state
    from pipeline.core.params import load_params
    from pipeline.measure.classifier import (ClassifierError, DigitsClassifier, load_classifier,
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
