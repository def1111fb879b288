"""What a params.yaml will cost, before it runs: stage by stage, the network evaluations, their
FLOPs (counted from the configured U-Net and feature extractor) and the time on the configured
workers, at a throughput measured here or given.

    python -m stages.plan                                  # params.yaml, measured here
    python -m stages.plan --params docs/cifar10.params.yaml --gflops 8600 --workers 8

With --gflops (GFLOP/s achieved by one worker, e.g. a GPU's) the times are extrapolated from
FLOPs; without it the U-Net's forward and training step are timed here first, at each
stage's batch and threads (a few seconds on the digits model, minutes on CIFAR10's on a CPU).
How it counts: pipeline/reporting/cost_plan.py.
"""

from __future__ import annotations

from pathlib import Path

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("plan", "Print what the study of a params file will cost, stage by "
                               "stage, before it runs.")
    p.add_argument("--gflops", type=float, default=None,
                   help="GFLOP/s achieved by one worker (default: measured here)")
    p.add_argument("--workers", type=int, default=None,
                   help="workers of train, sample and evaluate (default: params.yaml's)")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPUs of the cluster, for the sweep's trials at once (default: this "
                        "machine's)")
    p.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.gflops is not None and args.gflops <= 0:
        p.error("--gflops must be > 0")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")

    def body(params) -> int:
        # the job's modules load once the params are checked (torch and Ray take seconds)
        from pipeline.core.io import atomic_path
        from pipeline.reporting.cost_plan import (measure_rates, plan_lines, plan_table,
                                                  reference_saving, study_work)

        works = study_work(params, args.workers, args.cpus)
        if args.gflops:
            rates = None
            print(f"throughput: {args.gflops:g} GFLOP/s per worker (given): times extrapolated "
                  "from FLOPs")
        else:
            rates = measure_rates(params, works)
            shown = ", ".join(f"{kind} at batch {batch} on {threads} thread"
                              f"{'s' if threads != 1 else ''}: {rate:.1f}"
                              for (kind, batch, threads), rate in rates.items())
            print(f"throughput measured here, GFLOP/s per worker: {shown}")
        table = plan_table(works, args.gflops, rates)
        for line in plan_lines(table):
            print(line)
        saving = reference_saving(params)
        print(f"reference statistics: the {saving['images']:,} train images' features are "
              f"extracted once (reference_stats) and read by {saving['rows']} evaluate row"
              f"{'s' if saving['rows'] != 1 else ''}: {saving['saved']:,} fewer extractions than "
              f"one pass per row, and up to {saving['trials_saved']:,} fewer in the "
              f"{saving['trials']} sweep trials")
        if args.csv is not None:
            with atomic_path(args.csv) as tmp:
                table.to_csv(tmp, index=False)
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
