"""Run a command with one local Ray instance that every Ray stage of it joins.

    python -m stages.local_ray dvc repro        # what `make study` runs

Each Ray stage (train@*, sweep) started by plain `dvc repro` starts a private Ray instance of
its own and stops it at its end (about 7 s each on the 2-core machine). Under this command
they all join one instance, started here and stopped when the command ends (also on Ctrl-C,
which reaches the command and not Ray's processes, or on a failure): the stages print
`connected to Ray cluster at 127.0.0.1:<port>`. With RAY_ADDRESS already set (a cluster), the
command runs as it is. The exit code is the command's (128 + N if signal N killed it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stages.local_ray",
        description="Run COMMAND with one local Ray instance that its Ray stages join.")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command and its arguments, e.g. dvc repro")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run, e.g. `python -m stages.local_ray dvc repro`")
    if shutil.which(command[0]) is None:
        p.error(f"command not found: {command[0]} (is the project's .venv on PATH?)")
    if os.environ.get("RAY_ADDRESS"):
        return subprocess.call(command)

    # The instance lives in a process of its own session, so a Ctrl-C to the terminal's
    # process group stops the command but not Ray under it (its GCS would die of SIGINT, and
    # stopping Ray then waits out the GCS reconnect timeout, 60 s, instead of 2 s).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))})
    try:
        address = holder.stdout.readline().strip()
        if not address:
            print("error: could not start a local Ray instance (see Ray's messages above); "
                  "check `ray status` and free memory, or set RAY_ADDRESS to a running cluster",
                  file=sys.stderr)
            return 1
        print(f"started a local Ray instance at {address} for: {' '.join(command)}", flush=True)
        proc = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": address})
        # Ctrl-C reaches the command too and is the command's to act on: this process waits,
        # not interrupted (a KeyboardInterrupt inside Popen.wait() right after the child was
        # reaped loses its exit status, and the next wait() reports 0)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N
    finally:
        stop(holder)


# the process that holds the instance: prints its address, stops it at the end of its stdin
HOLD = ("import sys; from pipeline.cluster import connection; "
        "print(connection.start_local_cluster(log_to_driver=False), flush=True); "
        "sys.stdin.read(); connection.shutdown()")


def stop(holder: subprocess.Popen) -> None:
    """Stop the instance: end the holder's stdin, wait for its orderly shutdown, else kill it
    and the session it leads (Ray's processes)."""
    try:
        holder.stdin.close()
        holder.wait(timeout=60)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


if __name__ == "__main__":
    sys.exit(main())
