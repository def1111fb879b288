"""Run the study (or part of it) as a Ray job on a cluster and bring its results home.

    python -m stages.submit --address http://HEAD:8265                 # dvc repro
    python -m stages.submit --address http://HEAD:8265 -- dvc repro train@eps_simple-0
    python -m stages.submit --fetch JOB_ID                              # a job left running

Needs a DVC remote every node and this machine reach (`dvc remote add -d store
s3://bucket/ddpm`) and an MLflow tracking server (`MLFLOW_TRACKING_URI=http://...`); both are
checked before anything is uploaded. The checkout is uploaded with `--working-dir`
semantics (what git ignores stays here); on the cluster the job pulls what the remote already
holds, runs the command, pushes models, samples and DVC's run cache to the remote and leaves a
results bundle there (`pipeline.artifacts.bundle`). Here, when the job succeeds, the bundle's
dvc.lock, metrics, plots and tables are written into the checkout and `dvc pull` restores the
rest: `dvc status` is clean and `dvc metrics diff` compares the cluster's run with the last
commit. A job that fails or is stopped changes nothing here, and the reason is printed.
Ctrl-C stops following the logs; the job goes on (`--fetch JOB_ID` later). Exit code: 0 done,
1 the job failed or was stopped, 2 a problem found before submitting (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.artifacts.bundle import (apply_bundle, bundle_key, changed_sources, make_bundle,
                                       read_bundle, summary)
from pipeline.core.errors import UserError
from pipeline.core.params import load_params
from pipeline.core.tracking_store import check_reachable, resolve_tracking_uri
from stages import _common

# Environment passed to the job where it is set here (the job runs with the cluster's own
# environment otherwise); --env NAME adds more (for example AWS_ACCESS_KEY_ID where the
# cluster has no credentials of its own)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "DDPM_STORAGE", "AWS_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "RAY_AUTH_MODE")
# Never uploaded, ignored by git or not: DVC's cache and scratch, local runs and environments
EXCLUDES = [".git", ".dvc/cache", ".dvc/tmp", ".venv", "mlruns", "mlartifacts", "mlflow.db",
            "ray_storage", "checkpoints", "dvc_plots"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stages.submit",
        description="Run COMMAND (default: dvc repro) as a Ray job and bring its results into "
                    "this checkout.")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="the cluster's dashboard address, http://HEAD:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--params", default="params.yaml", type=Path,
                   help="the study's params file (default: %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="also pass this environment variable to the job (repeatable)")
    p.add_argument("--no-wait", action="store_true",
                   help="submit and return; bring the results home later with --fetch")
    p.add_argument("--no-pull", action="store_true",
                   help="write dvc.lock, metrics and tables, but do not `dvc pull` the models "
                        "and samples")
    p.add_argument("--fetch", metavar="JOB_ID",
                   help="bring the results of a finished job home (no submission)")
    p.add_argument("--in-job", metavar="JOB_ID", help=argparse.SUPPRESS)  # the job's side
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command to run on the cluster (default: dvc repro)")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    command = command or ["dvc", "repro"]
    repo = Path.cwd()
    if args.in_job:
        return run_in_job(repo, args.in_job, command)
    try:
        if args.fetch:
            return fetch(repo, args.fetch, pull=not args.no_pull)
        return submit(repo, args, command)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _common.EXIT_USER_ERROR


class SubmitError(UserError, RuntimeError):
    """A problem found before or after the job (not in it): what, and what to do."""


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


def remote_url(repo: Path) -> str:
    """The URL of the checkout's default DVC remote; SubmitError without one."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        name = dvc_repo.config["core"].get("remote")
        if not name:
            raise SubmitError(
                "no default DVC remote: the job sends models, samples and its results there "
                "and this checkout gets them back from it; add one that the cluster and this "
                "machine reach, e.g. `dvc remote add -d store s3://bucket/ddpm`")
        return dvc_repo.config["remote"][name]["url"]


def check_tracking(repo: Path, params_path: Path) -> str:
    """The tracking URI the job will use: a server, reachable from here."""
    params = load_params(params_path)
    uri = resolve_tracking_uri(params.tracking, repo)
    if uri.startswith("sqlite:"):
        raise SubmitError(
            f"MLflow tracking store {uri} is a file in the job's copy of the checkout, deleted "
            "with it: set MLFLOW_TRACKING_URI to an `mlflow server` that the cluster and this "
            "machine reach (http://HOST:5000)")
    check_reachable(uri)
    return uri


def submit(repo: Path, args: argparse.Namespace, command: list[str]) -> int:
    if not args.address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (the Ray "
                          "dashboard) or set RAY_API_SERVER_ADDRESS")
    if not (repo / "dvc.yaml").is_file():
        raise SubmitError(f"{repo}: no dvc.yaml; run from the root of the study's checkout")
    remote = remote_url(repo)
    uri = check_tracking(repo, args.params)
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        raise SubmitError(f"--env {missing[0]}: not set in this environment")
    env = {name: os.environ[name] for name in (*FORWARDED_ENV, *args.env) if name in os.environ}
    client = _client(args.address)
    job_id = f"ddpm-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    entrypoint = f"python -m stages.submit --in-job {job_id} -- {shlex.join(command)}"
    runtime_env = {"working_dir": str(repo), "excludes": EXCLUDES, "env_vars": env}
    for attempt in range(30):  # a head started moments ago may have no job agent up yet
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=job_id,
                              runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == 29:
                raise SubmitError(f"the cluster at {args.address} refused the job: "
                                  f"{str(exc).strip().splitlines()[0]}") from None
            time.sleep(1)
    print(f"submitted {job_id} to {args.address}: {shlex.join(command)} (DVC remote {remote}, "
          f"MLflow {uri})", flush=True)
    if args.no_wait:
        print(f"follow it with `ray job logs --address {args.address} --follow {job_id}`; "
              f"then `python -m stages.submit --fetch {job_id}`")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following {job_id}; it goes on. Stop it with `ray job stop --address "
              f"{args.address} {job_id}`, or bring its results home once it succeeds with "
              f"`python -m stages.submit --fetch {job_id}`", file=sys.stderr)
        return 130
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        reason = (info.message or "").strip().splitlines()  # the first line says why
        print(f"job {job_id} {status.lower()}: {reason[0] if reason else 'see its logs'}; "
              "this checkout is unchanged (what the job finished is in the DVC remote's run "
              "cache: resubmitting skips it)", file=sys.stderr)
        return 1
    return fetch(repo, job_id, pull=not args.no_pull)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubmitError(f"Ray cluster at {address} is unreachable ({first}); start it "
                          "(`ray start --head`) or pass the dashboard address with "
                          "--address http://HEAD:8265") from None


def follow(client, job_id: str) -> str:
    """Print the job's log lines as they come; return its final status."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in TERMINAL:
            return status
        time.sleep(1)


def fetch(repo: Path, job_id: str, pull: bool = True) -> int:
    """Apply the results bundle of job `job_id` to the checkout, then `dvc pull`."""
    data = read_from_remote(repo, bundle_key(job_id))
    manifest, files = read_bundle(data)
    changed = changed_sources(repo, manifest)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise SubmitError(
            f"{', '.join(changed[:3])}{more} changed since job {job_id} was submitted, and its "
            "dvc.lock describes them as they were; nothing was written. Put them back as they "
            f"were (git stash), then run `python -m stages.submit --fetch {job_id}`")
    written = apply_bundle(repo, files)
    print(f"job {job_id}: wrote {summary(written)} into {repo}", flush=True)
    if pull:  # the stages the job's dvc.lock has (a `dvc repro TARGET` job has only some)
        stages = list((yaml.safe_load(files["dvc.lock"]) or {}).get("stages") or {})
        proc = subprocess.run(["dvc", "pull", *stages], cwd=repo)
        if proc.returncode != 0:
            print(f"warning: `dvc pull` exited {proc.returncode}: rerun it to restore the models "
                  "and samples", file=sys.stderr)
            return 1
    print("done: `dvc status` shows nothing to run; compare with `dvc metrics diff`")
    return 0


def _remote(repo: Path):
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    dvc_repo = Repo(str(repo))
    try:
        return dvc_repo, dvc_repo.cloud.get_remote()
    except NoRemoteError:
        dvc_repo.close()
        raise SubmitError("no default DVC remote in this checkout: a job's results bundle, models "
                          "and samples are on the DVC remote it pushed to; add that one here "
                          "(`dvc remote add -d store s3://bucket/ddpm`) and rerun") from None


def read_from_remote(repo: Path, key: str) -> bytes:
    dvc_repo, remote = _remote(repo)
    path = remote.fs.join(remote.path, key)
    try:
        with remote.fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise SubmitError(
            f"no results bundle {remote.fs.unstrip_protocol(path)}: the job has not succeeded "
            "(still running, failed or stopped: `ray job status` says which)") from None
    finally:
        dvc_repo.close()


def write_to_remote(repo: Path, key: str, data: bytes) -> str:
    dvc_repo, remote = _remote(repo)
    try:
        path = remote.fs.join(remote.path, key)
        remote.fs.makedirs(remote.fs.parent(path), exist_ok=True)
        with remote.fs.open(path, "wb") as fh:
            fh.write(data)
        return remote.fs.unstrip_protocol(path)
    finally:
        dvc_repo.close()


# --------------------------------------------------------------------------------------------
# The job (runs in Ray's copy of the checkout on the head node)
# --------------------------------------------------------------------------------------------


def run_in_job(repo: Path, job_id: str, command: list[str]) -> int:
    if not (repo / ".git").exists():  # --working-dir uploads leave .git out
        subprocess.run(["dvc", "config", "--local", "core.no_scm", "true"], cwd=repo, check=True)
    print(f"job {job_id}: pulling what the DVC remote holds for this dvc.lock (outputs, run "
          "cache)", flush=True)
    subprocess.run(["dvc", "pull", "--run-cache", "--allow-missing"], cwd=repo)
    code = subprocess.call(command, cwd=repo)
    print(f"job {job_id}: `{shlex.join(command)}` exited {code}; pushing outputs and the run "
          "cache to the DVC remote", flush=True)
    pushed = subprocess.call(["dvc", "push", "--run-cache"], cwd=repo)
    if code != 0:
        return code
    if pushed != 0:
        print(f"job {job_id}: `dvc push` exited {pushed}; no results bundle", file=sys.stderr)
        return pushed
    bundle, members = make_bundle(repo)
    where = write_to_remote(repo, bundle_key(job_id), bundle)
    print(f"job {job_id}: results bundle ({summary(members)}) -> {where}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
