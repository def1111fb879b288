"""Sampling throughput (images/s) of our samplers against Hugging Face diffusers' pipelines.

Two samplers, each ours vs diffusers on the same architecture (eval mode, fresh weights; the
cost of a step does not depend on the weights):

- ancestral (Algorithm 2): ours `pipeline.diffusion.samplers.sample(..., sampler="ancestral")` vs
  diffusers' `DDPMPipeline` (DDPMScheduler, fixed_large variance, clipped x0). A 1000-step chain
  takes minutes per image on a CPU, so both run a short chain of `--ancestral-steps` steps
  (T = that many timesteps; every step costs the same whatever T is). The table reports seconds
  per step and per image, and the images/s this extrapolates to for the configuration's full
  chain (the paper's T = 1000 for cifar10, params.yaml's T for digits).
- DDIM (Song et al. 2021), `--ddim-steps` (default 50) strided steps of the T = 1000 chain,
  eta = 0: ours `sampler="ddim"` vs diffusers' `DDIMPipeline` (DDIMScheduler).

Ours and diffusers alternate over `--rounds` rounds after one warm-up call each; the table gives
medians and the median of the per-round throughput ratios (ours / diffusers).

`--precisions fp32,bf16` also times both in mixed precision: ours with `sample.precision: bf16`
(pipeline.model.precision), diffusers' pipelines called under `torch.autocast(bfloat16)`.

    nice -n 19 python benchmarks/sampling_throughput.py --batch-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import _common as common  # puts this checkout first on sys.path


def make_cases(exp, image_shape, batch: int, ancestral_steps: int, ddim_steps: int,
               with_diffusers: bool, seed: int = 0, precisions=("fp32",)):
    """{sampler: {case: fn}} of closures drawing one batch each, a case per implementation and
    precision (`common.case_name`); and the models."""
    from pipeline.diffusion.gaussian import GaussianDiffusion
    from pipeline.diffusion.samplers import sample
    from pipeline.diffusion.schedules import schedule_from_config
    from pipeline.model.precision import with_precision
    from pipeline.model.unet import build_model

    torch.manual_seed(seed)
    ours = build_model(exp, tuple(image_shape)).eval()
    shape = (batch, *image_shape)
    short = dataclasses.replace(exp.diffusion, num_timesteps=ancestral_steps)
    diffusion_short = GaussianDiffusion.from_config(short)
    diffusion_full = GaussianDiffusion.from_config(exp.diffusion)
    gen = torch.Generator().manual_seed(seed)

    cases = {"ancestral": {}, "ddim": {}}
    for p in precisions:
        net = with_precision(ours, p)
        name = common.case_name("ours", p, precisions)
        cases["ancestral"][name] = lambda net=net: sample(
            diffusion_short, net, shape, gen, sampler="ancestral")
        cases["ddim"][name] = lambda net=net: sample(
            diffusion_full, net, shape, gen, sampler="ddim", steps=ddim_steps, eta=0.0)
    models = {"ours": ours}
    if with_diffusers:
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

        theirs = common.diffusers_unet(exp.model, image_shape).eval()
        models["diffusers"] = theirs
        clip = exp.diffusion.clip_denoised
        ddpm = DDPMPipeline(unet=theirs, scheduler=DDPMScheduler(
            num_train_timesteps=ancestral_steps,
            trained_betas=schedule_from_config(short).numpy(),
            variance_type="fixed_large", clip_sample=clip))
        ddim = DDIMPipeline(unet=theirs, scheduler=DDIMScheduler(
            num_train_timesteps=exp.diffusion.num_timesteps,
            trained_betas=schedule_from_config(exp.diffusion).numpy(), clip_sample=clip))
        for pipe in (ddpm, ddim):
            pipe.set_progress_bar_config(disable=True)
        for p in precisions:
            name = common.case_name("diffusers", p, precisions)

            def ancestral(p=p):
                with common.autocast(p):
                    return ddpm(batch_size=batch, generator=gen,
                                num_inference_steps=ancestral_steps, output_type="np")

            def strided(p=p):
                with common.autocast(p):
                    return ddim(batch_size=batch, generator=gen, num_inference_steps=ddim_steps,
                                eta=0.0, output_type="np")

            cases["ancestral"][name], cases["ddim"][name] = ancestral, strided
    return cases, models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=common.CONFIGS, default="cifar10",
                   help="cifar10: the paper's model, ours vs diffusers; digits: the default "
                        "study's model, ours alone (default: %(default)s)")
    p.add_argument("--experiment", default="eps_simple",
                   help="params.yaml experiment (mean / variance type) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per call (default: 16)")
    p.add_argument("--ancestral-steps", type=int, default=10,
                   help="length T of the short ancestral chain (default: 10)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    p.add_argument("--samplers", default="ancestral,ddim",
                   help="comma-separated subset of ancestral,ddim (default: %(default)s)")
    p.add_argument("--no-diffusers", action="store_true", help="time ours only")
    common.add_precision_arg(p)
    common.add_common_args(p)
    args = p.parse_args(argv)
    precisions = common.parse_precisions(p, args.precisions)
    common.set_threads(args.threads)
    common.check_pipeline_is_this_checkout()

    exp, image_shape = common.load_experiment(args.config, args.experiment)
    with_diffusers = args.config == "cifar10" and not args.no_diffusers
    kind = (exp.diffusion.mean_type, exp.diffusion.var_type)
    if with_diffusers and kind != ("eps", "fixed_large"):
        raise SystemExit("error: the diffusers pipelines sample an eps model with fixed_large "
                         "variance; use --experiment eps_simple or --no-diffusers")
    samplers = [s for s in args.samplers.split(",") if s]
    if not samplers or not set(samplers) <= {"ancestral", "ddim"}:
        p.error(f"--samplers: choose from ancestral,ddim, got '{args.samplers}'")
    cases, models = make_cases(exp, image_shape, args.batch_size, args.ancestral_steps,
                               args.ddim_steps, with_diffusers, precisions=precisions)
    if with_diffusers and common.count_parameters(models["ours"]) != \
            common.count_parameters(models["diffusers"]):
        raise SystemExit("error: the diffusers model's parameter count differs from ours")

    info = common.machine()
    print(f"machine: {common.describe(info)}")
    print(f"config {args.config} ({exp.name}): image {'x'.join(map(str, image_shape))}, "
          f"{common.count_parameters(models['ours']) / 1e6:.2f}M parameters, batch "
          f"{args.batch_size}, ancestral chain of {args.ancestral_steps} steps, DDIM "
          f"{args.ddim_steps} steps of T = {exp.diffusion.num_timesteps}, {args.rounds} rounds, "
          f"precisions {', '.join(precisions)}")

    results = {"config": args.config, "experiment": exp.name, "image_shape": list(image_shape),
               "batch_size": args.batch_size, "rounds": args.rounds, "precisions": precisions,
               "samplers": {}}
    full = exp.diffusion.num_timesteps  # the ancestral chain's real length (1000 for cifar10)
    rows, ratios = [], []
    for sampler in samplers:
        steps = args.ancestral_steps if sampler == "ancestral" else args.ddim_steps
        print(f"{sampler}:", flush=True)
        seconds = common.alternate(cases[sampler], rounds=args.rounds, warmup=1)
        entry = {"steps": steps, "cases": {}}
        for name, secs in seconds.items():
            s = common.summary(secs, args.batch_size)
            per_step = s["median_s"] / steps
            s["s_per_step"] = per_step
            s["s_per_step_per_image"] = per_step / args.batch_size
            if sampler == "ancestral":
                s["full_chain_steps"] = full
                s["images_per_s_full_chain"] = args.batch_size / (per_step * full)
                s["s_per_image_full_chain"] = per_step * full / args.batch_size
            entry["cases"][name] = s
            rows.append({"sampler": sampler, "case": name, "steps": steps,
                         "s/step (median)": per_step,
                         "ms/step/image": 1e3 * per_step / args.batch_size,
                         "images/s (as run)": s["per_s"],
                         f"images/s at {full} steps": s.get("images_per_s_full_chain"),
                         f"s/image at {full} steps": s.get("s_per_image_full_chain")})
        entry["ratios"] = common.precision_ratios(seconds, precisions)
        for label, ratio in entry["ratios"].items():
            ratios.append(f"{sampler}: throughput ratio {label} {ratio['median']:.3f} "
                          f"(median of {args.rounds} rounds; range {ratio['min']:.3f}.."
                          f"{ratio['max']:.3f})")
        results["samplers"][sampler] = entry
    print()
    print(common.table(rows, ["sampler", "case", "steps", "s/step (median)", "ms/step/image",
                              "images/s (as run)", f"images/s at {full} steps",
                              f"s/image at {full} steps"]))
    if "ancestral" in samplers:
        print(f"(ancestral ran a T = {args.ancestral_steps} chain; the {full}-step columns "
              f"extrapolate its per-step time to the configuration's T = {full})")
    for line in ratios:
        print(line)
    common.write_json(args.json, "sampling_throughput", args, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
