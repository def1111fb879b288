"""Cost of the NLL bound: the exact T-term bound against the stratified K-timestep estimator.

Both through `pipeline.measure.nll.nll_bpd` (the evaluate stage's function) on the digits test
split, with the default study's model (params.yaml, `--experiment`): `exact` evaluates every
one of the T bound terms per image, `stratified` one random timestep in each of K strata
(`GaussianDiffusion.nll_bpd_stratified`, an unbiased estimate of the same bound). The table
gives images/s, the speed-up over exact, the mean bits/dim and its standard error over images
(for the stratified estimator this includes the noise of its timestep draws).

The model is freshly initialised (its output layer starts at zero, so the bound is that of the
paper's "untrained model" row) unless `--model-dir` names a trained `models/<E>/` folder; the
cost per image does not depend on the weights, the standard errors do.

    nice -n 19 python benchmarks/nll_cost.py --num-images 100 --strata 10,25,50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import _common as common  # puts this checkout first on sys.path


def test_images(exp, seed: int) -> torch.Tensor:
    """The digits test split (uint8 N x 1 x 8 x 8), prepared in a temporary folder."""
    from pipeline.data.datasets import load_prepared, prepare_dataset, prepared_path

    with tempfile.TemporaryDirectory(prefix="nll-cost-") as tmp:
        prepare_dataset(exp.data, tmp, seed)
        images = load_prepared(prepared_path(tmp, exp.data.dataset, "test")).images
    return torch.from_numpy(images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="eps_simple",
                   help="params.yaml experiment (default: %(default)s)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a trained models/<E>/ folder to load EMA weights from (default: none, "
                        "fresh weights)")
    p.add_argument("--num-images", type=int, default=100,
                   help="test images (default: 100, evaluate.nll_num_images' default)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="(image, timestep) pairs per network call (default: evaluate.nll_batch_size)")
    p.add_argument("--strata", default="10,25,50",
                   help="comma-separated K values of the stratified estimator "
                        "(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="timed calls of each method, alternating (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.check_pipeline_is_this_checkout()

    from pipeline.data.datasets import DIGITS_LEVELS
    from pipeline.diffusion.gaussian import GaussianDiffusion
    from pipeline.measure.nll import nll_bpd
    from pipeline.model.unet import build_model

    exp, image_shape = common.load_experiment("digits", args.experiment)
    batch = args.batch_size or exp.evaluate.nll_batch_size
    strata = [int(k) for k in args.strata.split(",") if k]
    diffusion = GaussianDiffusion.from_config(exp.diffusion, data_levels=DIGITS_LEVELS)
    if args.model_dir is not None:
        from pipeline.artifacts.models import load_model

        model = load_model(exp, args.model_dir)
    else:
        torch.manual_seed(args.seed)
        model = build_model(exp, image_shape).eval()
    images = test_images(exp, exp.data.seed)[:args.num_images]
    n = len(images)

    info = common.machine()
    print(f"machine: {common.describe(info)}")
    print(f"digits ({exp.name}): T = {diffusion.num_timesteps}, {n} test images, batch {batch}, "
          f"model {'from ' + str(args.model_dir) if args.model_dir else 'freshly initialised'}")

    outputs: dict[str, dict] = {}

    def case(method: str, k: int = 0):
        name = "exact" if method == "exact" else f"stratified K={k}"

        def run():
            outputs[name] = nll_bpd(model, diffusion, images, method=method, num_strata=k,
                                    batch_size=batch, seed=args.seed)
        return name, run

    cases = dict([case("exact")] + [case("stratified", k) for k in strata])
    seconds = common.alternate(cases, rounds=args.rounds, warmup=0)

    exact = common.summary(seconds["exact"], n)
    rows, results = [], {"num_timesteps": diffusion.num_timesteps, "num_images": n,
                         "batch_size": batch, "trained_model": str(args.model_dir or ""),
                         "cases": {}}
    for name, secs in seconds.items():
        s = common.summary(secs, n)
        k = diffusion.num_timesteps if name == "exact" else int(name.split("=")[1])
        s.update(outputs[name], terms_per_image=k,
                 speedup_over_exact=exact["median_s"] / s["median_s"],
                 diff_from_exact_bpd=outputs[name]["nll_bpd"] - outputs["exact"]["nll_bpd"])
        results["cases"][name] = s
        rows.append({"method": name, "terms/image": k, "images/s": s["per_s"],
                     "speed-up": s["speedup_over_exact"], "bpd": s["nll_bpd"],
                     "stderr": s["nll_bpd_se"], "minus exact": s["diff_from_exact_bpd"]})
    print()
    print(common.table(rows, ["method", "terms/image", "images/s", "speed-up", "bpd", "stderr",
                              "minus exact"]))
    common.write_json(args.json, "nll_cost", args, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
