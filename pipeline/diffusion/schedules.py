"""Variance schedules beta_1..beta_T of the forward process q(x_t | x_{t-1}) (Ho et al. 2020, Eq. 2).

Pure functions, float64. Each schedule is a small function in `SCHEDULES`, keyed by the name
params.yaml uses (`diffusion.schedule`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# Ho et al. 2020 Sec. 4: betas from 1e-4 to 0.02, linear, T = 1000.
PAPER_BETA_START = 1e-4
PAPER_BETA_END = 0.02
PAPER_NUM_TIMESTEPS = 1000
MAX_BETA = 0.999  # as Nichol & Dhariwal clip the cosine schedule


def _paper_range(num_timesteps: int, beta_start: Optional[float], beta_end: Optional[float]):
    """Default beta range: the paper's (1e-4, 0.02) scaled by 1000 / T.

    At T = 1000 this is exactly the paper's range; for smaller T the scaling keeps the product
    of (1 - beta_t), hence the prior mismatch L_T, about the same (improved-diffusion's rule).
    Scaled values are capped at MAX_BETA (T < 21 would otherwise reach beta = 1, alpha_bar = 0).
    """
    scale = PAPER_NUM_TIMESTEPS / num_timesteps
    start = min(PAPER_BETA_START * scale, MAX_BETA) if beta_start is None else beta_start
    end = min(PAPER_BETA_END * scale, MAX_BETA) if beta_end is None else beta_end
    return start, end


def linear(num_timesteps: int, beta_start: Optional[float] = None,
           beta_end: Optional[float] = None) -> torch.Tensor:
    """Linearly increasing betas (Ho et al. 2020 Sec. 4)."""
    start, end = _paper_range(num_timesteps, beta_start, beta_end)
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def quadratic(num_timesteps: int, beta_start: Optional[float] = None,
              beta_end: Optional[float] = None) -> torch.Tensor:
    """Betas linear in sqrt(beta) (the official DDPM code's 'quad' schedule)."""
    start, end = _paper_range(num_timesteps, beta_start, beta_end)
    return torch.linspace(math.sqrt(start), math.sqrt(end), num_timesteps,
                          dtype=torch.float64) ** 2


def sigmoid(num_timesteps: int, beta_start: Optional[float] = None,
            beta_end: Optional[float] = None) -> torch.Tensor:
    """Betas on a sigmoid from beta_start to beta_end over [-6, 6] (the official DDPM code)."""
    start, end = _paper_range(num_timesteps, beta_start, beta_end)
    x = torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (end - start) + start


def constant(num_timesteps: int, beta_start: Optional[float] = None,
             beta_end: Optional[float] = None) -> torch.Tensor:
    """All betas equal to beta_end."""
    _, end = _paper_range(num_timesteps, beta_start, beta_end)
    return torch.full((num_timesteps,), end, dtype=torch.float64)


def jsd(num_timesteps: int, beta_start: Optional[float] = None,
        beta_end: Optional[float] = None) -> torch.Tensor:
    """beta_t = 1 / (T - t + 1): 1/T, 1/(T-1), ..., 1 (Sohl-Dickstein et al. 2015).

    The last beta (1) is clipped to 0.999, as in the cosine schedule, so that alpha_bar_T > 0
    and x_0 stays recoverable from (x_t, eps) at every step.
    """
    return (1.0 / torch.linspace(num_timesteps, 1, num_timesteps, dtype=torch.float64)).clamp(
        max=0.999)


def cosine(num_timesteps: int, beta_start: Optional[float] = None,
           beta_end: Optional[float] = None, s: float = 0.008,
           max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17), betas clipped at 0.999.

    alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2);
    beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), max_beta).
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear,
    "cosine": cosine,
    "quadratic": quadratic,
    "sigmoid": sigmoid,
    "constant": constant,
    "jsd": jsd,
}


def beta_schedule(name: str, num_timesteps: int, **kwargs) -> torch.Tensor:
    """The betas of schedule `name` for T = num_timesteps steps: float64 tensor of shape (T,)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    betas = SCHEDULES[name](num_timesteps, **kwargs)
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(f"schedule '{name}' produced betas outside (0, 1]: "
                         f"min {betas.min().item():.3g}, max {betas.max().item():.3g}")
    return betas


def schedule_from_config(diffusion_cfg) -> torch.Tensor:
    """The betas for a `pipeline.core.config.DiffusionConfig`."""
    kwargs = {}
    if diffusion_cfg.beta_start is not None:
        kwargs["beta_start"] = diffusion_cfg.beta_start
    if diffusion_cfg.beta_end is not None:
        kwargs["beta_end"] = diffusion_cfg.beta_end
    return beta_schedule(diffusion_cfg.schedule, diffusion_cfg.num_timesteps, **kwargs)
