"""The training recipe, measured: the held-out NLL bound of the raw and the EMA weights over
training, and a quick FID at the end, for each row of the study under recipe variants.

    python benchmarks/recipe.py --steps 800 --eval-every 200 \
        --variant constant:lr_schedule=constant --variant cosine:lr_schedule=cosine \
        --json results/bench/recipe.json

Each (variant, experiment) trains in this process with the train stage's per-worker function
(`pipeline.training.loop.train_worker`, no Ray) on the digits train split, prepared in a
temporary
folder. Every `--eval-every` steps it measures the stratified NLL bound (bits/dim, the 17-level
decoder) of the first `--nll-images` test images under the raw weights and under the EMA, with
the same seed at every evaluation and in every run (common random numbers); at the end, the FID
of `--fid-samples` ancestral samples of each against the train split (the digits classifier's
features). A variant overrides keys of the `train` section (`key=value,key=value`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402  (after _common put this checkout on sys.path)

import _common as common


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, {key: value}) with YAML-typed values."""
    import yaml

    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


class Probe:
    """`on_log` hook: NLL of the raw and EMA weights at every log step, FID at the end."""

    def __init__(self, test_images, train_images, diffusion_levels, args, extractor, weights):
        self.test, self.train = test_images, train_images
        self.levels, self.args = diffusion_levels, args
        self.extractor, self.weights = extractor, weights
        self.rows: list[dict] = []

    def __call__(self, step: int, objects: dict) -> dict:
        from pipeline.measure.nll import nll_bpd

        row = {"step": step}
        for which in ("model", "ema"):
            net = objects[which].eval()
            nll = nll_bpd(net, objects["diffusion"], self.test[:self.args.nll_images],
                          method="stratified", num_strata=self.args.nll_strata, seed=2)
            row[f"nll_{which}"] = nll["nll_bpd"]
            row[f"nll_{which}_stderr"] = nll["nll_bpd_se"]
            if step == self.args.steps and self.args.fid_samples:
                row[f"fid_{which}"] = self.fid(net, objects["diffusion"])
            objects[which].train()
        self.rows.append(row)
        return {}

    def fid(self, net, diffusion) -> float:
        from pipeline.data.datasets import to_uint8
        from pipeline.diffusion.samplers import sample
        from pipeline.diffusion.seeding import item_generators
        from pipeline.measure.extractors import fidelity_of

        generators = item_generators("sample", 1, range(self.args.fid_samples))
        x = sample(diffusion, net, (self.args.fid_samples, *self.train.shape[1:]), generators)
        samples = to_uint8(x.clamp(-1, 1), diffusion.data_levels)
        return fidelity_of(samples, self.train, extractor=self.extractor,
                           weights_path=self.weights)["fid"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default="mu_vlb_learned,mu_vlb_fixed,mu_simple,"
                   "eps_vlb_learned,eps_vlb_fixed,eps_simple",
                   help="params.yaml experiments (default: the six Table 2 rows)")
    p.add_argument("--variant", action="append", default=[],
                   help="name:key=value,... overriding the train section (repeatable; "
                        "default: one variant with params.yaml as it is)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--nll-images", type=int, default=100)
    p.add_argument("--nll-strata", type=int, default=50)
    p.add_argument("--fid-samples", type=int, default=200)
    p.add_argument("--classifier-steps", type=int, default=None,
                   help="training steps of the digits classifier (default: params.yaml's)")
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    args = p.parse_args(argv)

    from pipeline.training.loop import LocalSession, train_worker
    from pipeline.core.params import load_params
    from pipeline.data.datasets import load_prepared, prepare_dataset, prepared_path
    from pipeline.measure.digits_classifier import save_classifier, train_digits_classifier
    from pipeline.measure.extractors import DIGITS_EXTRACTOR

    common.set_threads(args.threads)
    params = load_params(common.REPO_ROOT / "params.yaml")
    variants = [parse_variant(v) for v in args.variant] or [("as-is", {})]
    info = common.machine()
    print(f"machine: {common.describe(info)}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
        tmp = Path(tmp)
        prepare_dataset(params.data, tmp / "data", params.data.seed)
        train_path = prepared_path(tmp / "data", "digits", "train")
        train = load_prepared(train_path)
        test = load_prepared(prepared_path(tmp / "data", "digits", "test"))
        classifier = tmp / "classifier.pt"
        steps = args.classifier_steps or params.evaluate.classifier_steps
        save_classifier(train_digits_classifier(train.images, train.labels, steps=steps,
                                                seed=params.data.seed), classifier)

        for name, overrides in variants:
            for experiment in args.experiments.split(","):
                exp = params.experiment(experiment)
                train_cfg = dataclasses.replace(exp.train, steps=args.steps,
                                                log_every=args.eval_every,
                                                checkpoint_every=args.steps, **overrides)
                train_cfg.validate("train")
                exp = dataclasses.replace(exp, train=train_cfg, seed=args.seed)
                probe = Probe(torch.from_numpy(test.images), torch.from_numpy(train.images),
                              train.levels, args, DIGITS_EXTRACTOR, str(classifier))
                root = tmp / "runs" / name / experiment
                start = time.monotonic()
                train_worker(exp, train_path, LocalSession(root), checkpoint_root=root,
                             on_log=probe)
                wall = time.monotonic() - start
                for row in probe.rows:
                    results.append({"variant": name, "experiment": experiment, **row,
                                    "wall_s": wall})
                last = probe.rows[-1]
                print(f"{name} {experiment}: NLL raw {last['nll_model']:.3f} / EMA "
                      f"{last['nll_ema']:.3f} bits/dim, FID raw {last.get('fid_model', 0):.1f}"
                      f" / EMA {last.get('fid_ema', 0):.1f} ({wall:.0f}s)", flush=True)
    print(common.table(results, ["variant", "experiment", "step", "nll_model", "nll_ema",
                                 "fid_model", "fid_ema", "wall_s"]))
    common.write_json(args.json, "recipe", args, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
