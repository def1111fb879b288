"""Samplers of the reverse process: ancestral sampling (Algorithm 2 of Ho et al. 2020) and
strided DDIM (Song et al. 2021), each (diffusion, model, x_T, *, generator, callback, progress,
<its options>) -> x_0, in `SAMPLERS` under the names of their declarations
(`pipeline.core.sampler_specs`: what `sample.sampler` takes, and which options of `sample` each
is called with); `sample` draws x_T and runs one."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pipeline.core.progress import progress_bar
from pipeline.diffusion.gaussian import GaussianDiffusion, Model
from pipeline.diffusion.seeding import Generator, randn

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def sample(d: GaussianDiffusion, model: Model, shape, generator: Optional[Generator] = None, *,
           sampler: str = "ancestral", device=None, **kwargs) -> torch.Tensor:
    """Draw x_0 with `sampler` (default: ancestral sampling, Algorithm 2) from x_T ~ N(0, I)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of: {', '.join(SAMPLERS)}")
    x_T = randn(shape, generator, device)
    return SAMPLERS[sampler](d, model, x_T, generator=generator, **kwargs)


@torch.inference_mode()
def sample_ancestral(d: GaussianDiffusion, model: Model, x_T: torch.Tensor, *,
                     generator: Optional[torch.Generator] = None,
                     callback: Optional[Callback] = None, progress: bool = False,
                     clip_denoised: Optional[bool] = None) -> torch.Tensor:
    """Algorithm 2: for t = T..1, x_{t-1} = mu_theta(x_t, t) + sigma_t z (no noise at t = 1).

    callback(step, t, x_t, pred_x0) is called after every step (for progressive figures).
    """
    x = x_T
    batch = x.shape[0]
    for step, t_index in enumerate(progress_bar(range(d.num_timesteps - 1, -1, -1),
                                                total=d.num_timesteps, desc="sampling",
                                                enabled=progress)):
        t = torch.full((batch,), t_index, dtype=torch.long, device=x.device)
        p = d.p_mean_variance(model, x, t, clip_denoised)
        if t_index > 0:
            z = randn(x.shape, generator, x.device, x.dtype)
            x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
        else:
            x = p["mean"]
        if callback is not None:
            callback(step, t_index, x, p["pred_x0"])
    return x


@torch.inference_mode()
def sample_ddim(d: GaussianDiffusion, model: Model, x_T: torch.Tensor, *,
                steps: Optional[int] = None, eta: float = 0.0,
                generator: Optional[torch.Generator] = None,
                callback: Optional[Callback] = None, progress: bool = False,
                clip_denoised: Optional[bool] = None) -> torch.Tensor:
    """Strided DDIM sampling (Song et al. 2021, Eq. 12) over `steps` evenly spaced timesteps.

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - alpha_bar_s)/(1 - alpha_bar_t)) sqrt(1 - alpha_bar_t/alpha_bar_s).
    eta = 0 is deterministic; eta = 1 with all T steps is ancestral sampling with beta-tilde.
    """
    steps = d.num_timesteps if steps is None else steps
    if not 1 <= steps <= d.num_timesteps:
        raise ValueError(f"steps must be in 1..{d.num_timesteps}, got {steps}")
    timesteps = torch.linspace(d.num_timesteps - 1, 0, steps).round().long().unique_consecutive()
    x = x_T
    batch = x.shape[0]
    clip = d.clip_denoised if clip_denoised is None else clip_denoised
    ab = d.alphas_cumprod
    for step, t_index in enumerate(progress_bar(timesteps.tolist(), total=len(timesteps),
                                                desc=f"sampling (ddim {steps})", enabled=progress)):
        t = torch.full((batch,), t_index, dtype=torch.long, device=x.device)
        p = d.p_mean_variance(model, x, t, clip)
        pred_x0 = p["pred_x0"]
        eps = d.eps_from_x0(x, t, pred_x0)
        ab_t = float(ab[t_index])
        ab_s = float(ab[timesteps[step + 1]]) if step + 1 < len(timesteps) else 1.0
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * pred_x0 + math.sqrt(max(1 - ab_s - sigma ** 2, 0.0)) * eps
        if sigma > 0 and step + 1 < len(timesteps):
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback(step, t_index, x, pred_x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
}
