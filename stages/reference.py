"""Stage `reference`: the reference rows of Table 1, measured by the same code as every model.

    python -m stages.reference [--params params.yaml]

- real data: FID / KID of the prepared test split against the train split, IS of the test split;
- untrained model: the base `diffusion` / `model` sections with freshly initialized weights
  (seeded), sampled and scored like a trained experiment, with its NLL bound.
Writes metrics/reference.json and samples/reference/untrained_grid.png.
"""

from __future__ import annotations

from pathlib import Path

from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("reference", "Score real data and an untrained model (Table 1's "
                       "reference rows).")
    p.add_argument("--data", default="data/prepared", type=Path,
                   help="prepared data folder (default: %(default)s)")
    p.add_argument("--models", default="models", type=Path,
                   help="folder holding models/classifier/ (default: %(default)s)")
    p.add_argument("--out", default="metrics/reference.json", type=Path,
                   help="output file (default: %(default)s)")
    p.add_argument("--figures", default="samples/reference", type=Path,
                   help="folder for the untrained model's sample grid (default: %(default)s)")
    args = p.parse_args(argv)

    def body(params) -> int:
        import torch

        from pipeline import metrics
        from pipeline.data import load_prepared, prepared_path
        from pipeline.diffusion import GaussianDiffusion
        from pipeline.figures import save_sample_grid
        from pipeline.io import write_json
        from pipeline.sampling import generate
        from pipeline.training import build_model

        exp = params.base_experiment("untrained")
        tracker = _common.tracker_for(params)
        dataset = exp.data.dataset
        train_images, _ = load_prepared(prepared_path(args.data, dataset, "train"))
        test_images, _ = load_prepared(prepared_path(args.data, dataset, "test"))
        extractor, weights = metrics.study_extractor(
            dataset, exp.evaluate.inception_weights, args.models / "classifier" / "classifier.pt",
            exp.evaluate.feature_extractor)
        score = dict(extractor=extractor, weights_path=weights, is_splits=exp.evaluate.is_splits,
                     kid_subset_size=exp.evaluate.kid_subset_size, download=exp.data.download)
        real = metrics.compute_fidelity(test_images, train_images, **score)
        print(f"real data (test split): FID {real['fid']:.3f}, IS {real['is_mean']:.3f}")

        torch.manual_seed(exp.study.seed)
        model = build_model(exp, tuple(train_images.shape[1:])).eval()
        # the DDPM U-Net starts with a zero output layer: perturb it so the untrained row shows
        # what random weights do, not a network that predicts exactly zero
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.abs().sum() == 0:
                    parameter.normal_(0.0, 0.02)
        diffusion = GaussianDiffusion.from_config(exp.diffusion)
        run = generate(model, diffusion, exp, tuple(train_images.shape[1:]),
                       seed=exp.study.seed + 1)
        untrained = metrics.compute_fidelity(run.images, train_images, **score)
        n = exp.evaluate.nll_num_images
        for split, images in (("", test_images), ("_train", train_images)):
            nll = metrics.nll_bpd(model, diffusion, images[:n], method=exp.evaluate.nll,
                                  num_strata=exp.evaluate.nll_strata,
                                  batch_size=exp.evaluate.nll_batch_size, seed=exp.study.seed + 2)
            untrained[f"nll_bpd{split}"] = nll["nll_bpd"]
            untrained[f"nll_bpd{split}_stderr"] = nll["nll_bpd_stderr"]
        print(f"untrained model: FID {untrained['fid']:.3f}, IS {untrained['is_mean']:.3f}, "
              f"NLL {untrained['nll_bpd']:.3f} bits/dim")
        g = exp.sample.grid_size
        save_sample_grid(run.images[: g * g], args.figures / "untrained_grid.png", nrow=g)
        write_json(args.out, {"dataset": dataset, "real_data": real, "untrained": untrained})
        run_id = tracker.study_run()
        tracker.log_metrics(run_id, {f"real_{k}": v for k, v in real.items()})
        tracker.log_metrics(run_id, {f"untrained_{k}": v for k, v in untrained.items()})
        tracker.log_artifact(run_id, args.out, "metrics")
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
