"""The Gaussian diffusion of Ho, Jain & Abbeel 2020: forward process, reverse process, losses
and the variational bound in bits/dim. Its samplers are in `pipeline.diffusion.samplers`, the
timestep samplers of training in `pipeline.diffusion.timesteps`, the densities of the bound in
`pipeline.diffusion.likelihood`.

Timestep index `t` runs over 0..T-1; index 0 is the paper's t = 1. Data live in [-1, 1].
Constants are computed once in float64 and cast to the input's dtype and device when gathered.

Variants are small functions in tables keyed by the names params.yaml uses:
- `MEAN_TYPES`: what the network predicts (eps, x0, mu = the paper's "mu-tilde prediction");
- `VAR_TYPES`: the reverse-process variance (fixed_large, fixed_small, learned, learned_range);
- `LOSSES`: the objective (simple, vlb = the paper's "L", hybrid);
- `WEIGHTINGS`: per-timestep weights of the simple loss (uniform, vlb, p2, min_snr).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from pipeline.core.config import LEARNED_VAR_TYPES
from pipeline.core.progress import progress_bar
from pipeline.diffusion.likelihood import LN2, discretized_gaussian_log_likelihood, normal_kl
from pipeline.diffusion.schedules import schedule_from_config
from pipeline.diffusion.seeding import TermGenerators, rand, randn, term_generator

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to `x` until it has `target_ndim` dims (for broadcasting)."""
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_ndim is {target_ndim}")
    return x[(...,) + (None,) * missing]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


NLL_METHODS = ("exact", "stratified")


# --------------------------------------------------------------------------------------------
# Mean parameterizations: what the network's first C channels predict
# --------------------------------------------------------------------------------------------


def _x0_from_eps(d: "GaussianDiffusion", out, x_t, t):
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (Ho et al. Eq. 4 inverted)."""
    return d.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - \
        d.coef("sqrt_recipm1_alphas_cumprod", t, x_t) * out


def _x0_from_x0(d: "GaussianDiffusion", out, x_t, t):
    return out


def _x0_from_mu(d: "GaussianDiffusion", out, x_t, t):
    """Invert the posterior mean (Eq. 7): x_0 = (mu - coef2 x_t) / coef1."""
    return (out - d.coef("posterior_mean_coef2", t, x_t) * x_t) / \
        d.coef("posterior_mean_coef1", t, x_t)


@dataclass(frozen=True)
class MeanType:
    """How to read x_0 from the network output, and the simple loss's regression target."""

    pred_x0: Callable[..., torch.Tensor]
    target: Callable[..., torch.Tensor]  # (diffusion, x0, x_t, t, noise) -> target
    outputs_mean: bool  # True: the network output is the reverse-process mean itself


MEAN_TYPES: dict[str, MeanType] = {
    "eps": MeanType(_x0_from_eps, lambda d, x0, x_t, t, noise: noise, outputs_mean=False),
    "x0": MeanType(_x0_from_x0, lambda d, x0, x_t, t, noise: x0, outputs_mean=False),
    "mu": MeanType(_x0_from_mu, lambda d, x0, x_t, t, noise: d.q_posterior(x0, x_t, t)[0],
                   outputs_mean=True),
}


# --------------------------------------------------------------------------------------------
# Variance types: (diffusion, raw variance output or None, x_t, t) -> (variance, log_variance)
# --------------------------------------------------------------------------------------------


def _var_fixed_large(d: "GaussianDiffusion", v, x_t, t):
    """sigma_t^2 = beta_t (the paper's "fixed isotropic Sigma", upper bound), with beta-tilde_2
    at t = 1 so that the decoder's variance is not the (tiny) beta_1 (as improved-diffusion)."""
    return d.coef("fixed_large_variance", t, x_t), d.coef("fixed_large_log_variance", t, x_t)


def _var_fixed_small(d: "GaussianDiffusion", v, x_t, t):
    """sigma_t^2 = beta-tilde_t, the posterior variance (Eq. 7), log clipped at t = 1."""
    return d.coef("posterior_variance", t, x_t), d.coef("posterior_log_variance_clipped", t, x_t)


def _var_learned(d: "GaussianDiffusion", v, x_t, t):
    """The network outputs log sigma_t^2 directly (the paper's "learned diagonal Sigma")."""
    return torch.exp(v), v


def _var_learned_range(d: "GaussianDiffusion", v, x_t, t):
    """log sigma^2 = f log beta_t + (1 - f) log beta-tilde_t, f = (v + 1) / 2
    (Nichol & Dhariwal 2021, Eq. 15)."""
    min_log = d.coef("posterior_log_variance_clipped", t, x_t)
    max_log = d.coef("log_betas", t, x_t)
    frac = (v + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    return torch.exp(log_variance), log_variance


VAR_TYPES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "fixed_large": _var_fixed_large,
    "fixed_small": _var_fixed_small,
    "learned": _var_learned,
    "learned_range": _var_learned_range,
}


# --------------------------------------------------------------------------------------------
# Weightings of the simple loss: (diffusion) -> float64 weights of shape (T,), in the space of
# the network's target. p2 and min_snr are defined on the eps-MSE and converted.
# --------------------------------------------------------------------------------------------


def _eps_mse_per_target_mse(d: "GaussianDiffusion") -> torch.Tensor:
    """||eps - eps_hat||^2 / ||target - target_hat||^2 for the diffusion's mean type:
    1 for eps, SNR_t for x0 (eps error = -sqrt(SNR) x0 error), SNR_t / coef1^2 for mu."""
    return {"eps": torch.ones_like(d.snr), "x0": d.snr,
            "mu": d.snr / d.posterior_mean_coef1 ** 2}[d.mean_type]


def _weight_uniform(d: "GaussianDiffusion") -> torch.Tensor:
    """L_simple: every timestep weighs 1 (Ho et al. Eq. 14)."""
    return torch.ones(d.num_timesteps, dtype=torch.float64)


def _weight_vlb(d: "GaussianDiffusion") -> torch.Tensor:
    """The lambda_t that turns the MSE into the true bound term L_{t-1} (Eq. 12 for eps):
    (d mu / d target)^2 / (2 sigma_t^2), normalized to mean 1 over t."""
    dmean_dtarget = {
        "eps": d.betas / (torch.sqrt(d.alphas) * d.sqrt_one_minus_alphas_cumprod),
        "x0": d.posterior_mean_coef1,
        "mu": torch.ones_like(d.betas),
    }[d.mean_type]
    variance = d.posterior_variance_clipped if d.var_type == "fixed_small" else \
        d.fixed_large_variance
    weights = dmean_dtarget ** 2 / (2.0 * variance)
    return weights / weights.mean()


def _weight_p2(d: "GaussianDiffusion") -> torch.Tensor:
    """P2 weighting (Choi et al. 2022): lambda_t = 1 / (k + SNR_t)^gamma on the eps-MSE."""
    return _eps_mse_per_target_mse(d) / (d.p2_k + d.snr) ** d.p2_gamma


def _weight_min_snr(d: "GaussianDiffusion") -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR_t, gamma) on the x0-MSE."""
    return _eps_mse_per_target_mse(d) * torch.clamp(d.snr, max=d.min_snr_gamma) / d.snr


WEIGHTINGS: dict[str, Callable[["GaussianDiffusion"], torch.Tensor]] = {
    "uniform": _weight_uniform,
    "vlb": _weight_vlb,
    "p2": _weight_p2,
    "min_snr": _weight_min_snr,
}


# --------------------------------------------------------------------------------------------
# Losses: (diffusion, model output, x0, x_t, t, noise) -> dict with "loss" of shape (B,)
# --------------------------------------------------------------------------------------------


def _loss_simple(d: "GaussianDiffusion", out, x0, x_t, t, noise) -> dict[str, torch.Tensor]:
    """Weighted MSE between the network's mean output and its target (Ho et al. Eq. 14)."""
    mean_out, _ = d.split_output(out)
    target = MEAN_TYPES[d.mean_type].target(d, x0, x_t, t, noise)
    mse = mean_flat((target - mean_out) ** 2)
    loss = d.coef("loss_weights", t, mse) * mse
    return {"loss": loss, "mse": mse}


def _loss_vlb(d: "GaussianDiffusion", out, x0, x_t, t, noise) -> dict[str, torch.Tensor]:
    """The bound term L_{t-1} (decoder NLL at t = 0), in bits/dim: the paper's "L"."""
    vb = d.vb_terms_from_output(out, x0, x_t, t, clip_denoised=False)
    return {"loss": vb, "vb": vb}


def _loss_hybrid(d: "GaussianDiffusion", out, x0, x_t, t, noise) -> dict[str, torch.Tensor]:
    """L_simple + lambda L_vlb (Nichol & Dhariwal 2021 Sec. 3.1): the bound term trains only the
    variance (stop-gradient on the mean). L_vlb = T * E_t[L_t] in bits/dim."""
    terms = _loss_simple(d, out, x0, x_t, t, noise)
    if d.learns_variance:
        mean_out, var_out = d.split_output(out)
        frozen = torch.cat([mean_out.detach(), var_out], dim=1)
        vb = d.vb_terms_from_output(frozen, x0, x_t, t, clip_denoised=False)
        terms["vb"] = vb
        terms["loss"] = terms["loss"] + d.hybrid_lambda * d.num_timesteps * vb
    return terms


LOSSES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "simple": _loss_simple,
    "vlb": _loss_vlb,
    "hybrid": _loss_hybrid,
}


# --------------------------------------------------------------------------------------------
# The diffusion
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """The forward process q and the reverse process p_theta of Ho et al. 2020, Sec. 2-3."""

    def __init__(self, betas: torch.Tensor, mean_type: str = "eps",
                 var_type: str = "fixed_large", loss_type: str = "simple",
                 weighting: str = "uniform", *, hybrid_lambda: float = 0.001,
                 p2_k: float = 1.0, p2_gamma: float = 1.0, min_snr_gamma: float = 5.0,
                 clip_denoised: bool = True, data_levels: int = 256):
        for value, table, what in ((mean_type, MEAN_TYPES, "mean_type"),
                                   (var_type, VAR_TYPES, "var_type"),
                                   (loss_type, LOSSES, "loss_type"),
                                   (weighting, WEIGHTINGS, "weighting")):
            if value not in table:
                raise ValueError(f"unknown {what} '{value}'; choose one of: {', '.join(table)}")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.mean_type, self.var_type = mean_type, var_type
        self.loss_type, self.weighting = loss_type, weighting
        self.hybrid_lambda, self.p2_k, self.p2_gamma = hybrid_lambda, p2_k, p2_gamma
        self.min_snr_gamma, self.clip_denoised = min_snr_gamma, clip_denoised
        if not 2 <= data_levels <= 256:
            raise ValueError(f"data_levels must be in 2..256, got {data_levels}")
        self.data_levels = int(data_levels)  # the decoder's bins: one per level of the data
        self.num_timesteps = int(betas.shape[0])

        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (Eq. 4)
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t I)   (Eqs. 6-7)
        self.posterior_variance = (betas * (1.0 - self.alphas_cumprod_prev)
                                   / (1.0 - self.alphas_cumprod))
        # beta-tilde_1 = 0: clip the log at the next value (also the decoder's variance)
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        self.posterior_variance_clipped = torch.cat([first, self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = torch.log(self.posterior_variance_clipped)
        self.posterior_mean_coef1 = (betas * torch.sqrt(self.alphas_cumprod_prev)
                                     / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * torch.sqrt(self.alphas)
                                     / (1.0 - self.alphas_cumprod))
        self.fixed_large_variance = torch.cat([first, betas[1:]])
        self.fixed_large_log_variance = torch.log(self.fixed_large_variance)
        self.loss_weights = WEIGHTINGS[weighting](self)
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(cls, diffusion_cfg, data_levels: int = 256) -> "GaussianDiffusion":
        """Build from a `pipeline.core.config.DiffusionConfig`, for data with `data_levels`
        levels."""
        c = diffusion_cfg
        return cls(schedule_from_config(c), c.mean_type, c.var_type, c.loss, c.weighting,
                   hybrid_lambda=c.hybrid_lambda, p2_k=c.p2_k, p2_gamma=c.p2_gamma,
                   min_snr_gamma=c.min_snr_gamma, clip_denoised=c.clip_denoised,
                   data_levels=data_levels)

    # -- gathering constants ------------------------------------------------------------------

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Constant `name` at timesteps t, cast to like's dtype/device, broadcastable to `like`."""
        key = (name, like.device, like.dtype)
        table = self._cache.get(key)
        if table is None:
            with torch.inference_mode(False):  # a cached table must also serve autograd later
                table = getattr(self, name).to(device=like.device, dtype=like.dtype)
            self._cache[key] = table
        return append_dims(table[t.to(like.device)], like.ndim)

    @property
    def learns_variance(self) -> bool:
        return self.var_type in LEARNED_VAR_TYPES

    def output_channels(self, data_channels: int) -> int:
        """Channels the network must output: C, or 2C where the variance is learned."""
        return 2 * data_channels if self.learns_variance else data_channels

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean part, variance part or None) of the network output (channels on dim 1)."""
        if self.learns_variance:
            return torch.chunk(out, 2, dim=1)
        return out, None

    # -- forward process ----------------------------------------------------------------------

    def q_mean_variance(self, x0, t):
        """Mean, variance, log variance of q(x_t | x_0)   (Eq. 4)."""
        mean = self.coef("sqrt_alphas_cumprod", t, x0) * x0
        variance = 1.0 - self.coef("alphas_cumprod", t, x0)
        return mean, variance, torch.log(variance)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 4)."""
        return self.coef("sqrt_alphas_cumprod", t, x0) * x0 + \
            self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)   (Eqs. 6-7)."""
        mean = self.coef("posterior_mean_coef1", t, x_t) * x0 + \
            self.coef("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self.coef("posterior_variance", t, x_t),
                self.coef("posterior_log_variance_clipped", t, x_t))

    # -- reverse process ----------------------------------------------------------------------

    def p_mean_variance(self, model: Model, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: Optional[bool] = None,
                        model_output: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Mean and variance of p_theta(x_{t-1} | x_t)   (Eq. 1), plus the predicted x_0.

        With clip_denoised the predicted x_0 is clipped to [-1, 1] before it forms the mean
        (eps and x0 types); a mu-predicting network's mean is used as is.
        """
        out = model(x_t, t) if model_output is None else model_output
        return self.p_from_output(out, x_t, t,
                                  self.clip_denoised if clip_denoised is None else clip_denoised)

    def p_from_output(self, out, x_t, t, clip_denoised: bool) -> dict[str, torch.Tensor]:
        mean_out, var_out = self.split_output(out)
        variance, log_variance = VAR_TYPES[self.var_type](self, var_out, x_t, t)
        variance = variance.expand_as(x_t) if variance.shape != x_t.shape else variance
        log_variance = log_variance.expand_as(x_t) if log_variance.shape != x_t.shape \
            else log_variance
        kind = MEAN_TYPES[self.mean_type]
        pred_x0 = kind.pred_x0(self, mean_out, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = mean_out if kind.outputs_mean else self.q_posterior(pred_x0, x_t, t)[0]
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_x0": pred_x0, "model_output": out}

    def eps_from_x0(self, x_t, t, pred_x0):
        """eps implied by x_t and a prediction of x_0 (Eq. 4 solved for eps)."""
        return (self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_x0) / \
            self.coef("sqrt_recipm1_alphas_cumprod", t, x_t)

    # -- objectives ---------------------------------------------------------------------------

    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor,
                        noise: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """The training objective at x_t ~ q(x_t | x_0) (Algorithm 1): dict with `loss` (B,)."""
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t)
        return LOSSES[self.loss_type](self, out, x0, x_t, t, noise)

    def vb_terms_from_output(self, out, x0, x_t, t, clip_denoised: bool) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL
        -log p(x_0|x_1) at t = 0 (Eq. 5), in bits/dim, shape (B,)."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        p = self.p_from_output(out, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / LN2
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * p["log_variance"], self.data_levels)) / LN2
        return torch.where(t == 0, nll, kl)

    def vb_terms_bpd(self, model: Model, x0, x_t, t,
                     clip_denoised: Optional[bool] = None) -> torch.Tensor:
        """Bits/dim of L_{t-1} (the decoder NLL at t = 0) for each image, shape (B,)."""
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        return self.vb_terms_from_output(model(x_t, t), x0, x_t, t, clip)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (B,).

        Computed in float64: the terms are ~1e-10 and cancel catastrophically in float32.
        """
        x64 = x0.double()
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, log_variance = self.q_mean_variance(x64, t)
        zeros = torch.zeros_like(x64)
        kl = normal_kl(mean, log_variance.expand_as(x64), zeros, zeros)
        return (mean_flat(kl) / LN2).to(x0.dtype)

    def _vb_terms_stacked(self, model: Model, x0: torch.Tensor, ts: list[torch.Tensor],
                          noises: list[torch.Tensor], clip_denoised: Optional[bool]):
        """L_{t-1} of `x0` at each of len(ts) timestep draws (t: (B,), noise: like x0), the draws
        stacked along the batch into one network call; the terms in order, each of shape (B,)."""
        xs = x0.repeat(len(ts), *([1] * (x0.ndim - 1)))
        t, noise = torch.cat(ts), torch.cat(noises)
        return list(self.vb_terms_bpd(model, xs, self.q_sample(xs, t, noise), t,
                                      clip_denoised).view(len(ts), x0.shape[0]))

    def num_bound_terms(self, method: str, num_strata: int) -> int:
        """How many terms `method` sums per image: T (exact) or K strata (stratified)."""
        if method not in NLL_METHODS:
            raise ValueError(f"unknown NLL method '{method}'; choose one of: "
                             f"{', '.join(NLL_METHODS)}")
        return self.num_timesteps if method == "exact" else min(num_strata, self.num_timesteps)

    @torch.inference_mode()
    def nll_bpd(self, model: Model, x0: torch.Tensor, generator: TermGenerators = None,
                clip_denoised: Optional[bool] = None, progress: bool = False,
                terms_per_call: int = 1, terms: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The full variational bound L = L_T + sum_t L_{t-1} (Eq. 5) per image, in bits/dim,
        float64, shape (B,).

        One fresh x_t ~ q(x_t | x_0) per term, every timestep evaluated (t = T-1 down to 0).
        Term t draws its noise from `generator`, or from `generator(t)` where it is a function
        of the term (per-term streams: `pipeline.diffusion.seeding`). With `terms` (timesteps), only
        those terms are summed and not L_T: a part of the bound, for work split over workers.
        The terms are evaluated `terms_per_call` timesteps at a time (one network call on
        B x that many inputs); the draws and the sum run in the same order whatever it is.
        """
        order = list(range(self.num_timesteps - 1, -1, -1)) if terms is None else list(terms)
        total = self.prior_bpd(x0.double()) if terms is None else \
            torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        calls = [order[i:i + terms_per_call] for i in range(0, len(order), terms_per_call)]
        for call in progress_bar(calls, total=len(calls), desc="nll (exact)", enabled=progress):
            ts, noises = [], []
            for t_index in call:
                ts.append(torch.full((x0.shape[0],), t_index, dtype=torch.long, device=x0.device))
                noises.append(randn(x0.shape, term_generator(generator, t_index), x0.device,
                                    x0.dtype))
            for term in self._vb_terms_stacked(model, x0, ts, noises, clip_denoised):
                total = total + term.double()
        return total

    @torch.inference_mode()
    def nll_bpd_stratified(self, model: Model, x0: torch.Tensor, num_strata: int,
                           generator: TermGenerators = None,
                           clip_denoised: Optional[bool] = None, terms_per_call: int = 1,
                           strata: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Unbiased estimate of `nll_bpd` from `num_strata` timesteps per image, float64,
        shape (B,).

        0..T-1 is cut into K contiguous strata of sizes n_k; one t_k is drawn uniformly in each
        (independently per image) and L ~= L_T + sum_k n_k L_{t_k - 1}. Its expectation over the
        draws is the exact bound; `summarize_nll` gives the mean and its standard error.
        Stratum k draws t_k, then its noise, from `generator` or `generator(k)`; with `strata`,
        only those strata are summed and not L_T, as `terms` in `nll_bpd`. `terms_per_call`
        strata share one network call.
        """
        num_strata = self.num_bound_terms("stratified", num_strata)
        edges = torch.linspace(0, self.num_timesteps, num_strata + 1).round().long()
        batch = x0.shape[0]
        order = list(range(num_strata)) if strata is None else list(strata)
        total = self.prior_bpd(x0.double()) if strata is None else \
            torch.zeros(batch, dtype=torch.float64, device=x0.device)
        for first in range(0, len(order), terms_per_call):
            ts, noises, sizes = [], [], []
            for k in order[first:first + terms_per_call]:
                lo, hi = int(edges[k]), int(edges[k + 1])
                stream = term_generator(generator, k)
                u = rand((batch,), stream, x0.device)
                ts.append(lo + (u * (hi - lo)).long().clamp(max=hi - lo - 1))
                noises.append(randn(x0.shape, stream, x0.device, x0.dtype))
                sizes.append(hi - lo)
            for size, term in zip(sizes, self._vb_terms_stacked(model, x0, ts, noises,
                                                                 clip_denoised)):
                total = total + size * term.double()
        return total
