"""Reliability, proven by injecting each fault for real: a killed Ray worker, a killed `dvc repro`,
a diverging run, an unreachable MLflow server, broken params, corrupt and missing files, a writer
killed mid-write. docs/reliability.md lists what each test guarantees.

The slow tests read the session's shared tiny study (`shared_study` in conftest.py: T = 20, 40
steps, two experiments of which one diverges on purpose), reproduced once with a real
`dvc repro` in a temporary git repository.
Stages are rerun from a temporary working folder with absolute paths into that study, so that
their MLflow records and outputs stay apart from the study's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import STABLE_KEY as KEY, UNSTABLE_KEY, shared_study_params
from helpers import PROJECT, env_for, make_study_repo, mlflow_runs, run_record, sh, tiny

STAGES = ("prepare", "classifier", "reference_stats", "train", "sample", "evaluate", "reference",
          "tabulate")
EXPERIMENT_STAGES = ("train", "sample", "evaluate")
OUTPUTS = ("data/prepared", "data/reference_stats", "models", "samples", "metrics", "plots", "results", "ray_storage",
           "dvc.lock")
WORKER_LINE = re.compile(r"RayTrainWorker pid=(\d+)\).*?train ([\w-]+): step (\d+)/(\d+)")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage(name: str, *args, cwd: Path, code: Path = PROJECT, env: dict | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m stages.<name> *args` in `cwd`, with the pipeline code of `code`."""
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *map(str, args)], cwd=cwd,
                          env=env_for(code, extra=env), capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and a last line `error: ...` holding every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


def snapshot(repo: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every stage output of a study."""
    files = {}
    for name in OUTPUTS:
        top = repo / name
        for path in ([top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())):
            files[str(path.relative_to(repo))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                 path.stat().st_mtime_ns)
    return files


def ray_checkpoints(storage: Path) -> list[Path]:
    return sorted(storage.glob("*/checkpoint_*/state.pt"))


def registered_checkpoint_step(storage: Path) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered (and so resumes
    from), read from its snapshot file; None before the first."""
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except (OSError, json.JSONDecodeError):  # being written
            return None
        if latest:
            return int(latest["metrics"]["step"])
    return None


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cmdline(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""


def wait_gone(processes, timeout: float) -> list:
    """Wait until every process has exited (zombies count as exited); return those alive."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in processes:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def kill_all(processes) -> list[str]:
    """SIGKILL what is still alive; return the command lines of those that were."""
    import psutil

    alive = []
    for proc in processes:
        try:
            proc.kill()
            alive.append(cmdline(proc)[:80])
        except psutil.Error:
            pass
    return alive


def worker_steps(output: str, experiment: str) -> dict[int, list[int]]:
    """{Ray Train worker pid: steps it logged, in order} from a train stage's output."""
    steps: dict[int, list[int]] = {}
    for pid, name, step, _ in WORKER_LINE.findall(output):
        if name == experiment and int(step) not in steps.setdefault(int(pid), []):
            steps[int(pid)].append(int(step))
    return steps


def load_state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def tensors_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def study(shared_study) -> Path:
    """The shared tiny study (conftest.py) after one uninterrupted `dvc repro`."""
    return shared_study


# --------------------------------------------------------------------------------------------
# Faults survived: a killed worker, a killed `dvc repro`, a diverging run
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_ray_worker_is_restarted_from_the_last_checkpoint(study, tmp_path):
    """SIGKILL the Ray Train worker after its first checkpoint: Ray restarts the worker group
    (FailureConfig(max_failures)) from that checkpoint and training ends at train.steps with the
    step counter, Adam, the LR schedule and the EMA continuous, and no step logged twice."""
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["train"]["steps"] = 60
    params["experiments"] = {"eps_simple": params["experiments"]["eps_simple"]}
    write_params(tmp_path / "params.yaml", params)
    storage = tmp_path / "checkpoints"
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.train", "-e", "eps_simple", "--params", "params.yaml",
             "--data", study / "data" / "prepared", "--storage", storage],
            cwd=tmp_path, env=env_for(study), stdout=out, stderr=subprocess.STDOUT)
        killed, deadline = None, time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if killed is None and registered_checkpoint_step(storage) is not None:
                workers = [p for p in descendants(proc.pid) if "RayTrainWorker" in cmdline(p)]
                assert len(workers) == 1, workers
                killed = (workers[0].pid, registered_checkpoint_step(storage))
                workers[0].send_signal(signal.SIGKILL)
            time.sleep(0.05)
        if proc.poll() is None:
            kill_all([*descendants(proc.pid), proc])
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]
    assert killed is not None, "training ended before its first checkpoint"
    killed_pid, resumed_from = killed
    assert resumed_from < 60

    steps = worker_steps(output, KEY)
    assert killed_pid in steps and len(steps) == 2, steps  # one restart
    restarted = next(s for pid, s in steps.items() if pid != killed_pid)
    assert restarted[0] == resumed_from + 10, (resumed_from, restarted)  # not from step 0
    assert restarted[-1] == 60

    curve = pd.read_csv(tmp_path / "plots" / "loss" / f"{KEY}.csv")
    assert curve["step"].tolist() == list(range(10, 61, 10))  # every step once
    info = json.loads((tmp_path / "models" / KEY / "state.json").read_text())
    assert info["step"] == 60 and info["status"] == "ok"
    final = max(ray_checkpoints(storage), key=lambda p: load_state(p)["step"])
    state = load_state(final)
    assert state["step"] == 60
    assert all(s["step"] == 60 for s in state["optimizer"]["state"].values())  # Adam's t
    assert state["scheduler"]["last_epoch"] == 60
    assert int(state["ema"]["n_averaged"]) == 60  # one EMA update per step
    # the first 40 steps are those of the study's uninterrupted 40-step run, bit for bit
    uninterrupted = pd.read_csv(study / "plots" / "loss" / f"{KEY}.csv")
    assert curve["loss"].tolist()[:4] == uninterrupted["loss"].tolist()


@pytest.mark.slow
def test_killed_dvc_repro_resumes_from_the_last_checkpoint(study, tmp_path):
    """SIGKILL the process group of a real `dvc repro` once training has a checkpoint: a plain
    `dvc repro` again resumes from it (no manual step, no stale-lock error) and the study's
    outputs (weights, loss curve, samples) equal those of the uninterrupted run."""
    repo = make_study_repo(tmp_path, lambda p: shared_study_params(p, ("eps_simple",)))
    target = f"sample@{KEY}"  # train and sample (and prepare, classifier)
    storage = repo / "ray_storage"
    # Ray's default 2 s controller poll (a user's setting overrides the local cluster's 0.5 s):
    # the checkpoints of steps 20 and 40 then register seconds apart, and the kill lands between
    # them; with 0.5 s polls this tiny run registers step 40 within a second of step 20.
    env = env_for(repo, extra={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"})
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(["dvc", "repro", target], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if registered_checkpoint_step(storage) is not None:
                break
            time.sleep(0.05)
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray's actors run in process groups of their own; they exit once their raylet has gone
    survivors = kill_all(wait_gone(tree, timeout=60))
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-5000:]
    assert not survivors, survivors  # no orphan goes on training
    assert registered_checkpoint_step(storage) == 20  # killed between steps 20 and 40
    assert not (repo / "models" / KEY).exists()  # nothing half-written to accept
    assert f"train@{KEY}" not in (repo / "dvc.lock").read_text()
    rwlock = json.loads((repo / ".dvc" / "tmp" / "rwlock").read_text())
    stale = [info for infos in rwlock.get("read", {}).values() for info in infos]
    stale += list(rwlock.get("write", {}).values())
    assert any(info["pid"] == proc.pid for info in stale), rwlock  # left by the killed dvc

    again = sh(["dvc", "repro", target], repo)  # no manual step: DVC drops the dead process's entries
    steps = [s for s_list in worker_steps(again.stdout, KEY).values() for s in s_list]
    assert steps and steps[0] == 30 and steps[-1] == 40, steps  # resumed at step 20

    name = KEY
    info = json.loads((repo / "models" / name / "state.json").read_text())
    assert info["step"] == 40 and info["status"] == "ok"
    curve = pd.read_csv(repo / "plots" / "loss" / f"{name}.csv")
    assert curve.equals(pd.read_csv(study / "plots" / "loss" / f"{name}.csv"))
    for weights in ("ema.pt", "model.pt"):
        assert tensors_equal(load_state(repo / "models" / name / weights),
                             load_state(study / "models" / name / weights)), weights
    # the same samples, to the byte (their scores then are the same: evaluation is
    # deterministic, test_one_worker_samples_and_metrics_are_bitwise_reproducible)
    assert ((repo / "samples" / name / "samples.npz").read_bytes()
            == (study / "samples" / name / "samples.npz").read_bytes())
    assert not sh(["dvc", "status", target], repo).stdout.count("changed"), \
        "dvc status not clean"


# --------------------------------------------------------------------------------------------
# The MLflow run while training runs, is killed and resumes
# --------------------------------------------------------------------------------------------

LIVE_TRAIN = {"steps": 80, "log_every": 5, "checkpoint_every": 40}  # some 30 s on 2 busy cores
SYSTEM_CPU = "system/cpu_utilization_percentage"
STREAMED = ("train_loss", "lr", "images_per_s", "grad_norm")


def start_train(folder: Path, prepared: Path, log: Path) -> subprocess.Popen:
    """The train stage of a tiny study (`LIVE_TRAIN`) started in `folder`, its own MLflow store
    there (mlflow.db), system metrics sampled every 2 s."""
    args = ["-e", "eps_simple", "--params", tiny_params(folder, train=LIVE_TRAIN), "--data",
            prepared, "--out", folder / "models", "--plots", folder / "plots"]
    env = env_for(PROJECT, extra={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"})
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "stages.train", *map(str, args)],
                                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)


def live_run(folder: Path):
    """(client, the one run of the study's store, or None while there is none)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    try:
        experiment = client.get_experiment_by_name("ddpm-digits")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
    except Exception:  # the store is being created, or busy
        return client, None
    assert len(runs) <= 1, [r.info.run_name for r in runs]
    return client, runs[0] if runs else None


def wait_for_run(folder: Path, proc: subprocess.Popen, log: Path, points: int,
                 system_metrics: bool = False, timeout: float = 300):
    """Poll the store until the run holds `points` train_loss points (and a system metric);
    return (client, run, its train_loss history) as seen then."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the stage ended first:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        client, run = live_run(folder)
        if run is not None:
            history = client.get_metric_history(run.info.run_id, "train_loss")
            if len(history) >= points and (not system_metrics or SYSTEM_CPU in run.data.metrics):
                return client, run, history
        time.sleep(0.5)


@pytest.mark.slow
def test_killed_train_stage_goes_on_in_the_same_mlflow_run(prepared, tmp_path):
    """While the train stage runs, its MLflow run already holds its params, the streamed
    train_loss / lr / images_per_s / grad_norm points and MLflow's system metrics, with status
    RUNNING. SIGTERM then: the run is marked KILLED. The rerun resumes from the last checkpoint
    (here none: step 0), older than the last logged step, and logs into the same run without
    logging a step twice; it ends FINISHED with every streamed curve whole."""
    folder = tmp_path / "live"
    folder.mkdir()
    log = tmp_path / "killed.log"
    start = time.monotonic()
    proc = start_train(folder, prepared, log)
    client, run, _ = wait_for_run(folder, proc, log, points=3, system_metrics=True)
    seen_s = time.monotonic() - start
    assert run.info.status == "RUNNING"
    assert run.data.params["train.steps"] == "80"  # logged before training started
    assert SYSTEM_CPU in run.data.metrics and "system/system_memory_usage_megabytes" in \
        run.data.metrics
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED", log.read_text()[-4000:]
    before = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert before and before[-1] < 80

    again = subprocess.run([sys.executable, "-m", "stages.train", "-e", "eps_simple",
                            "--params", "params.yaml", "--data", str(prepared),
                            "--out", "models", "--plots", "plots"], cwd=folder,
                           env=env_for(PROJECT), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    reported = [s for steps in worker_steps(again.stdout + again.stderr, KEY).values()
                for s in steps]
    assert reported and reported[0] <= before[-1], (reported, before)  # steps reported again
    client, rerun = live_run(folder)  # still one run: the same one
    assert rerun.info.run_id == run.info.run_id and rerun.info.status == "FINISHED"
    for name in STREAMED:  # in the order they were logged: each step once, increasing
        history = client.get_metric_history(run.info.run_id, name)
        steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
        assert steps == list(range(5, 85, 5)), (name, steps)
    assert rerun.data.metrics["train_steps"] == 80 and "train_images_per_s" in rerun.data.metrics
    assert rerun.data.metrics["grad_norm"] > 0
    print(f"train_loss points and system metrics in the run {seen_s:.0f}s after the stage "
          f"started")


@pytest.mark.slow
def test_diverging_run_is_recorded_unstable_and_the_study_completes(study):
    m = run_record(study / "metrics", UNSTABLE_KEY)
    assert m["status"] == "unstable" and "fid" not in m and "nll_bpd" not in m
    assert m["train_steps"] < 40  # stopped early
    info = json.loads((study / "models" / UNSTABLE_KEY / "state.json").read_text())
    assert info["status"] == "unstable"
    with np.load(study / "samples" / UNSTABLE_KEY / "samples.npz") as f:
        assert len(f["images"]) == 0 and str(f["status"]) == "unstable"
    assert run_record(study / "metrics", KEY)["status"] == "ok"

    table2 = (study / "results" / "table2.md").read_text()
    rows = [line for line in table2.splitlines() if "L, fixed isotropic Σ" in line]
    assert len(rows) == 1 and rows[0].count("–") >= 3, table2  # IS, FID, NLL: "–"
    assert (study / "results" / "table1.md").is_file()

    _, runs = mlflow_runs(study)
    status = {r.info.run_name: r.data.tags.get("ddpm.status") for r in runs}
    assert status[UNSTABLE_KEY] == "unstable" and status[KEY] == "ok"


@pytest.mark.slow
def test_killed_sample_stage_redoes_only_the_missing_and_damaged_chunks(study, tmp_path):
    """SIGKILL sample@eps_simple-0 (600 images in 6 chunks of 100) once 2 chunks are kept in
    its storage, then damage two kept chunks as storage does over days (one overwritten with
    garbage of its length, one with a single byte flipped): the rerun says in one line each
    that it computes them again, computes only those and the chunks not kept, its samples.npz
    is byte-identical to an uninterrupted run's, and once it is written no chunk is left in
    storage."""
    params = yaml.safe_load((study / "params.yaml").read_text())
    params["sample"].update(num_samples=600, batch_size=100)
    params["experiments"] = {"eps_simple": params["experiments"]["eps_simple"]}
    write_params(tmp_path / "params.yaml", params)

    def sample(out: str, storage: Path, **popen):
        args = [sys.executable, "-m", "stages.sample", "-e", "eps_simple", "--params",
                "params.yaml", "--models", str(study / "models"), "--out", str(tmp_path / out)]
        env = env_for(study, extra={"DDPM_STORAGE": str(storage)})
        if popen:
            return subprocess.Popen(args, cwd=tmp_path, env=env, **popen)
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)

    storage = tmp_path / "storage"
    # the uninterrupted run, side by side with the killed one and its rerun
    whole = sample("uninterrupted", tmp_path / "storage-2", stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, text=True)
    with open(tmp_path / "killed.log", "w") as out:
        proc = sample("samples", storage, stdout=out, stderr=subprocess.STDOUT,
                      start_new_session=True)
        kept, deadline = [], time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and len(kept) < 2:
            kept = sorted(storage.glob("chunks/*/*.npz"))
            time.sleep(0.02)
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kill_all(wait_gone(tree, timeout=60))
    log = (tmp_path / "killed.log").read_text()
    assert proc.returncode == -signal.SIGKILL and 2 <= len(kept) < 6, log[-3000:]
    assert not (tmp_path / "samples" / KEY).exists()  # nothing half-written
    kept = sorted(storage.glob("chunks/*/*.npz"))  # and any that came after
    garbage, flipped = kept[0], kept[1]
    garbage.write_bytes(np.random.default_rng(0).bytes(garbage.stat().st_size))
    damaged = bytearray(flipped.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    flipped.write_bytes(bytes(damaged))

    again = sample("samples", storage)
    assert again.returncode == 0, again.stderr[-3000:]
    for path in (garbage, flipped):
        chunk = path.name.split(".")[0]
        assert (f"sample {KEY}: chunk {chunk} was damaged in storage ({path}: its bytes do not "
                f"match the digest it was written with); computing it again") in again.stdout
    good = len(kept) - 2
    todo = re.search(r"(\d+) of 6 chunks to compute on 1 worker [^\n]*?(?:, (\d+) found in "
                     r"storage)?; finished", again.stdout)
    assert todo and int(todo[1]) == 6 - good and int(todo[2] or 0) == good, again.stdout
    assert not list(storage.glob("chunks/*/*"))  # discarded once samples.npz was written

    whole_out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, whole_out[-3000:]
    assert ((tmp_path / "samples" / KEY / "samples.npz").read_bytes()
            == (tmp_path / "uninterrupted" / KEY / "samples.npz").read_bytes())


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_worker_samples_and_metrics_are_bitwise_reproducible(study, tmp_path):
    """Rerun sample@eps_simple-0 and evaluate@eps_simple-0: identical bytes and numbers."""
    name, params = KEY, study / "params.yaml"
    stage_args = dict(cwd=tmp_path, code=study)
    proc = stage("sample", "-e", "eps_simple", "--params", params, "--models", study / "models",
                 "--out", tmp_path / "samples", **stage_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for file in ("samples.npz", "grid.png"):
        assert ((tmp_path / "samples" / name / file).read_bytes()
                == (study / "samples" / name / file).read_bytes()), file
    proc = stage("evaluate", "-e", "eps_simple", "--params", params, "--data",
                 study / "data" / "prepared", "--stats", study / "data" / "reference_stats",
                 "--models", study / "models", "--samples", tmp_path / "samples",
                 "--out", tmp_path / "metrics", **stage_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = run_record(tmp_path / "metrics", name)
    first = run_record(study / "metrics", name)
    timings = {k for k in first if k.endswith("_s") or k == "images_per_s"}
    assert {k: v for k, v in again.items() if k not in timings} == \
        {k: v for k, v in first.items() if k not in timings}


@pytest.mark.slow
def test_two_workers_are_bitwise_reproducible(study, tmp_path):
    """DDP with 2 workers on fractional CPUs (gloo): two fresh runs give identical weights. The
    two train stages run side by side on one local Ray instance (each its own storage and
    MLflow store), as two researchers' runs would share a cluster."""
    import shlex

    params = yaml.safe_load((study / "params.yaml").read_text())
    params["train"].update(steps=20, num_workers=2, cpus_per_worker=0.5)
    params["experiments"] = {"eps_simple": params["experiments"]["eps_simple"]}
    write_params(tmp_path / "params.yaml", params)
    runs = [tmp_path / "a", tmp_path / "b"]

    def train(run: Path) -> str:
        run.mkdir()
        args = [sys.executable, "-m", "stages.train", "-e", "eps_simple", "--params",
                tmp_path / "params.yaml", "--data", study / "data" / "prepared", "--storage",
                run / "ckpt", "--out", run / "models", "--plots", run / "plots"]
        return (f"MLFLOW_TRACKING_URI=sqlite:///{run}/mlflow.db {shlex.join(map(str, args))} "
                f"> {run}/log 2>&1")

    both = f"{train(runs[0])} & first=$!; {train(runs[1])}; second=$?; wait $first; " \
           "exit $(( $? | second ))"
    proc = subprocess.run([sys.executable, "-m", "stages.local_ray", "sh", "-c", both],
                          cwd=tmp_path, env=env_for(study, extra={"DDPM_VERBOSE": "1"}),
                          capture_output=True, text=True, timeout=600)  # (Ray Train's lines)
    logs = [(run / "log").read_text() for run in runs]
    assert proc.returncode == 0, proc.stderr[-2000:] + "".join(log[-3000:] for log in logs)
    for log in logs:
        assert "world_size=2" in log and "connected to Ray cluster at" in log, log[-3000:]
    a, b = runs
    curve = f"plots/{KEY}.csv"
    assert (a / curve).read_text() == (b / curve).read_text()
    for weights in ("ema.pt", "model.pt"):
        assert tensors_equal(load_state(a / "models" / KEY / weights),
                             load_state(b / "models" / KEY / weights)), weights


# --------------------------------------------------------------------------------------------
# Bad input refused: params, tracking store, corrupt and missing files
# --------------------------------------------------------------------------------------------


def _broken(edit):
    def make(params):
        params = json.loads(json.dumps(params))
        edit(params)
        return yaml.safe_dump(params, sort_keys=False)
    return make


BROKEN_PARAMS = {  # name: (params.yaml text from the study's params, what the message names)
    "yaml_syntax": (lambda p: "train:\n  steps: [1, 2\n", ["params.yaml", "YAML syntax error"]),
    "empty": (lambda p: "", ["params.yaml", "empty"]),
    "unknown_key": (_broken(lambda p: p["train"].update(epochs=3)), ["train", "epochs"]),
    "bad_value": (_broken(lambda p: p["diffusion"].update(schedule="cosin")),
                  ["diffusion.schedule", "cosine"]),
    "nested_override": (_broken(lambda p: p["experiments"]["eps_simple"].update(
        train={"stepz": 3})), ["experiments.eps_simple.train", "stepz", "steps"]),
    "evaluate_key": (_broken(lambda p: p["evaluate"].update(fid=True)), ["evaluate", "fid"]),
    "duplicate_key": (lambda p: yaml.safe_dump(p, sort_keys=False).replace(
        "\n  steps: ", "\n  steps: 3\n  steps: ", 1), ["params.yaml", "key 'train.steps' is "
                                                    "written twice", "delete one"]),
    "tracking_scheme": (_broken(lambda p: p["tracking"].update(tracking_uri="s3://b/runs")),
                        ["tracking.tracking_uri", "scheme 's3'"]),
}


@pytest.fixture(scope="module")
def study_copy(study, tmp_path_factory) -> Path:
    """A copy of the finished study (with its DVC cache) to break params in."""
    copy = tmp_path_factory.mktemp("broken") / "study"
    shutil.copytree(study, copy, symlinks=True)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(BROKEN_PARAMS))
def test_broken_params_stop_every_stage_and_dvc_repro_fast_and_lose_nothing(study_copy, variant):
    """Every stage and `dvc repro` refuse broken params within 5 s, before Ray or a model
    starts, with a one-line message naming the key; no stage output changes. `dvc repro` itself
    removes the outputs of the first stage it reruns before calling it (DVC always does); they
    stay in DVC's cache, and a `dvc repro` after the fix restores them without running anything.
    """
    repo = study_copy
    good = (repo / "params.yaml").read_text()
    make, needles = BROKEN_PARAMS[variant]
    before = snapshot(repo)
    (repo / "params.yaml").write_text(make(yaml.safe_load(good)))
    try:
        for name in STAGES:  # the stages as commands: nothing may change
            args = ["-e", "eps_simple"] if name in EXPERIMENT_STAGES else []
            start = time.monotonic()
            proc = stage(name, *args, cwd=repo, code=repo, timeout=60)
            assert time.monotonic() - start < 5, (name, time.monotonic() - start)
            message = assert_user_error(proc, *needles)
            assert len(message) < 400 and "Ray" not in proc.stdout + proc.stderr, message
        assert snapshot(repo) == before

        start = time.monotonic()
        proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env_for(repo), capture_output=True,
                              text=True, timeout=60)
        assert time.monotonic() - start < 5
        if variant in ("tracking_scheme", "evaluate_key"):  # no stage lists `tracking`, nor
            # an unknown evaluate key, among its DVC params (they list the keys they read), so
            # with the study done DVC has nothing to rerun (any stage that runs refuses, above)
            assert proc.returncode == 0 and "Data and pipelines are up to date" in proc.stdout
            assert snapshot(repo) == before
            return
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "started a local Ray" not in proc.stdout
        failed = re.search(r"failed to reproduce '([^']+)'", proc.stderr)
        if variant in ("yaml_syntax", "empty", "duplicate_key"):  # DVC reads params.yaml
            # itself (for dvc.yaml's matrix) and refuses these before any stage runs
            assert failed is None and ("params.yaml" in proc.stderr
                                       or "'experiments'" in proc.stderr), proc.stderr
        else:
            assert_user_error(subprocess.CompletedProcess(
                proc.args, 2, proc.stdout,
                "\n".join(line for line in proc.stderr.splitlines()
                          if line.startswith("error:"))), *needles)
        after = snapshot(repo)
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        removed_by_dvc = {o["path"] for o in lock[failed.group(1)]["outs"]} if failed else set()
        for path, value in before.items():
            if path in after:
                assert after[path] == value, path
            else:  # absent: only the outputs of the stage DVC was about to rerun
                assert any(path == out or path.startswith(f"{out}/")
                           for out in removed_by_dvc), path
    finally:
        (repo / "params.yaml").write_text(good)
    restored = sh(["dvc", "repro"], repo)
    assert "Running stage" not in restored.stdout, restored.stdout
    assert {p: h for p, (h, _) in snapshot(repo).items()} == \
        {p: h for p, (h, _) in before.items()}


def test_unreachable_mlflow_stops_every_stage_at_once(tmp_path):
    """MLFLOW_TRACKING_URI pointing at a closed port: each stage stops at its start, in seconds,
    naming the URI (the inputs are not even looked at, so nothing is trained first)."""
    uri = f"http://127.0.0.1:{closed_port()}"
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    tiny(params, experiments=("eps_simple",))
    write_params(tmp_path / "params.yaml", params)
    names = STAGES + (("sweep",) if (PROJECT / "stages" / "sweep.py").is_file() else ())
    for name in names:
        args = ["-e", "eps_simple"] if name in EXPERIMENT_STAGES else []
        start = time.monotonic()
        proc = stage(name, *args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=60)
        assert time.monotonic() - start < 20, name  # mostly torch imports, on a busy machine
        assert_user_error(proc, uri, "unreachable")
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


def test_unreachable_ray_cluster_stops_the_train_stage_in_seconds(prepared, tmp_path):
    """RAY_ADDRESS pointing at a closed port (a cluster that is down): the train stage stops in
    seconds with one line naming the address and the fix, where Ray itself retries for minutes,
    and writes no model."""
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    proc = stage("train", "-e", "eps_simple", "--params", tiny_params(tmp_path), "--data",
                 prepared, "--out", tmp_path / "models", "--plots", tmp_path / "plots",
                 cwd=tmp_path, env={"RAY_ADDRESS": address}, timeout=120)
    assert time.monotonic() - start < 30  # torch and Ray imports, on a busy machine
    assert_user_error(proc, f"no Ray cluster answers at RAY_ADDRESS={address}",
                      "ray start --head", "unset RAY_ADDRESS")
    assert not (tmp_path / "models").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Prepared digits splits (data/prepared), made in-process."""
    from pipeline.core.params import parse_params
    from pipeline.data.datasets import prepare_dataset

    root = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare_dataset(parse_params({}).data, root, seed=0)
    return root


CIFAR10_MODEL = {"attn_resolutions": [16]}  # the digits model's [4] is never reached at 32x32


def tiny_params(folder: Path, **sections) -> Path:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    tiny(params, experiments=("eps_simple",))
    for section, values in sections.items():
        params[section].update(values)
    return write_params(folder / "params.yaml", params)


def fake_model_dir(models: Path, name: str = KEY) -> Path:
    """models/<E>-<S>/state.json as the train stage writes it (enough for the stages to read)."""
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 40, "status": "ok",
                                                   "image_shape": [1, 8, 8],
                                                   "data_levels": 17}))
    return folder


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_corrupt_prepared_data_names_the_file(prepared, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(prepared, data)
    bad = truncate(data / "digits" / "train.npz")
    params = tiny_params(tmp_path)
    for name, args in (("train", ["-e", "eps_simple"]), ("classifier", [])):
        proc = stage(name, *args, "--params", params, "--data", data, cwd=tmp_path, timeout=60)
        assert_user_error(proc, bad, "unreadable or truncated", "dvc repro prepare")
        assert "Ray" not in proc.stdout


@pytest.mark.slow
def test_corrupt_reference_statistics_are_refused_by_evaluate_and_the_sweep(study, tmp_path):
    """data/reference_stats/train.npz cut short, or with one array edited and the file rewritten
    whole (its digest no longer matches): evaluate and the sweep stop in one line, before Ray,
    naming the file and `dvc repro reference_stats`; nothing of the study is written, and the
    run's MLflow record keeps the status its stages gave it (the input is refused before the run
    is marked RUNNING)."""
    def statuses() -> dict[str, str]:
        return {r.info.run_name: r.info.status for r in mlflow_runs(study)[1]}

    good = study / "data" / "reference_stats" / "train.npz"
    recorded = statuses()
    assert recorded[KEY] == "FINISHED"
    stats = tmp_path / "reference_stats"
    stats.mkdir()
    bad = truncate(Path(shutil.copy2(good, stats / "train.npz")))
    before = snapshot(study)
    common = ["--stats", stats, "--out", tmp_path / "out"]
    for name, args in (("evaluate", ["-e", "eps_simple", "--figures", tmp_path / "figures"]),
                       ("sweep", [])):
        proc = stage(name, *args, *common, cwd=study, code=study, timeout=120)
        assert_user_error(proc, bad, "unreadable reference statistics",
                          "dvc repro reference_stats")
        assert "Ray" not in proc.stdout
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["feature_sum"] = arrays["feature_sum"] * (1 + 1e-15)
    np.savez(bad, **arrays)
    proc = stage("evaluate", "-e", "eps_simple", "--figures", tmp_path / "figures", *common,
                 cwd=study, code=study, timeout=120)
    assert_user_error(proc, bad, "do not match the digest", "dvc repro reference_stats")
    assert snapshot(study) == before and not (tmp_path / "out").exists()
    assert statuses() == recorded


def test_corrupt_samples_names_the_file(tmp_path):
    fake_model_dir(tmp_path / "models")
    bad = tmp_path / "samples" / KEY / "samples.npz"
    bad.parent.mkdir(parents=True)
    np.savez(bad, images=np.zeros((60, 1, 8, 8), np.uint8), status=np.array("ok"))
    truncate(bad)
    proc = stage("evaluate", "-e", "eps_simple", "--params", tiny_params(tmp_path), "--models",
                 tmp_path / "models", "--samples", tmp_path / "samples", "--out",
                 tmp_path / "metrics", cwd=tmp_path, timeout=60)
    assert_user_error(proc, bad, "corrupt or truncated", f"dvc repro sample@{KEY}")
    assert not (tmp_path / "metrics").exists()


def test_corrupt_model_weights_name_the_file(tmp_path):
    folder = fake_model_dir(tmp_path / "models")
    (folder / "ema.pt").write_bytes(b"PK\x03\x04 not really a zip")
    proc = stage("sample", "-e", "eps_simple", "--params", tiny_params(tmp_path), "--models",
                 tmp_path / "models", "--out", tmp_path / "samples", cwd=tmp_path, timeout=60)
    assert_user_error(proc, folder / "ema.pt", "corrupt or truncated", f"dvc repro train@{KEY}")
    assert not (tmp_path / "samples" / KEY).exists()


def test_corrupt_classifier_weights_name_the_file(prepared, tmp_path):
    from pipeline.measure.digits_classifier import DigitsClassifier, save_classifier

    bad = tmp_path / "models" / "classifier" / "classifier.pt"
    save_classifier(DigitsClassifier(), bad)
    truncate(bad)
    proc = stage("reference", "--params", tiny_params(tmp_path), "--data", prepared, "--models",
                 tmp_path / "models", "--out", tmp_path / "metrics" / "reference.json",
                 cwd=tmp_path, timeout=120)
    assert_user_error(proc, bad, "truncated or corrupt", "dvc repro classifier")
    assert not (tmp_path / "metrics").exists()


def test_corrupt_cifar10_archive_names_the_file(tmp_path):
    from helpers import make_cifar10_archive

    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10_archive(archive, n_train=50, n_test=10)
    truncate(archive)
    params = tiny_params(tmp_path, data={"dataset": "cifar10", "cifar10_archive": str(archive)},
                         model=CIFAR10_MODEL)
    proc = stage("prepare", "--params", params, "--out", tmp_path / "prepared", cwd=tmp_path,
                 timeout=60)
    assert_user_error(proc, archive, "cannot read the CIFAR10 archive", "download it again",
                      "cs.toronto.edu")
    assert not (tmp_path / "prepared").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_on_resume_names_the_file_in_storage(study, tmp_path):
    """A truncated state.pt under ray_storage/: the rerun train stage fails (after Ray's
    retries) with a message naming that file and the folder to delete, not a worker's temp copy."""
    storage = tmp_path / "ray_storage"
    shutil.copytree(study / "ray_storage", storage)
    run = next(p.parent for p in storage.glob("*eps_simple*/checkpoint_manager_snapshot.json"))
    corrupted = [truncate(p) for p in ray_checkpoints(run.parent) if run in p.parents]
    assert corrupted
    proc = stage("train", "-e", "eps_simple", "--params", study / "params.yaml", "--data",
                 study / "data" / "prepared", "--storage", storage, "--out", tmp_path / "models",
                 "--plots", tmp_path / "plots", cwd=tmp_path, code=study)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: training of '{KEY}' cannot resume: "), message
    assert any(str(p) in message for p in corrupted), message
    assert "corrupt or truncated" in message and f"delete the run folder {run}" in message
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("case", ["train", "classifier", "reference_stats", "sample", "evaluate",
                                  "evaluate_stats", "reference", "tabulate"])
def test_stage_before_its_inputs_names_the_file_and_the_command(prepared, tmp_path, case):
    params = tiny_params(tmp_path)
    models, empty = tmp_path / "models", tmp_path / "absent"
    if case == "train":
        args, needles = ["-e", "eps_simple", "--data", empty], [
            empty / "digits" / "train.npz", "dvc repro prepare"]
    elif case == "classifier":
        args, needles = ["--data", empty], [empty / "digits" / "train.npz", "dvc repro prepare"]
    elif case == "sample":
        args, needles = ["-e", "eps_simple", "--models", models], [
            models / KEY / "state.json", f"dvc repro train@{KEY}"]
    elif case == "evaluate":
        fake_model_dir(models)
        args, needles = ["-e", "eps_simple", "--models", models, "--samples", empty], [
            empty / KEY / "samples.npz", f"dvc repro sample@{KEY}"]
    elif case in ("reference", "reference_stats"):
        args, needles = ["--data", prepared, "--models", models], [
            models / "classifier" / "classifier.pt", "dvc repro classifier"]
    elif case == "evaluate_stats":  # a run to score, and no reference statistics yet
        case = "evaluate"
        fake_model_dir(models)
        samples = tmp_path / "samples" / KEY / "samples.npz"
        samples.parent.mkdir(parents=True)
        np.savez(samples, images=np.zeros((60, 1, 8, 8), np.uint8), status=np.array("ok"))
        from pipeline.measure.digits_classifier import DigitsClassifier, save_classifier

        save_classifier(DigitsClassifier(), models / "classifier" / "classifier.pt")
        args, needles = ["-e", "eps_simple", "--data", prepared, "--stats", empty, "--models",
                         models, "--samples", tmp_path / "samples"], [
            empty / "train.npz", "not found", "dvc repro reference_stats"]
    else:
        args, needles = ["--metrics", empty, "--results", tmp_path / "results"], [
            empty, "evaluate"]
    proc = stage(case, "--params", params, *args, cwd=tmp_path, timeout=120)
    assert_user_error(proc, *needles)


def test_cifar10_archive_absent_offline_says_where_to_put_it(tmp_path):
    archive = tmp_path / "raw" / "cifar-10-python.tar.gz"
    params = tiny_params(tmp_path, data={"dataset": "cifar10", "cifar10_archive": str(archive),
                                         "download": False}, model=CIFAR10_MODEL)
    proc = stage("prepare", "--params", params, "--out", tmp_path / "prepared", cwd=tmp_path,
                 timeout=60)
    assert_user_error(proc, archive, "cifar-10-python.tar.gz", "data.cifar10_archive",
                      "data.download")


def test_inception_weights_absent_offline_say_where_to_put_them(tmp_path):
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    cifar = {"dataset": "cifar10", "download": False}
    for weights, needles in ((str(missing), [missing, "file not found"]),
                             (None, [tmp_path / "hub", "downloading is off"])):
        params = tiny_params(tmp_path, data=cifar, model=CIFAR10_MODEL,
                             evaluate={"inception_weights": weights})
        proc = stage("classifier", "--params", params, "--out", tmp_path / "classifier",
                     cwd=tmp_path, env={"TORCH_HOME": str(tmp_path)}, timeout=60)
        assert_user_error(proc, *needles, "evaluate.inception_weights")
    assert not (tmp_path / "classifier").exists()


# --------------------------------------------------------------------------------------------
# Nothing half-written: writers killed mid-write
# --------------------------------------------------------------------------------------------

WRITER = """
import sys, time
import numpy as np
from pipeline.core.io import atomic_dir, save_npz
kind, target = sys.argv[1], sys.argv[2]
if kind == "npz":  # ~200 MB: the kill lands while the bytes are being written
    save_npz(target, images=np.full((200, 1000, 1000), 7, np.uint8))
else:
    with atomic_dir(target) as tmp:
        (tmp / "samples.npz").write_bytes(b"new, half done")
        print("ready", flush=True)
        time.sleep(60)
"""


def test_atomic_writes_killed_mid_write_leave_the_old_output(tmp_path):
    """SIGKILL a writer of pipeline.core.io mid-write: the destination keeps its old, complete
    content (or stays absent); only a dot-named temporary is left beside it."""
    from pipeline.core.io import atomic_dir, save_npz

    old = np.arange(10, dtype=np.uint8)
    target = tmp_path / "samples.npz"
    save_npz(target, images=old)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, "npz", str(target)],
                            env=env_for(PROJECT))
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 1 << 20 for p in tmp_path.glob(".samples.npz.*")):
        assert proc.poll() is None and time.monotonic() < deadline, "writer ended before the kill"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    with np.load(target) as f:
        assert np.array_equal(f["images"], old)
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != target)

    folder = tmp_path / "out" / "eps_simple"
    with atomic_dir(folder) as tmp:
        (tmp / "samples.npz").write_bytes(b"old, complete")
    assert folder.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    proc = subprocess.Popen([sys.executable, "-c", WRITER, "dir", str(folder)],
                            env=env_for(PROJECT), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    assert [p.name for p in folder.iterdir()] == ["samples.npz"]
    assert (folder / "samples.npz").read_bytes() == b"old, complete"
    assert all(p.name.startswith(".") for p in folder.parent.iterdir() if p != folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
