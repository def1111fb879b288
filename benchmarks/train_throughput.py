"""Training throughput (images/s) of our train step against Hugging Face diffusers.

Ours: one step of `pipeline.training.loop.train_worker`'s loop (Algorithm 1) in one process,
built from the pipeline's own pieces: `build_model` (pipeline.model.unet U-Net), the timestep sampler,
`GaussianDiffusion.training_losses`, backward, gradient clipping, Adam with its warmup
schedule (`make_optimizer`) and the EMA update (`make_ema`).

Theirs (`--config cifar10` only): diffusers' `UNet2DModel` with the same architecture (the
google/ddpm-cifar10-32 configuration, same parameter count, same dropout) and `DDPMScheduler`
for the forward process, as in diffusers' `train_unconditional.py`: t ~ U{0..T-1},
x_t = scheduler.add_noise(x0, eps, t), loss = MSE(unet(x_t, t).sample, eps). The optimizer,
warmup schedule, clipping and EMA are the very same objects as ours, so the comparison isolates
the model and the loss.

Both run on the same fixed batch of random images (throughput does not depend on pixel
values), alternating ours / theirs over `--rounds` rounds of `--steps` steps each after a
warm-up; the table gives median images/s and the median of the per-round ratios.

`--precisions fp32,bf16` also times both in mixed precision: ours with `train.precision: bf16`
(pipeline.model.precision), diffusers' U-Net forward under `torch.autocast(bfloat16)` as
accelerate's
`mixed_precision="bf16"` runs it; the ratios are then ours / diffusers at each precision and
ours bf16 / diffusers fp32.

    nice -n 19 python benchmarks/train_throughput.py --config cifar10 --batch-size 16
    python benchmarks/train_throughput.py --config cifar10 --precisions fp32,bf16
    nice -n 19 python benchmarks/train_throughput.py --config digits
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import _common as common  # puts this checkout first on sys.path


def our_train_step(exp, image_shape, batch_size: int, seed: int = 0, precision: str = "fp32",
                   device: str | torch.device = "cpu", channels_last: bool = False,
                   compile_backend: str | None = None):
    """A closure running one training step of ours at `precision` (the U-Net wrapped as
    train_worker wraps it for train.precision); and the model (for its size).

    On `device`; with `channels_last`, the weights and the batch in that layout (as train_worker
    puts them on a GPU); with `compile_backend`, the wrapped U-Net through `torch.compile` (as
    train.compile does). TF32 (`tf32`) is a process setting: run the step under
    `pipeline.model.precision.matmul_precision`."""
    from pipeline.training.loop import make_optimizer, seed_generators, train_step
    from pipeline.data.datasets import to_model_range
    from pipeline.diffusion.gaussian import GaussianDiffusion
    from pipeline.diffusion.timesteps import timestep_sampler
    from pipeline.model.ema import make_ema
    from pipeline.model.precision import with_precision
    from pipeline.model.unet import build_model

    torch.manual_seed(seed)
    device = torch.device(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    diffusion = GaussianDiffusion.from_config(exp.diffusion)
    model = build_model(exp, tuple(image_shape)).to(device, memory_format=layout)
    ema = make_ema(model, exp.train.ema_decay)
    optimizer, scheduler = make_optimizer(model, exp)
    gens = seed_generators(seed, 0, device)
    t_sampler = timestep_sampler(exp.diffusion, diffusion.num_timesteps)
    x0 = to_model_range(common.random_images(batch_size, image_shape, seed)).to(device)
    x0 = x0.contiguous(memory_format=layout)
    model.train()
    train_model = with_precision(model, precision)
    if compile_backend is not None:
        train_model = torch.compile(train_model, backend=compile_backend)

    def step() -> None:  # train_worker's step, without its data loading and logging
        train_step(train_model, model, diffusion, x0, t_sampler, gens, optimizer, scheduler, ema,
                   exp.train.grad_clip)

    return step, model


def diffusers_train_step(exp, image_shape, batch_size: int, seed: int = 0,
                         precision: str = "fp32", device: str | torch.device = "cpu"):
    """A closure running one training step with diffusers' UNet2DModel + DDPMScheduler on
    `device`, the U-Net's forward under torch.autocast for bf16 (as accelerate's mixed
    precision runs it)."""
    from diffusers import DDPMScheduler

    from pipeline.training.loop import apply_gradients, make_optimizer
    from pipeline.data.datasets import to_model_range
    from pipeline.diffusion.schedules import schedule_from_config
    from pipeline.model.ema import make_ema

    if exp.diffusion.mean_type != "eps" or exp.diffusion.loss != "simple" or \
            exp.diffusion.weighting != "uniform":
        raise SystemExit("error: the diffusers step is the eps-prediction L_simple objective; "
                         "use --experiment eps_simple")
    torch.manual_seed(seed)
    device = torch.device(device)
    model = common.diffusers_unet(exp.model, image_shape).to(device)
    betas = schedule_from_config(exp.diffusion)
    noise_scheduler = DDPMScheduler(num_train_timesteps=len(betas),
                                    trained_betas=betas.numpy(), variance_type="fixed_large")
    ema = make_ema(model, exp.train.ema_decay)
    optimizer, scheduler = make_optimizer(model, exp)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x0 = to_model_range(common.random_images(batch_size, image_shape, seed)).to(device)
    model.train()

    def step() -> None:
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                          generator=gen, device=device)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        with common.autocast(precision, device.type):
            out = model(x_t, t).sample
        loss = F.mse_loss(out.float(), noise)
        apply_gradients(loss, model, optimizer, scheduler, ema, exp.train.grad_clip)

    return step, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=common.CONFIGS, default="cifar10",
                   help="cifar10: the paper's 35.7M model, ours vs diffusers; digits: the "
                        "default study's model from params.yaml, ours alone (default: %(default)s)")
    p.add_argument("--experiment", default="eps_simple",
                   help="params.yaml experiment whose objective is trained (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: 16 for cifar10, train.batch_size for digits)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (default: 5)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps of each before the rounds (default: 2)")
    p.add_argument("--no-diffusers", action="store_true", help="time ours only")
    common.add_precision_arg(p)
    common.add_common_args(p)
    args = p.parse_args(argv)
    precisions = common.parse_precisions(p, args.precisions)
    common.set_threads(args.threads)
    common.check_pipeline_is_this_checkout()

    exp, image_shape = common.load_experiment(args.config, args.experiment)
    batch = args.batch_size or (16 if args.config == "cifar10" else exp.train.batch_size)
    args.batch_size = batch
    with_diffusers = args.config == "cifar10" and not args.no_diffusers

    cases, models = {}, {}
    for precision in precisions:
        step, models["ours"] = our_train_step(exp, image_shape, batch, precision=precision)
        cases[common.case_name("ours", precision, precisions)] = step
        if with_diffusers:
            step, models["diffusers"] = diffusers_train_step(exp, image_shape, batch,
                                                             precision=precision)
            cases[common.case_name("diffusers", precision, precisions)] = step
    if with_diffusers:
        if common.count_parameters(models["ours"]) != common.count_parameters(models["diffusers"]):
            raise SystemExit("error: the diffusers model's parameter count differs from ours")

    info = common.machine()
    print(f"machine: {common.describe(info)}")
    size = common.count_parameters(models["ours"]) / 1e6
    print(f"config {args.config} ({exp.name}): image {'x'.join(map(str, image_shape))}, "
          f"T = {exp.diffusion.num_timesteps}, {size:.2f}M parameters, batch {batch}, "
          f"{args.steps} steps x {args.rounds} rounds, precisions {', '.join(precisions)}")

    def run_steps(fn):
        return lambda: [fn() for _ in range(args.steps)]

    for fn in cases.values():  # warm-up: allocator, oneDNN kernels, Adam state
        for _ in range(args.warmup):
            fn()
    seconds = common.alternate({name: run_steps(fn) for name, fn in cases.items()},
                               rounds=args.rounds, warmup=0)
    results = {"config": args.config, "experiment": exp.name, "image_shape": list(image_shape),
               "num_timesteps": exp.diffusion.num_timesteps, "batch_size": batch,
               "precisions": precisions,
               "steps_per_round": args.steps, "rounds": args.rounds,
               "parameters": {k: common.count_parameters(m) for k, m in models.items()},
               "cases": {}}
    rows = []
    for name, secs in seconds.items():
        s = common.summary(secs, args.steps * batch)
        results["cases"][name] = s
        rows.append({"case": name, "images/s (median)": s["per_s"],
                     "s/step (median)": s["median_s"] / args.steps,
                     "s/step (min)": s["min_s"] / args.steps,
                     "s/step (max)": s["max_s"] / args.steps})
    print()
    print(common.table(rows, ["case", "images/s (median)", "s/step (median)", "s/step (min)",
                              "s/step (max)"]))
    if with_diffusers:
        results["ratios"] = common.precision_ratios(seconds, precisions)
        print()
        for label, ratio in results["ratios"].items():
            print(f"throughput ratio {label}: {ratio['median']:.3f} (median of "
                  f"{args.rounds} rounds; range {ratio['min']:.3f}..{ratio['max']:.3f})")
    common.write_json(args.json, "train_throughput", args, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
