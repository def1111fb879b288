"""Stage `prepare`: raw data -> data/prepared/<dataset>/{train,test}.npz (uint8, N x C x H x W).

    python -m stages.prepare [--params params.yaml] [--out data/prepared]
"""

from __future__ import annotations

from stages import _common


def main(argv: list[str] | None = None) -> int:
    parser = _common.parser(
        "prepare", "Prepare the dataset named by data.dataset in params.yaml: write "
                   "<out>/<dataset>/train.npz and test.npz (uint8 images N x C x H x W, int64 "
                   "labels). The train/test split is seeded by data.seed.",
        out=("data/prepared", "folder for the prepared splits"))
    args = parser.parse_args(argv)

    def body(params, tracker) -> int:
        # the job's modules load once params and tracking store are checked (torch, Ray: seconds)
        from pipeline.data.datasets import prepare_dataset

        summary = prepare_dataset(params.data, args.out, seed=params.data.seed)
        c, h, w = summary["image_shape"]
        print(f"prepared {summary['dataset']}: {summary['train']} train + {summary['test']} "
              f"test images of {c}x{h}x{w} -> {summary['out_dir']}")
        return 0

    return _common.run(body, args.params, tracking=True)


if __name__ == "__main__":
    raise SystemExit(main())
