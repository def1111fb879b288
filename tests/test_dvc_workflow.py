"""DVC as its users use it, on a copy of the shared tiny study (conftest.py): results versioned
by git so that `dvc metrics diff` / `dvc metrics show -A` / `dvc plots diff` / `dvc exp show`
load every revision and experiment, `dvc exp run -S` and a queue of two experiments run with
`dvc queue start -j 2`, each experiment's MLflow runs tagged with its name, and code changes
making the stages that import the changed module stale."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from helpers import mlflow_runs, sh

# A setting only the evaluate and reference stages read: each experiment below reruns them and
# tabulate (about 30 s), not the training.
KNOB = "evaluate.nll_num_images"
HEADLINE = "results/metrics.json"  # the one metrics file: each Table 2 row's numbers, verdicts
ROW = "eps_simple"
RUN_FILE = "metrics/eps_simple-0.json"  # the run's own scores, in DVC's cache


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


def exp_rows(repo: Path) -> dict[str, dict]:
    """`dvc exp show -A --json`: {experiment name: its metrics by file} for every experiment of
    every commit."""
    rows = {}
    for baseline in json.loads(sh(["dvc", "exp", "show", "-A", "--json"], repo).stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                rows[rev["name"]] = {path: entry["data"]
                                     for path, entry in rev["data"]["metrics"].items()}
    return rows


def exp_show_columns(repo: Path) -> list[str]:
    """The columns of `dvc exp show`, in its order (its csv header)."""
    return sh(["dvc", "exp", "show", "--csv"], repo).stdout.splitlines()[0].split(",")


@pytest.mark.slow
def test_results_are_versioned_with_git_and_compare_across_commits(repo, tmp_path):
    tracked = set(sh(["git", "ls-files", "metrics", "results", "plots"], repo).stdout.split())
    assert {HEADLINE, "results/table2.md", "results/findings.csv", "plots/loss.csv",
            "plots/fid_over_training.csv"} <= tracked
    # what DVC caches stays out of git: each run's own records, the sweep's trials
    assert not {RUN_FILE, "metrics/reference.json", "metrics/eps_simple-0_nll.csv",
                "metrics/eps_simple-0_run.json", "metrics/eps_simple-0_over_training.csv",
                "plots/loss/eps_simple-0.csv"} & tracked
    assert not any(p.startswith("results/sweep/") for p in tracked)
    headline = json.loads((repo / HEADLINE).read_text())
    assert all(numbers(v) for section in headline.values() for v in section.values())
    assert headline[ROW] == {k: json.loads((repo / RUN_FILE).read_text())[k]
                             for k in ("fid", "is_mean", "nll_bpd")}
    assert headline["mu_vlb_fixed"] == {}  # diverged: no numbers
    # `dvc exp show`: the headline numbers right after the experiment's name and date
    columns = exp_show_columns(repo)
    assert columns[5:5 + len(headline["findings"]) + 3] == [
        *(f"findings.{v}" for v in headline["findings"]),
        f"{ROW}.fid", f"{ROW}.is_mean", f"{ROW}.nll_bpd"], columns[:15]
    assert not any(c.startswith(("metrics/", "untrained.")) for c in columns), columns

    # a variant run in the workspace as a DVC experiment (test_dvc_experiments_run_queue_...
    # finds its MLflow runs), then committed: the next commit
    rerun = sh(["dvc", "exp", "run", "-S", f"{KNOB}=10", "-n", "nll10"], repo, timeout=600).stdout
    assert "Running stage 'evaluate@eps_simple-0'" in rerun and "Running stage 'train@" not in rerun
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", f"{KNOB}: 10"], repo)

    diff = json.loads(sh(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], repo).stdout)
    assert list(diff) == [HEADLINE]
    nll = diff[HEADLINE][f"{ROW}.nll_bpd"]
    assert numbers(nll["old"]) and numbers(nll["new"]) and nll["old"] != nll["new"]
    assert nll["diff"] == pytest.approx(nll["new"] - nll["old"])
    assert f"{ROW}.fid" not in diff[HEADLINE]  # the samples did not change
    shown = sh(["dvc", "metrics", "show", "-a"], repo)
    assert "failed to load" not in shown.stdout + shown.stderr

    # `dvc plots diff`: one chart of every run's loss (a line per run, a dash per revision),
    # FID over training (eps_simple was scored at several steps), the figures as images
    plots = sh(["dvc", "plots", "diff", "HEAD~1", "-o", str(tmp_path / "plots")], repo)
    assert "failed to load" not in plots.stdout + plots.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
    charts = re.findall(r'<div id = "([^"]+)"', page)
    # (and the chart of FID against sampling steps of the shared study's stable run)
    assert charts == ["plots_loss_csv", "plots_fid_over_training_csv",
                      "plots_sampling_steps_csv"], charts
    assert '"field": "run"' in page and '"field": "rev"' in page  # .dvc/plots/by_run.json
    assert '"run": "eps_simple-0"' in page
    assert '"run": "mu_vlb_fixed-0"' not in page  # diverged at once: no finite loss, no FID
    assert sorted(p.name for p in (tmp_path / "plots" / "static").iterdir()) == [
        f"{rev}_results_{name}.png" for rev in ("HEAD~1", "workspace")
        for name in ("samples", "sampling_steps", "sweep_heatmap")]
    text = sh(["dvc", "metrics", "diff", "HEAD~1"], repo).stdout
    print(f"$ dvc metrics diff HEAD~1\n{text}")


@pytest.mark.slow
def test_dvc_experiments_run_queue_and_match_their_mlflow_runs(repo):
    """Two queued experiments run two at a time, and the one the test above ran in the
    workspace (nll10; the module's tests share one repo, in order): each shows its numeric FID
    and NLL in `dvc exp show`, and has MLflow runs of its own, tagged with its name, in the
    repo's mlflow.db (queued experiments run in temporary copies)."""
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
    if "nll10" not in rows:
        pytest.fail("no experiment nll10: test_results_are_versioned_with_git_and_compare_"
                    "across_commits runs it; run this module's tests together, in order")
    _, runs = mlflow_runs(repo)
    for name in ("nll10", "nll12", "nll8"):
        metrics = rows[name][HEADLINE][ROW]
        assert numbers(metrics["fid"]) and numbers(metrics["nll_bpd"]), (name, metrics)
        mine = {r.info.run_name: r for r in runs if r.data.tags.get("dvc.exp_name") == name}
        assert {"eps_simple-0", "mu_vlb_fixed-0", "tables"} <= set(mine), (name, sorted(mine))
        assert mine["eps_simple-0"].data.metrics["nll_bpd"] == pytest.approx(metrics["nll_bpd"])
        assert mine["tables"].info.status == "FINISHED"
    assert len({rows[n][HEADLINE][ROW]["nll_bpd"] for n in ("nll10", "nll12", "nll8")}) == 3
    keep = f"Experiment|State|{ROW}\\.|{KNOB}"  # docs/dvc.md's columns
    table = sh(["dvc", "exp", "show", "-A", "--drop", ".*", "--keep", keep], repo).stdout
    print(f"$ dvc exp show -A --drop '.*' --keep '{keep}'\n{table}")
    # --only-changed: what the experiments changed (the knob, each row's NLL, and the data
    # those depend on), not the columns that are the same in all of them
    changed = sh(["dvc", "exp", "show", "--only-changed", "--csv"], repo).stdout
    columns = changed.splitlines()[0].split(",")
    assert KNOB in columns and f"{ROW}.nll_bpd" in columns, columns
    assert f"{ROW}.fid" not in columns and "diffusion.schedule" not in columns, columns
    print(f"$ dvc exp show --only-changed --csv | head -1\n{columns}")


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
