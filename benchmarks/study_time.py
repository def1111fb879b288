"""Where the study's wall time goes: each DVC stage's wall time, split into the work it exists
for (the training loop, sampling, evaluation, the sweep's Tuner.fit) and everything else
(process start-up, imports, Ray start-up and shut-down, MLflow and file bookkeeping).

    python benchmarks/study_time.py --repo /tmp/fresh --command "make study" --json t.json
    python benchmarks/study_time.py --repo /tmp/fresh --log study.log   # an earlier run's log

The command runs in `--repo` with every output line time-stamped (the log is kept with
`--log`, or read back from it when the command is omitted). A stage runs from DVC's
"Running stage '<name>':" to its "Updating lock file"; its work is read from what the stage
wrote: models/<run>/state.json (`wall_s`: the training loop), the sample stage's "sampled ...
in Ns" line, metrics/<run>_run.json (`evaluate_wall_s`, `checkpoints_wall_s`) and the sweep's
"sweep done in Ns" line. Stages without such a figure count as work (prepare, classifier,
reference, tabulate).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import _common as common

STAGE_START = re.compile(r"Running stage '([^']+)'")
STAGE_END = re.compile(r"Updating lock file|Stage '[^']+' didn't change, skipping")
SAMPLED = re.compile(r"sampled \S+: \d+ images in (\d+(?:\.\d+)?)s")
SWEEP = re.compile(r"sweep done in (\d+(?:\.\d+)?)s")
GROUPS = ("prepare", "classifier", "train", "sample", "evaluate", "reference", "sweep",
          "tabulate")


def run_logged(command: str, repo: Path, log: Path | None) -> list[tuple[float, str]]:
    """Run `command` in `repo`; return (seconds since start, line) for every output line."""
    start = time.monotonic()
    lines = []
    proc = subprocess.Popen(command, shell=True, cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
        print(line, end="", flush=True)
    lines.append((time.monotonic() - start, f"[exit {proc.wait()}]"))
    if log is not None:
        log.write_text("".join(f"{t:.2f}\t{text}\n" for t, text in lines))
    return lines


def read_log(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text().splitlines():
        stamp, _, text = line.partition("\t")
        out.append((float(stamp), text))
    return out


def stage_spans(lines: list[tuple[float, str]]) -> list[dict]:
    """[{stage, start, end, lines}] from DVC's output."""
    spans, current = [], None
    for t, text in lines:
        match = STAGE_START.search(text)
        if match:
            if current is not None and current["end"] is None:
                current["end"] = t

            current = {"stage": match.group(1), "start": t, "end": None, "lines": []}
            spans.append(current)
        elif current is not None and current["end"] is None:
            if STAGE_END.search(text):
                current["end"] = t
            else:
                current["lines"].append(text)
    last = lines[-1][0] if lines else 0.0
    for span in spans:
        span["end"] = last if span["end"] is None else span["end"]
    return spans


def work_seconds(span: dict, repo: Path) -> float | None:
    """The seconds of the stage's own work, from what it wrote (None: the whole stage)."""
    group, _, run = span["stage"].partition("@")
    text = "\n".join(span["lines"])
    if group == "train":
        state = repo / "models" / run / "state.json"
        return json.loads(state.read_text()).get("wall_s") if state.is_file() else None
    if group == "sample":
        match = SAMPLED.search(text)
        return float(match.group(1)) if match else None
    if group == "evaluate":
        path = repo / "metrics" / f"{run}_run.json"  # timings: the run's description
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return (record.get("evaluate_wall_s") or 0.0) + (record.get("checkpoints_wall_s") or 0.0)
    if group == "sweep":
        match = SWEEP.search(text)
        return float(match.group(1)) if match else None
    return None


def summarize(lines: list[tuple[float, str]], repo: Path) -> dict:
    spans = stage_spans(lines)
    rows = []
    for group in GROUPS:
        mine = [s for s in spans if s["stage"].partition("@")[0] == group]
        if not mine:
            continue
        wall = sum(s["end"] - s["start"] for s in mine)
        works = [work_seconds(s, repo) for s in mine]
        work = sum(w if w is not None else s["end"] - s["start"] for w, s in zip(works, mine))
        rows.append({"stages": group, "count": len(mine), "wall_s": wall, "work_s": work,
                     "other_s": wall - work, "other_per_stage_s": (wall - work) / len(mine)})
    total = lines[-1][0] if lines else 0.0
    in_stages = sum(r["wall_s"] for r in rows)
    rows.append({"stages": "outside stages (install, DVC)", "count": None,
                 "wall_s": total - in_stages, "work_s": None, "other_s": total - in_stages,
                 "other_per_stage_s": None})
    return {"total_s": total, "groups": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=common.REPO_ROOT,
                   help="the checkout the study runs in (default: this one)")
    p.add_argument("--command", default=None,
                   help="what to run there, e.g. 'make study' or 'dvc repro' (default: none, "
                        "read --log)")
    p.add_argument("--log", type=Path, default=None,
                   help="time-stamped log to write (with --command) or to read (without)")
    common.add_common_args(p)
    args = p.parse_args(argv)

    if args.command is None and args.log is None:
        p.error("give --command to run the study, or --log to read an earlier run's log")
    info = common.machine()
    if args.command is not None:
        lines = run_logged(args.command, args.repo, args.log)
    else:
        lines = read_log(args.log)
    summary = summarize(lines, args.repo.resolve())
    print(f"machine: {common.describe(info)}")
    print(f"total: {summary['total_s']:.0f} s ({summary['total_s'] / 60:.1f} min)")
    print(common.table(summary["groups"], ["stages", "count", "wall_s", "work_s", "other_s",
                                           "other_per_stage_s"]))
    common.write_json(args.json, "study_time", args, info, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
