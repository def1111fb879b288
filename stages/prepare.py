"""Stage `prepare`: raw data -> data/prepared/<dataset>/{train,test}.npz (uint8, N x C x H x W).

    python -m stages.prepare [--params params.yaml] [--out data/prepared]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_params
from pipeline.data import DataError, prepare_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.prepare",
        description="Prepare the dataset named by data.dataset in params.yaml: write "
                    "<out>/<dataset>/train.npz and test.npz (uint8 images N x C x H x W, "
                    "int64 labels). The train/test split is seeded by study.seed.")
    parser.add_argument("--params", default="params.yaml", type=Path,
                        help="the study's params file (default: %(default)s)")
    parser.add_argument("--out", default="data/prepared", type=Path,
                        help="folder for the prepared splits (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        summary = prepare_dataset(params.data, args.out, seed=params.study.seed)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c, h, w = summary["image_shape"]
    print(f"prepared {summary['dataset']}: {summary['train']} train + {summary['test']} test "
          f"images of {c}x{h}x{w} -> {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
