"""Run a command with one local Ray instance that every Ray stage of it joins.

    python -m stages.local_ray dvc repro        # what `make study` runs

Each Ray stage (train@*, sweep) started by plain `dvc repro` starts a private Ray instance of
its own and stops it at its end (about 7 s each on the 2-core machine). Under this command
they all join one instance, started here and stopped when the command ends (also on Ctrl-C or
a failure): the stages print `connected to Ray cluster at 127.0.0.1:<port>`. With RAY_ADDRESS
already set (a cluster), the command runs as it is. The exit code is the command's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


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
    if os.environ.get("RAY_ADDRESS"):
        return subprocess.call(command)

    from pipeline import distributed

    address = distributed.start_local_cluster(log_to_driver=False)
    print(f"started a local Ray instance at {address} for: {' '.join(command)}", flush=True)
    try:
        proc = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": address})
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the command too: let it stop first
                continue
    finally:
        distributed.shutdown()



if __name__ == "__main__":
    sys.exit(main())
