"""Stage-like command `calibrate`: the spread between training seeds of every experiment,
kept as data (calibration/seeds.json) so that a single-seed study's intervals cover training
noise (`pipeline.reporting.calibration`).

    python -m stages.calibrate [--params params.yaml] [--metrics metrics] [--seeds 0 1 2 3]
                               [--out calibration/seeds.json] [--machine TEXT]
    python -m stages.calibrate --check OTHER/metrics [--check-seed 0]

Make it once per recipe: run the study with study.seeds: [0, 1, 2, 3] (or more), then
calibrate; the file records each experiment's recipe, and tabulate uses it only for rows of
the same recipe. Writes <out> and <out>.md (the spreads and their leave-one-seed-out
coverage), and prints the latter. `--check` compares the runs in another metrics folder (made
on another CPU, or with another seed) with the calibration, and writes nothing.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from stages import _common


def machine_description() -> str:
    """The CPU the calibration ran on, and the kernels torch was told to use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{os.cpu_count()}-core {model} ({isa}" + (f"; ATEN_CPU_CAPABILITY={forced})"
                                                       if forced else ")")


def main(argv: list[str] | None = None) -> int:
    parser = _common.parser(
        "calibrate", "Measure each experiment's spread between training seeds from the metrics "
        "of a several-seed study and keep it as data, for tabulate to widen single-seed "
        "intervals by it.", folders=("metrics",),
        out=(str(_common.CALIBRATION_FILE), "the calibration file (and <out>.md beside it)"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="the seeds to calibrate on (default: study.seeds)")
    parser.add_argument("--machine", default=None,
                        help="what the runs ran on (default: this machine's CPU)")
    parser.add_argument("--check", type=Path, default=None,
                        help="a metrics folder of runs made elsewhere: compare them with the "
                             "calibration in --out instead of making one")
    parser.add_argument("--check-seed", type=int, nargs="+", default=[0],
                        help="the seeds of the --check runs (default: %(default)s)")
    args = parser.parse_args(argv)

    def body(params) -> int:
        # the job's modules load once the params are checked (torch and Ray take seconds)
        from pipeline.core.io import write_text
        from pipeline.reporting import calibration as cal
        from pipeline.reporting.formats import to_markdown
        from pipeline.reporting.results import load_runs
        from pipeline.reporting.verdicts import seed_verdicts

        if args.check is not None:
            calibration = cal.load_calibration(args.out)
            if calibration is None:
                raise cal.CalibrationError(f"{args.out}: no calibration to check against; "
                                           "make it with `python -m stages.calibrate`")
            runs = load_runs(args.check, [(name, seed) for name in params.experiments
                                          for seed in args.check_seed])
            checked = cal.check_runs(calibration, runs)
            print(to_markdown(checked))
            for kind in ("with_training", "sampling_only"):
                hits = checked[f"covered_{kind}"].dropna()
                print(f"covered {kind.replace('_', ' ')}: {int(hits.sum())} of {len(hits)}")
            return 0
        seeds = args.seeds or list(params.study.seeds)
        if len(seeds) < 4:
            print(f"warning: {len(seeds)} seeds; a spread from fewer than 4 is barely an "
                  "estimate (the intervals widen by its uncertainty)")
        runs = load_runs(args.metrics, [(name, seed) for name in params.experiments
                                        for seed in seeds])
        content = cal.build_calibration(params, runs, seeds,
                                        args.machine or machine_description())
        content["verdicts"] = seed_verdicts(params, args.metrics,
                                            cal.parse_calibration(content, args.out))
        path = cal.write_calibration(args.out, content)
        report = cal.report_markdown(cal.load_calibration(path))
        write_text(path.with_suffix(".md"), report)
        print(report, end="")
        print(f"wrote {path} and {path.with_suffix('.md')}")
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
