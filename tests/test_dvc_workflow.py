"""DVC as its users use it, on a copy of the shared tiny study (conftest.py): results versioned
by git so that `dvc metrics diff` / `dvc metrics show -A` / `dvc plots diff` / `dvc exp show`
load every revision and experiment, `dvc exp run -S` and a queue of two experiments run with
`dvc queue start -j 2`, each experiment's MLflow runs tagged with its name, and code changes
making the stages that import the changed module stale."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from helpers import mlflow_runs, sh

# A setting only the evaluate and reference stages read: each experiment below reruns them and
# tabulate (about 30 s), not the training.
KNOB = "evaluate.nll_num_images"
EXPERIMENT_FILE = "metrics/eps_simple-0.json"


@pytest.fixture(scope="module")
def repo(shared_study, tmp_path_factory) -> Path:
    """A copy of the shared study (with its DVC cache), its results committed."""
    copy = tmp_path_factory.mktemp("dvc_workflow") / "study"
    shutil.copytree(shared_study, copy, symlinks=True)
    sh(["git", "add", "-A"], copy)
    sh(["git", "commit", "-qm", "the tiny study"], copy)
    return copy


def numbers(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    section, key = dotted.split(".")
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def exp_rows(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: {experiment name: its metrics by file} for every experiment."""
    rows = {}
    for baseline in json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                rows[rev["name"]] = {path: entry["data"]
                                     for path, entry in rev["data"]["metrics"].items()}
    return rows


@pytest.mark.slow
def test_results_are_versioned_with_git_and_compare_across_commits(repo, tmp_path):
    tracked = set(sh(["git", "ls-files", "metrics", "results", "plots"], repo).stdout.split())
    assert {EXPERIMENT_FILE, "metrics/reference.json", "results/table2.md",
            "results/findings.csv", "plots/loss/eps_simple-0.csv"} <= tracked
    # what DVC caches stays out of git: per-image bounds, run descriptions, the sweep's trials
    assert not {"metrics/eps_simple-0_nll.csv", "metrics/eps_simple-0_run.json"} & tracked
    assert not any(p.startswith("results/sweep/") for p in tracked)
    for path in (EXPERIMENT_FILE, "metrics/mu_vlb_fixed-0.json"):
        record = json.loads((repo / path).read_text())
        assert record and all(numbers(v) for v in record.values()), (path, record)

    set_param(repo, KNOB, 10)
    rerun = sh(["dvc", "repro"], repo).stdout
    assert "Running stage 'evaluate@eps_simple-0'" in rerun and "Running stage 'train@" not in rerun
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", f"{KNOB}: 10"], repo)

    diff = json.loads(sh(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], repo).stdout)
    nll = diff[EXPERIMENT_FILE]["nll_bpd"]
    assert numbers(nll["old"]) and numbers(nll["new"]) and nll["old"] != nll["new"]
    assert nll["diff"] == pytest.approx(nll["new"] - nll["old"])
    assert "untrained.nll_bpd" in diff["metrics/reference.json"]
    shown = sh(["dvc", "metrics", "show", "-a"], repo)
    assert "failed to load" not in shown.stdout + shown.stderr
    plots = sh(["dvc", "plots", "diff", "HEAD~1", "-o", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots" / "index.html").is_file(), plots.stdout
    text = sh(["dvc", "metrics", "diff", "HEAD~1"], repo).stdout
    print(f"$ dvc metrics diff HEAD~1\n{text}")


@pytest.mark.slow
def test_dvc_experiments_run_queue_and_match_their_mlflow_runs(repo):
    """`dvc exp run -S` in the workspace, then two queued experiments run two at a time: each
    shows its numeric FID and NLL in `dvc exp show`, and has MLflow runs of its own, tagged
    with its name, in the repo's mlflow.db (queued experiments run in temporary copies)."""
    sh(["dvc", "exp", "run", "-S", f"{KNOB}=15", "-n", "nll15"], repo, timeout=600)
    for value in (12, 8):
        sh(["dvc", "exp", "run", "--queue", "-S", f"{KNOB}={value}", "-n", f"nll{value}"], repo)
    sh(["dvc", "queue", "start", "-j", "2"], repo)
    deadline = time.monotonic() + 600
    while True:
        status = sh(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    logs = "".join(sh(["dvc", "queue", "logs", name], repo).stdout for name in ("nll12", "nll8"))
    assert "database is locked" not in logs and "Traceback" not in logs

    rows = exp_rows(repo)
    _, runs = mlflow_runs(repo)
    for name in ("nll15", "nll12", "nll8"):
        metrics = rows[name][EXPERIMENT_FILE]
        assert numbers(metrics["fid"]) and numbers(metrics["nll_bpd"]), (name, metrics)
        mine = {r.info.run_name: r for r in runs if r.data.tags.get("dvc.exp_name") == name}
        assert {"eps_simple-0", "mu_vlb_fixed-0", "tables"} <= set(mine), (name, sorted(mine))
        assert mine["eps_simple-0"].data.metrics["nll_bpd"] == pytest.approx(metrics["nll_bpd"])
        assert mine["tables"].info.status == "FINISHED"
    assert len({rows[n][EXPERIMENT_FILE]["nll_bpd"] for n in ("nll15", "nll12", "nll8")}) == 3
    keep = "Experiment|State|fid$|is_mean$|nll_bpd$|" + KNOB  # docs/dvc.md's columns
    table = sh(["dvc", "exp", "show", "--drop", ".*", "--keep", keep], repo).stdout
    print(f"$ dvc exp show --drop '.*' --keep '{keep}'\n{table}")


@pytest.mark.slow
@pytest.mark.parametrize("module, fresh", [
    ("stages/_common.py", set()),           # every stage imports it
    # every stage that trains, samples or measures many images reports progress; prepare,
    # tabulate and the classifier (which reaches no sampling or NLL code) do not
    ("pipeline/core/progress.py", {"prepare", "classifier", "tabulate"}),
])
def test_editing_a_shared_module_makes_the_stages_that_import_it_stale(repo, module, fresh):
    path = repo / module
    original = path.read_text()
    stages = set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])
    path.write_text(original + "\n# edited\n")
    try:
        status = sh(["dvc", "status"], repo).stdout
    finally:
        path.write_text(original)
    stale = {line[:-1] for line in status.splitlines()
             if line.endswith(":") and not line.startswith(("\t", " "))}
    assert stale == stages - fresh, status
