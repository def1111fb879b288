"""Model FLOPs per image and the fraction of this machine's fp32 matmul peak we achieve.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention, 2 FLOPs per multiply-add; elementwise work such as GroupNorm, SiLU or Adam is not
counted) for one forward pass of the U-Net and for one training step (forward and backward of
`GaussianDiffusion.training_losses`), divided by the batch size. The diffusers UNet2DModel of
the same architecture is counted too, as a cross-check (`--config cifar10`).

The peak is measured in the same process: the best rate of a large fp32 `torch.matmul`
(`--matmul-size`, 2 n^3 FLOPs), before and after the model timings. A 3x3 convolution of the
model's commonest shape is timed too, as a second reference (oneDNN's convolutions can beat the
BLAS matmul, so a fraction of the matmul peak above 1 is possible). The achieved rate is
FLOPs per image x images/s of the forward pass (inference mode, eval) and of the full training
step (`train_throughput.py`'s step, Adam and EMA included), at `--batch-size`.

    nice -n 19 python benchmarks/flops.py --configs cifar10,digits
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import our_train_step

import _common as common  # puts this checkout first on sys.path

# FlopCounterMode has no formula for the fused CPU attention kernel that diffusers' 4-D
# (batch, heads, tokens, dim) attention dispatches to
# (aten._scaled_dot_product_flash_attention_for_cpu), so the attention products (4 N^2 C per
# block) are missing from diffusers' count. Ours calls SDPA on 3-D tensors, which runs (and is
# counted) as two bmm.
DIFFUSERS_NOTE = "its fused CPU attention kernel is not counted"


def matmul_peak(n: int, repeats: int) -> dict[str, float]:
    """Best and median GFLOP/s of an n x n fp32 matmul over `repeats` timed calls (1 warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)
    rates = [2 * n ** 3 / common.timed(lambda: torch.matmul(a, b, out=out)) / 1e9
             for _ in range(repeats)]
    return {"n": n, "best_gflops": max(rates), "median_gflops": statistics.median(rates),
            "gflops": rates}


def conv_reference(repeats: int) -> dict[str, float]:
    """Best and median GFLOP/s of the U-Net's commonest convolution: 3x3, 128 -> 128 channels
    at 32x32, batch 16 (oneDNN). On CPUs where the BLAS behind torch.matmul is not the fastest
    kernel (e.g. MKL on AMD), this exceeds the matmul "peak" and explains fractions above 1."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, 32, 32, generator=gen)
    w = torch.randn(128, 128, 3, 3, generator=gen)
    flops = 2 * 16 * 128 * 128 * 9 * 32 * 32
    F.conv2d(x, w, padding=1)
    rates = [flops / common.timed(lambda: F.conv2d(x, w, padding=1)) / 1e9
             for _ in range(repeats)]
    return {"best_gflops": max(rates), "median_gflops": statistics.median(rates),
            "gflops": rates}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_flops(exp, image_shape, batch: int) -> dict[str, float]:
    """FLOPs per image: our forward, our training step (fwd + bwd), diffusers' forward."""
    from pipeline.data.datasets import to_model_range
    from pipeline.diffusion.gaussian import GaussianDiffusion
    from pipeline.model.unet import build_model

    torch.manual_seed(0)
    model = build_model(exp, tuple(image_shape))
    diffusion = GaussianDiffusion.from_config(exp.diffusion)
    x0 = to_model_range(common.random_images(batch, image_shape))
    t = torch.randint(0, diffusion.num_timesteps, (batch,))
    out = {}
    with torch.inference_mode():
        out["forward"] = count_flops(lambda: model(x0, t)) / batch

    def train():
        diffusion.training_losses(model, x0, t)["loss"].mean().backward()

    out["train_step"] = count_flops(train) / batch
    try:
        theirs = common.diffusers_unet(exp.model, image_shape)
    except (ImportError, ValueError):
        return out
    with torch.inference_mode():
        out["diffusers_forward"] = count_flops(lambda: theirs(x0, t).sample) / batch
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="cifar10,digits",
                   help="comma-separated configs to measure (default: %(default)s)")
    p.add_argument("--experiment", default="eps_simple",
                   help="params.yaml experiment (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per call (default: 16 for cifar10, train.batch_size for digits)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed calls of the forward pass and of the train step (default: 3)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the peak matmul")
    p.add_argument("--matmul-repeats", type=int, default=5)
    common.add_common_args(p)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.check_pipeline_is_this_checkout()
    configs = [c for c in args.configs.split(",") if c]
    if not configs or not set(configs) <= set(common.CONFIGS):
        p.error(f"--configs: choose from {','.join(common.CONFIGS)}, got '{args.configs}'")

    info = common.machine()
    print(f"machine: {common.describe(info)}")
    peak_before = matmul_peak(args.matmul_size, args.matmul_repeats)
    print(f"fp32 matmul peak ({args.matmul_size}^3, {torch.get_num_threads()} threads): "
          f"{peak_before['best_gflops']:.1f} GFLOP/s best, "
          f"{peak_before['median_gflops']:.1f} median", flush=True)

    from pipeline.data.datasets import to_model_range
    from pipeline.model.unet import build_model

    results = {"configs": {}, "note": DIFFUSERS_NOTE}
    measured = []
    for config in configs:
        exp, image_shape = common.load_experiment(config, args.experiment)
        batch = args.batch_size or (16 if config == "cifar10" else exp.train.batch_size)
        flops = model_flops(exp, image_shape, batch)

        torch.manual_seed(0)
        model = build_model(exp, tuple(image_shape)).eval()
        x0 = to_model_range(common.random_images(batch, image_shape))
        t = torch.randint(0, exp.diffusion.num_timesteps, (batch,))

        def forward():
            with torch.inference_mode():
                model(x0, t)

        step, _ = our_train_step(exp, image_shape, batch)
        seconds = common.alternate({"forward": forward, "train_step": step}, rounds=args.steps,
                                   warmup=1)
        entry = {"batch_size": batch, "image_shape": list(image_shape),
                 "parameters": common.count_parameters(model), "flops_per_image": flops,
                 "cases": {}}
        for name, secs in seconds.items():
            s = common.summary(secs, batch)
            s["achieved_gflops"] = flops[name] * s["per_s"] / 1e9
            entry["cases"][name] = s
            measured.append((config, name, flops[name], s))
        results["configs"][config] = entry

    peak_after = matmul_peak(args.matmul_size, args.matmul_repeats)
    peak = max(peak_before["best_gflops"], peak_after["best_gflops"])
    results["matmul_peak"] = {"before": peak_before, "after": peak_after, "peak_gflops": peak,
                              "threads": torch.get_num_threads()}
    conv = conv_reference(args.matmul_repeats)
    results["conv_reference"] = conv
    rows = []
    for config, name, flops_per_image, s in measured:
        s["fraction_of_peak"] = s["achieved_gflops"] / peak
        s["fraction_of_conv_reference"] = s["achieved_gflops"] / conv["best_gflops"]
        rows.append({"config": config, "pass": name, "batch": s["items_per_call"],
                     "GFLOP/image": flops_per_image / 1e9, "images/s": s["per_s"],
                     "achieved GFLOP/s": s["achieved_gflops"],
                     "fraction of peak": s["fraction_of_peak"],
                     "fraction of conv ref": s["fraction_of_conv_reference"]})
    print()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s (best of before {peak_before['best_gflops']:.1f} "
          f"and after {peak_after['best_gflops']:.1f}); reference 3x3 conv (128 ch, 32x32, "
          f"batch 16): {conv['best_gflops']:.1f} GFLOP/s")
    print(common.table(rows, ["config", "pass", "batch", "GFLOP/image", "images/s",
                              "achieved GFLOP/s", "fraction of peak", "fraction of conv ref"]))
    for config in configs:
        f = results["configs"][config]["flops_per_image"]
        if "diffusers_forward" in f:
            print(f"{config}: diffusers UNet2DModel forward {f['diffusers_forward'] / 1e9:.3f} "
                  f"GFLOP/image vs ours {f['forward'] / 1e9:.3f} ({DIFFUSERS_NOTE})")
    common.write_json(args.json, "flops", args, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
