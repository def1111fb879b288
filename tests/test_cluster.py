"""The study on a Ray cluster whose nodes share no files.

A head node on 127.0.0.1 and a worker node on 127.0.0.2, started inside a mount namespace of
its own (`unshare -m`) in which the test's folders and the head's Ray folder lie under an empty
tmpfs: the worker node sees neither the study nor anything the head writes. A local S3 server
(moto's server mode) is Ray's storage, the DVC remote and the MLflow artifact store; a real
`mlflow server` (sqlite backend) is the tracking server. Every process is started here in a
process group of its own and stopped by it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import env_for, make_study_repo, sh, tiny

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
BUCKETS = ("ddpm-store", "ddpm-mlflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, what: str, timeout: float = 60.0, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: exited {proc.returncode}\n"
                                 f"{log.read_text()[-3000:] if log else ''}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {timeout:.0f} s\n"
                         f"{log.read_text()[-3000:] if log else ''}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


class Service:
    """A process in a process group of its own, stopped by that group."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def send(self, sig) -> None:
        """`sig` to the group, if it is still running."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig=signal.SIGTERM, timeout: float = 5.0) -> None:
        """`sig` to the group, SIGKILL to what is left after `timeout` s (a Ray node or an
        MLflow server that has not exited by then is only cleaning up after itself)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        try:  # children that outlived the leader (same group)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._fh.close()


@pytest.fixture(scope="module")
def namespaces_work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unshare")
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            f"mount -t tmpfs tmpfs {folder} && touch {folder}/x"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces do not work here (unshare -m: "
                    f"{probe.stderr.strip() or probe.returncode}); the cluster tests need them")
    assert not (folder / "x").exists()  # the tmpfs was the namespace's own


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3

    folder = tmp_path_factory.mktemp("s3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
           "MLFLOW_S3_ENDPOINT_URL": url}
    server = Service([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                     env_for(isolated=True), folder / "moto.log")
    try:
        wait_for(lambda: port_open(port), "moto server", proc=server.proc, log=server.log)
        client = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)
        yield SimpleNamespace(url=url, env=env, client=client)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = Service([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                      str(port), "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                      "--artifacts-destination", f"s3://{BUCKETS[1]}/artifacts",
                      "--workers", "1"],
                     env_for(isolated=True, extra=s3.env), folder / "mlflow.log")
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200,
                 "mlflow server", timeout=120, proc=server.proc, log=server.log)
        yield uri
    finally:
        server.stop()


class Cluster:
    """A head node (127.0.0.1, 1 CPU) and a worker node (127.0.0.2, 1 CPU) that sees none of
    `hidden` (each mounted over with an empty tmpfs in its own mount namespace)."""

    def __init__(self, folder: Path, env: dict, hidden: list[Path]):
        self.folder = folder
        self.env = env
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        tag = secrets.token_hex(3)
        # short paths: Ray's socket paths must stay under 108 characters
        self.head_temp = Path(f"/tmp/ddpm-head-{tag}")
        self.worker_temp = Path(f"/tmp/ddpm-worker-{tag}")
        self.hidden = [*hidden, self.head_temp]
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.head = Service(
            ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dashboard_port), "--num-cpus", "1",
             # ports with fixed defaults: another Ray instance on this machine cannot take them
             "--dashboard-agent-listen-port", str(free_port()),
             "--ray-client-server-port", str(free_port()),
             "--temp-dir", str(self.head_temp), "--disable-usage-stats"],
            env, folder / "head.log")
        self.worker = None
        wait_for(lambda: urllib.request.urlopen(f"{self.address}/api/version",
                                                timeout=2).status == 200,
                 "Ray head", timeout=120, proc=self.head.proc, log=self.head.log)
        self.start_worker()

    def start_worker(self, log_name: str = "worker.log") -> None:
        for path in (*self.hidden, self.worker_temp):
            path.mkdir(parents=True, exist_ok=True)
        mounts = " && ".join(f"mount -t tmpfs tmpfs {p}" for p in
                             (*self.hidden, self.worker_temp))
        script = (f"{mounts} && exec ray start --block --address 127.0.0.1:{self.gcs_port} "
                  f"--node-ip-address 127.0.0.2 --num-cpus 1 --temp-dir {self.worker_temp} "
                  f"--dashboard-agent-listen-port {free_port()} --disable-usage-stats")
        self.worker = Service(["unshare", "-m", "sh", "-c", script], self.env,
                              self.folder / log_name)
        wait_for(lambda: self.alive_nodes() == 2, "Ray worker node joining", timeout=120,
                 proc=self.worker.proc, log=self.worker.log)

    def alive_nodes(self) -> int:
        import json

        with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as r:
            summary = json.load(r)["data"]["summary"]
        return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")

    def stop(self) -> None:
        # SIGTERM lets a node start its clean-up, which takes half a minute here; past a
        # second, SIGKILL ends what is left (the folders are removed below)
        nodes = [self.head] if self.worker is None else [self.worker, self.head]
        for node in nodes:
            node.send(signal.SIGTERM)
        time.sleep(1.0)
        for node in nodes:
            node.stop(signal.SIGKILL)
        shutil.rmtree(self.head_temp, ignore_errors=True)
        shutil.rmtree(self.worker_temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(namespaces_work, s3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    env = env_for(isolated=True, extra={**s3.env, "RAY_TRAIN_V2_ENABLED": "1"})
    running = Cluster(folder, env, hidden=[tmp_path_factory.getbasetemp()])
    try:
        yield running
    finally:
        running.stop()


def cluster_study(root: Path, s3, mlflow_uri: str, edit) -> tuple[Path, dict]:
    """A fresh tiny study repo whose DVC remote is the S3 server; the env of its client."""
    repo = make_study_repo(root, edit)
    sh(["dvc", "remote", "add", "-d", "store", f"s3://{BUCKETS[0]}/{root.name}/dvc"], repo)
    sh(["dvc", "remote", "modify", "store", "endpointurl", s3.url], repo)
    sh(["git", "commit", "-qam", "DVC remote"], repo)
    env = {**s3.env, "MLFLOW_TRACKING_URI": mlflow_uri}
    return repo, env


def save_log(text: str, name: str, tmp_path: Path) -> None:
    """Keep a job's output under $TEST_ARTIFACTS (CI keeps it), else beside the test."""
    folder = Path(os.environ.get("TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def submit(repo: Path, env: dict, address: str, *command: str, on_line=None,
           timeout: float = 900, verbose: bool = False) -> tuple[int, str]:
    """`python -m stages.submit` as a user runs it; `on_line(line)` sees each output line; with
    `verbose`, the job's stages print Ray Train's own lines too (DDPM_VERBOSE=1, forwarded)."""
    run_env = env_for(repo, isolated=True, extra={**env, **({"DDPM_VERBOSE": "1"}
                                                             if verbose else {})})
    args = [sys.executable, "-m", "stages.submit", "--address", address,
            "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]
    if verbose:
        args += ["--env", "DDPM_VERBOSE"]
    if command:
        args += ["--", *command]
    proc = subprocess.Popen(args, cwd=repo, env=run_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
            assert time.monotonic() < deadline, "".join(lines[-50:])
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(lines)


def test_two_workers_on_two_nodes_with_s3_storage_resume_after_the_worker_node_dies(
        cluster, s3, mlflow_server, tmp_path):
    """train@eps_simple-0 with 2 workers spread over the two nodes, checkpoints in S3: the
    worker node is killed after a checkpoint and started again; training resumes from the
    last checkpoint with a continuous step count, and the model comes home."""
    storage = f"s3://{BUCKETS[0]}/{tmp_path.name}/checkpoints"

    def edit(params):
        tiny(params, experiments=("eps_simple",))
        params["train"].update(steps=60, num_workers=2, cpus_per_worker=1.0, batch_size=32,
                               log_every=10, checkpoint_every=20, max_failures=3)
        params["cluster"] = {"storage": storage, "placement": "spread"}

    repo, env = cluster_study(tmp_path, s3, mlflow_server, edit)
    killed = {}

    def on_line(line):
        step = re.search(r"train eps_simple-0: step (\d+)/60", line)
        if step and int(step.group(1)) >= 30 and not killed:
            killed["at"] = int(step.group(1))
            cluster.worker.stop(signal.SIGKILL)
            cluster.start_worker("worker-restarted.log")

    start = time.monotonic()
    code, out = submit(repo, env, cluster.address, "dvc", "repro", "train@eps_simple-0",
                       on_line=on_line, verbose=True)  # Ray Train's lines: where workers ran
    wall = time.monotonic() - start
    assert code == 0, out[-6000:]
    assert killed, out[-4000:]
    save_log(out, "cluster_train.log", tmp_path)
    # the worker group, as Ray Train placed it: one worker on each node (the head reports the
    # machine's address, the worker node its own 127.0.0.2), again after the restart
    groups = re.findall(r"- \(ip=([\d.]+), pid=\d+\) world_rank=(\d)", out)
    assert len(groups) == 4, groups
    for group in (groups[:2], groups[2:]):
        ips = {ip for ip, _ in group}
        assert len(ips) == 2 and "127.0.0.2" in ips, groups
    steps = [int(s) for s in re.findall(r"train eps_simple-0: step (\d+)/60", out)]
    resumed = steps[steps.index(killed["at"]) + 1:]
    assert resumed and resumed[0] in (30, 40, 50) and resumed[0] <= killed["at"] + 10, steps
    state = yaml.safe_load((repo / "models" / "eps_simple-0" / "state.json").read_text())
    assert state["step"] == 60 and state["status"] == "ok"
    assert state["run_path"].startswith(storage)
    curve = (repo / "plots" / "loss" / "eps_simple-0.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in curve] == [10, 20, 30, 40, 50, 60]
    keys = [o["Key"] for o in s3.client.list_objects_v2(
        Bucket=BUCKETS[0], Prefix=f"{tmp_path.name}/checkpoints/")["Contents"]]
    assert any("checkpoint" in k for k in keys), keys[:10]
    assert "not a git repository" not in out
    status = sh(["dvc", "status", "train@eps_simple-0"], repo).stdout
    assert "changed" not in status, status
    print(f"train stage on 2 nodes with a worker-node kill at step {killed['at']}: {wall:.0f} s")


@pytest.fixture(scope="module")
def submitted_study(cluster, s3, mlflow_server, tmp_path_factory):
    """A tiny study (eps_simple, one sweep trial) run as a job on the two nodes, the README's
    `python -m stages.submit`, after a job that fails: its checkout, client env, study name,
    output and wall time, and the checkout's listing before and after the failed job. The
    sample/evaluate test below starts from its trained model (in the DVC remote)."""
    root = tmp_path_factory.mktemp("submitted")

    def edit(params):
        tiny(params, experiments=("eps_simple",))
        params["study"]["name"] = f"ddpm-cluster-{secrets.token_hex(2)}"
        for section in ("train", "sample", "evaluate"):  # the nodes have 1 CPU each
            params[section].update(cpus_per_worker=1.0)
        params["evaluate"].update(checkpoints="all", checkpoint_num_samples=20)  # EMA via S3
        params["sweep"].update(schedules=["linear"])  # one trial: the sweep runs, on the nodes
        params["cluster"] = {"storage": f"s3://{BUCKETS[0]}/{root.name}/ray"}

    repo, env = cluster_study(root, s3, mlflow_server, edit)
    study = yaml.safe_load((repo / "params.yaml").read_text())["study"]["name"]

    def listing():  # the checkout's files, leaving out git's and DVC's own folders
        return sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                      if not {".git", ".dvc"} & set(p.relative_to(repo).parts))

    before = listing()
    failed = submit(repo, env, cluster.address, "dvc", "repro", "no-such-stage")
    after_failure = listing()
    start = time.monotonic()
    code, out = submit(repo, env, cluster.address)
    wall = time.monotonic() - start
    save_log(out, "cluster_study.log", root)
    return SimpleNamespace(repo=repo, env=env, study=study, failed=failed, code=code, out=out,
                           wall=wall, before=before, after_failure=after_failure)


def test_the_tiny_study_submitted_as_a_job_comes_back_into_the_checkout(
        submitted_study, s3, mlflow_server):
    """`python -m stages.submit` (the README's command) runs `dvc repro` of a tiny study on the
    two nodes; the checkout then holds the job's dvc.lock, metrics and tables, `dvc status` is
    clean, `dvc pull` restores the models, and the MLflow server holds the runs. A job that
    fails leaves the checkout as it was and says so."""
    import json

    import mlflow

    repo, study = submitted_study.repo, submitted_study.study
    code, out = submitted_study.failed
    assert code == 1, out[-3000:]
    assert "failed" in out and "this checkout is unchanged" in out, out[-3000:]
    assert submitted_study.after_failure == submitted_study.before

    code, out, wall = submitted_study.code, submitted_study.out, submitted_study.wall
    assert code == 0, out[-6000:]
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo).stdout
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    headline = next(iter(shown.values()))["data"]["results/metrics.json"]["data"]
    run = headline["eps_simple"]
    assert isinstance(run["fid"], float) and isinstance(run["nll_bpd"], float)
    assert "fid" in headline["real_data"]
    assert (repo / "results" / "table1.md").is_file() and (repo / "results" / "sweep").is_dir()
    shutil.rmtree(repo / "models")
    shutil.rmtree(repo / "samples")
    pull = subprocess.run(["dvc", "pull"], cwd=repo, env=env_for(repo, extra=s3.env),
                          capture_output=True, text=True, timeout=300)
    assert pull.returncode == 0, pull.stderr[-3000:]
    assert (repo / "models" / "eps_simple-0" / "ema.pt").is_file()
    kept = sorted(p.name for p in (repo / "models" / "eps_simple-0" / "ema_snapshots").iterdir())
    assert kept == ["ema_20.pt", "ema_40.pt"]  # written to S3 by rank 0, read back
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo).stdout

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(study)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"eps_simple-0", "tables", "sweep"} <= set(runs), sorted(runs)
    assert runs["eps_simple-0"].data.metrics["fid"] == pytest.approx(run["fid"])
    assert runs["tables"].info.status == "FINISHED"
    artifacts = s3.client.list_objects_v2(Bucket=BUCKETS[1])["Contents"]
    assert any(o["Key"].endswith("grid.png") for o in artifacts)  # through the server, to S3
    print(f"tiny study as a Ray job on 2 nodes: {wall:.0f} s")


def test_sample_and_evaluate_on_two_nodes_give_one_local_workers_bytes_and_survive_a_lost_node(
        submitted_study, cluster, s3, mlflow_server, tmp_path):
    """sample@ and evaluate@eps_simple-0 of the submitted study's copy (its model trained on
    the nodes, from the DVC remote) run here with one worker each, then as a job on the two
    nodes with two workers each (one per node, chunks in S3; one CPU per worker in both, as
    small batches' kernels split their work by thread count). The worker node is killed while
    it samples a chunk and started again: Ray Data redoes that chunk alone, and samples.npz and
    the metrics that come home are the bytes and numbers of the local run. The worker counts
    are no DVC param: changing them leaves `dvc status` clean."""
    import json
    import threading

    import mlflow

    assert submitted_study.code == 0, "the submitted study failed: see the test above"
    repo = tmp_path / "study"
    shutil.copytree(submitted_study.repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sample"].update(num_samples=800, batch_size=200)  # 4 chunks of about 2 s
    params["evaluate"].update(nll_batch_size=10)  # the bound in 4 parts
    for section in ("sample", "evaluate"):  # one worker here; as many threads as there
        params[section].update(num_workers=1, cpus_per_worker=1.0)  # (small batches'
        # kernels split their work by thread count: the bytes need the same threads)
    params["cluster"] = {"storage": "ray_storage"}  # here: a local folder
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "commit", "-qam", "800 samples, the bound in 4 parts"], repo)
    stale = sh(["dvc", "status"], repo).stdout  # the trained model is the submitted study's
    assert "train@eps_simple-0" not in stale and "sample@eps_simple-0" in stale, stale
    sh([sys.executable, "-m", "stages.local_ray", "dvc", "repro", "evaluate@eps_simple-0"], repo,
       timeout=900)
    local = {name: (repo / name).read_bytes() for name in
             ("samples/eps_simple-0/samples.npz", "metrics/eps_simple-0.json",
              "metrics/eps_simple-0_nll.csv")}
    push = subprocess.run(["dvc", "push"], cwd=repo, env=env_for(repo, extra=s3.env),
                          capture_output=True, text=True, timeout=300)
    assert push.returncode == 0, push.stderr[-3000:]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section in ("sample", "evaluate"):
        params[section].update(num_workers=2)
    storage = f"{tmp_path.name}/ray"
    params["cluster"] = {"storage": f"s3://{BUCKETS[0]}/{storage}"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    targets = ["sample@eps_simple-0", "evaluate@eps_simple-0"]
    assert "up to date" in sh(["dvc", "status", *targets], repo).stdout  # no param changed
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "the run; two workers per stage, chunks in S3"], repo)

    lost = {}

    def kill_the_worker_node_while_it_samples():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            listing = s3.client.list_objects_v2(Bucket=BUCKETS[0], Prefix=storage)
            started = [o["Key"] for o in listing.get("Contents", [])
                       if "-sample-" in o["Key"] and "/started/sample-" in o["Key"]
                       and ".127.0.0.2." in o["Key"]]
            if started:
                lost["chunk"] = started[0].rsplit("/", 1)[1].split(".", 1)[0]
                cluster.worker.stop(signal.SIGKILL)
                cluster.start_worker("worker-restarted-sampling.log")
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_the_worker_node_while_it_samples, daemon=True)

    def on_line(line):
        if "sample eps_simple-0: 4 of 4 chunks to compute on 2 workers" in line:
            watcher.start()

    code, out = submit(repo, submitted_study.env, cluster.address, "dvc", "repro", "--force",
                       "--single-item", *targets, on_line=on_line)
    save_log(out, "cluster_sharded.log", tmp_path)
    assert code == 0, out[-6000:]
    watcher.join(timeout=60)
    assert lost, out[-4000:]
    sampled = re.search(r"sampled eps_simple-0: 800 images in \d+s \([\d.]+ images/s; "
                        r"(\d) chunks? computed on (\d) workers?, (\d) begun again after its "
                        r"worker was lost\)", out)
    assert sampled and sampled.groups() == ("4", "2", "1"), out[-6000:]  # only the lost one
    assert "evaluate eps_simple-0: " in out and "chunks to compute on 2 workers" in out
    for name, data in local.items():
        assert (repo / name).read_bytes() == data, name
    left = s3.client.list_objects_v2(Bucket=BUCKETS[0], Prefix=f"{storage}/chunks/")
    assert not [o["Key"] for o in left.get("Contents", [])  # none once the outputs exist
                if not o["Key"].endswith("/")]  # (pyarrow's folder markers aside)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(params["study"]["name"])
    run = client.search_runs([experiment.experiment_id],
                             "attributes.run_name = 'eps_simple-0'")[0]
    assert run.data.metrics["sample_workers"] == 2 and run.data.metrics["evaluate_workers"] == 2
    assert run.data.metrics["sample_images_per_s"] > 0
    assert json.loads(local["metrics/eps_simple-0.json"])["fid"] == pytest.approx(
        run.data.metrics["fid"], rel=0)
