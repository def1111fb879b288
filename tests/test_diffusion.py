"""The Gaussian diffusion against independent closed forms (Ho et al. 2020, Sec. 2-3)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.core.params import load_params
from pipeline.diffusion.gaussian import LOSSES, MEAN_TYPES, VAR_TYPES, GaussianDiffusion
from pipeline.diffusion.likelihood import (discretized_gaussian_log_likelihood, normal_kl,
                                           summarize_nll)
from pipeline.diffusion.samplers import SAMPLERS, sample
from pipeline.diffusion.timesteps import LossSecondMomentTimesteps
from pipeline.diffusion.schedules import beta_schedule

LINEAR_1000 = beta_schedule("linear", 1000)


def diffusion(**kw):
    return GaussianDiffusion(kw.pop("betas", LINEAR_1000), **kw)


# --------------------------------------------------------------------------------------------
# Forward process and posterior
# --------------------------------------------------------------------------------------------


def test_q_posterior_is_the_product_of_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), both Gaussian: combine precisions."""
    d = diffusion()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    x_t = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(1, 1000, (64,), generator=gen)
    betas = LINEAR_1000.numpy()
    ab = np.cumprod(1 - betas)
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    for i in range(64):
        ti = int(t[i])
        prior_mean = math.sqrt(ab[ti - 1]) * x0[i].numpy()  # q(x_{t-1} | x_0)
        prior_var = 1 - ab[ti - 1]
        a, b = math.sqrt(1 - betas[ti]), betas[ti]  # q(x_t | x_{t-1}) = N(a x_{t-1}, b)
        precision = 1 / prior_var + a * a / b
        expected_mean = (prior_mean / prior_var + a * x_t[i].numpy() / b) / precision
        np.testing.assert_allclose(mean[i].numpy(), expected_mean, rtol=1e-9, atol=1e-12)
        assert var[i].item() == pytest.approx(1 / precision, rel=1e-9)
        assert log_var[i].item() == pytest.approx(math.log(1 / precision), rel=1e-9)
    # at the paper's t = 1 the posterior is a point mass at x_0
    t0 = torch.zeros(64, dtype=torch.long)
    mean0, var0, _ = d.q_posterior(x0, x_t, t0)
    torch.testing.assert_close(mean0, x0)
    assert bool((var0 == 0).all())


def test_q_sample_moments():
    d = diffusion()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    t = torch.full((200_000,), 300, dtype=torch.long)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    ab = float(torch.cumprod(1 - LINEAR_1000, 0)[300])
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5 * math.sqrt(1 / 2e5))
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.02)


# --------------------------------------------------------------------------------------------
# KL, decoder likelihood, prior
# --------------------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 1000, generator=gen, dtype=torch.float64) * 2
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
        torch.distributions.Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discretized_likelihood_sums_to_one(dtype, levels):
    """The decoder's probabilities over the data's levels (256 for 8-bit data, 17 for digits)
    sum to 1, whatever the mean and scale."""
    centres = torch.linspace(-1, 1, levels, dtype=torch.float64)
    half = 1 / (levels - 1)
    gen = torch.Generator().manual_seed(3)
    means = torch.cat([torch.rand(60, generator=gen, dtype=torch.float64) * 2.4 - 1.2,
                       torch.tensor([-1.0, 1.0, -1.0 + half, 1.0 - half, 0.0],
                                    dtype=torch.float64)])
    log_scales = torch.cat([torch.rand(60, generator=gen, dtype=torch.float64) * 8 - 7,
                            torch.tensor([-9.0, -9.0, -5.0, 0.5, -12.0], dtype=torch.float64)])
    x = centres[:, None].expand(levels, len(means))
    ll = discretized_gaussian_log_likelihood(x.to(dtype), means.to(dtype)[None],
                                             log_scales.to(dtype)[None], num_levels=levels)
    total = torch.exp(ll.double()).sum(dim=0)
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(total, torch.ones_like(total), atol=tol, rtol=0)


def test_seventeen_level_decoder_against_scipy():
    """Digits' decoder: bins of width 2/16 around each of the 17 levels, the end bins open."""
    for x, mean, scale in ((0.0, 0.1, 0.3), (0.5, 0.45, 0.02), (-1.0, -0.9, 0.1),
                           (1.0, 0.7, 0.2), (0.25, -0.1, 0.1)):
        lo, hi = (x - 1 / 16 - mean) / scale, (x + 1 / 16 - mean) / scale
        expected = (stats.norm.logcdf(hi) if x <= -1 else stats.norm.logsf(lo) if x >= 1
                    else math.log(stats.norm.cdf(hi) - stats.norm.cdf(lo)))
        got = discretized_gaussian_log_likelihood(
            torch.tensor([x], dtype=torch.float64), torch.tensor([mean], dtype=torch.float64),
            torch.tensor([math.log(scale)], dtype=torch.float64), num_levels=17).item()
        assert got == pytest.approx(expected, rel=1e-6), (x, mean, scale)


def test_discretized_likelihood_matches_scipy_including_far_tails():
    cases = [  # (x, mean, scale)
        (0.0, 0.1, 0.3), (0.5, 0.5, 1e-3), (-1.0, 0.2, 0.5), (1.0, -0.3, 0.2),
        (0.6, 0.0, 0.01),  # 60 standard deviations above the mean
        (-0.6, 0.0, 0.01),  # and below
        (1.0, 0.0, 0.02),  # the top bin, 50 sigma out
    ]
    for x, mean, scale in cases:
        lo, hi = (x - 1 / 255 - mean) / scale, (x + 1 / 255 - mean) / scale
        if x <= -1:
            expected = stats.norm.logcdf(hi)
        elif x >= 1:
            expected = stats.norm.logsf(lo)
        elif lo > 0:  # both in the upper tail: difference of survival functions
            expected = stats.norm.logsf(lo) + math.log1p(-math.exp(
                stats.norm.logsf(hi) - stats.norm.logsf(lo)))
        else:
            expected = stats.norm.logcdf(hi) + math.log1p(-math.exp(
                stats.norm.logcdf(lo) - stats.norm.logcdf(hi)))
        got = discretized_gaussian_log_likelihood(
            torch.tensor([x], dtype=torch.float64), torch.tensor([mean], dtype=torch.float64),
            torch.tensor([math.log(scale)], dtype=torch.float64)).item()
        assert math.isfinite(got)
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), (x, mean, scale)


def test_prior_bpd_closed_form():
    d = diffusion()
    assert d.prior_bpd(torch.zeros(4, 1, 2, 2)).tolist() == pytest.approx([5.87e-10] * 4, rel=2e-3)
    for sign in (1.0, -1.0):
        bpd = d.prior_bpd(torch.full((3, 1, 2, 2), sign))
        assert bpd.tolist() == pytest.approx([2.911e-5] * 3, rel=1e-3)


# --------------------------------------------------------------------------------------------
# 1-D Gaussian data with the exact optimal predictor
# --------------------------------------------------------------------------------------------

DATA_MEAN, DATA_STD = 0.3, 0.2


def optimal_eps_model(d, data_mean=DATA_MEAN, data_std=DATA_STD):
    """E[eps | x_t] for x_0 ~ N(m, s^2): x_t = a x_0 + b eps, so
    E[eps | x_t] = b (x_t - a m) / (a^2 s^2 + b^2)."""
    ab = torch.cumprod(1 - d.betas, 0)

    def model(x_t, t):
        a = torch.sqrt(ab[t]).to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        b = torch.sqrt(1 - ab[t]).to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        return b * (x_t - a * data_mean) / (a * a * data_std ** 2 + b * b)

    return model


def test_ancestral_sampler_recovers_the_data_distribution():
    d = diffusion(var_type="fixed_large", clip_denoised=False)
    gen = torch.Generator().manual_seed(4)
    x = sample(d, optimal_eps_model(d), (20_000, 1), generator=gen)
    assert abs(x.mean().item() - DATA_MEAN) < 0.006
    assert x.std().item() == pytest.approx(DATA_STD, rel=0.02)


def test_ddim_sampler_recovers_the_data_distribution():
    d = diffusion(clip_denoised=False)
    gen = torch.Generator().manual_seed(5)
    x = sample(d, optimal_eps_model(d), (20_000, 1), generator=gen, sampler="ddim", steps=1000,
               eta=0.0)
    assert abs(x.mean().item() - DATA_MEAN) < 0.006
    assert x.std().item() == pytest.approx(DATA_STD, rel=0.03)


def test_ddim_is_deterministic_and_strided():
    d = diffusion(clip_denoised=False)
    model = optimal_eps_model(d)
    calls = []
    x_T = torch.randn(1000, 1, generator=torch.Generator().manual_seed(6))
    out = SAMPLERS["ddim"](d, model, x_T, steps=50, eta=0.0,
                           callback=lambda step, t, x, x0: calls.append(t))
    again = SAMPLERS["ddim"](d, model, x_T, steps=50, eta=0.0)
    assert torch.equal(out, again) and len(calls) == 50 and calls[0] == 999 and calls[-1] == 0
    # For Gaussian data each DDIM step (eta = 0) is affine in x_t: x_s = sqrt(ab_s) x0_hat +
    # sqrt(1 - ab_s) eps_hat with x0_hat = m + a s^2 (x_t - a m) / v, eps_hat = b (x_t - a m) / v,
    # v = a^2 s^2 + b^2. Push the exact mean and variance of x_T ~ N(0, 1) through the 50 steps.
    ab = torch.cumprod(1 - LINEAR_1000, 0).tolist()
    ts = torch.linspace(999, 0, 50).round().long().tolist()
    mean, var = 0.0, 1.0
    for i, t in enumerate(ts):
        a, b = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        ab_s = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        v = a * a * DATA_STD ** 2 + b * b
        gain = math.sqrt(ab_s) * a * DATA_STD ** 2 / v + math.sqrt(1 - ab_s) * b / v
        offset = math.sqrt(ab_s) * DATA_MEAN - gain * a * DATA_MEAN
        mean, var = gain * mean + offset, gain * gain * var
    assert 0.15 < math.sqrt(var) < 0.19  # 50 coarse steps shrink the spread: a real effect
    assert out.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / 1000))
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.1)


def quantize(x):
    """Round to the 256 bins of [-1, 1] (the data's discretization)."""
    return (torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1)


def discretized_entropy_bits(mean, std):
    edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1, [np.inf]])
    p = np.diff(stats.norm.cdf(edges, loc=mean, scale=std))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_nll_bound_is_finite_and_above_the_entropy():
    d = diffusion(var_type="fixed_small")
    gen = torch.Generator().manual_seed(7)
    x0 = quantize(DATA_MEAN + DATA_STD * torch.randn(20_000, 1, generator=gen,
                                                      dtype=torch.float64))
    bpd = d.nll_bpd(optimal_eps_model(d), x0, generator=gen)
    mean, stderr = summarize_nll(bpd)
    entropy = discretized_entropy_bits(DATA_MEAN, DATA_STD)
    assert math.isfinite(mean) and bool(torch.isfinite(bpd).all())
    assert mean >= entropy - 0.01
    assert mean < entropy + 1.0  # a bound, not a wild overestimate
    assert stderr < 0.05
    # a worse model (optimal for the wrong data mean) has a strictly larger bound
    subset = x0[:5000]
    worse = d.nll_bpd(optimal_eps_model(d, data_mean=0.0), subset, generator=gen).mean().item()
    assert worse > bpd[:5000].mean().item() + 0.05


def test_stratified_nll_is_unbiased():
    betas = beta_schedule("linear", 40)
    d = GaussianDiffusion(betas, var_type="fixed_large")
    # a deliberately imperfect model: optimal for the wrong data mean
    model = optimal_eps_model(d, data_mean=0.1)
    gen = torch.Generator().manual_seed(8)
    x0 = quantize(DATA_MEAN + DATA_STD * torch.randn(64, 1, generator=gen, dtype=torch.float64))
    repeats = 150
    exact = torch.stack([d.nll_bpd(model, x0, generator=gen).mean() for _ in range(repeats)])
    strat = torch.stack([d.nll_bpd_stratified(model, x0, num_strata=5, generator=gen).mean()
                         for _ in range(repeats)])
    se = math.sqrt(exact.var().item() / repeats + strat.var().item() / repeats)
    assert abs(exact.mean().item() - strat.mean().item()) < 3 * se
    # the estimator is noisier than the full loop but not absurdly so
    assert strat.std().item() > exact.std().item()
    per_image = d.nll_bpd_stratified(model, x0, num_strata=5, generator=gen)
    assert per_image.shape == (64,)
    assert summarize_nll(per_image)[1] > 0


@pytest.mark.parametrize("per_call", [3, 7, 40])
def test_bound_terms_batched_across_timesteps_equal_one_call_per_term(per_call):
    """Stacking several timesteps' inputs into one network call (a divisor of T or not, or all
    T at once) draws the same x_t and sums the same terms, in the same order."""
    from pipeline.model.unet import UNet

    d = GaussianDiffusion(beta_schedule("linear", 40), var_type="fixed_large")
    net = UNet(image_size=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2),
               num_res_blocks=1, attn_resolutions=(4,), dropout=0.0).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():  # the output layer starts at zero: make every term count
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    x0 = quantize(torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1)
    for method, kwargs in (("nll_bpd", {}), ("nll_bpd_stratified", {"num_strata": 9})):
        fn = getattr(d, method)
        one = fn(net, x0, generator=torch.Generator().manual_seed(5), **kwargs)
        stacked = fn(net, x0, generator=torch.Generator().manual_seed(5),
                     terms_per_call=per_call, **kwargs)
        other_draws = fn(net, x0, generator=torch.Generator().manual_seed(6), **kwargs)
        torch.testing.assert_close(stacked, one, rtol=1e-5, atol=1e-5)
        assert (other_draws - one).abs().max() > 1e-3  # the draws matter: same seed, same draws


# --------------------------------------------------------------------------------------------
# Parameterizations, variances, weightings
# --------------------------------------------------------------------------------------------


def test_mean_parameterizations_agree_given_equivalent_outputs():
    """eps, x0 and mu networks whose outputs encode the same x_0 give the same p(x_{t-1}|x_t)."""
    betas = beta_schedule("linear", 100)
    gen = torch.Generator().manual_seed(9)
    x_t = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 100, (32,), generator=gen)
    eps = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)[t][:, None]
    x0 = (x_t - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    outs = {"eps": eps, "x0": x0}
    d_x0 = GaussianDiffusion(betas, "x0", clip_denoised=False)
    outs["mu"] = d_x0.q_posterior(x0, x_t, t)[0]
    results = {k: GaussianDiffusion(betas, k, clip_denoised=False).p_mean_variance(
        None, x_t, t, model_output=v) for k, v in outs.items()}
    for k in ("x0", "mu"):
        torch.testing.assert_close(results[k]["mean"], results["eps"]["mean"])
        torch.testing.assert_close(results[k]["pred_x0"], results["eps"]["pred_x0"])


def test_variance_types():
    betas = beta_schedule("linear", 100)
    x_t = torch.zeros(100, 1, dtype=torch.float64)
    t = torch.arange(100)
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta_tilde = betas * (1 - ab_prev) / (1 - ab)

    def log_var(var_type, v=None):
        d = GaussianDiffusion(betas, "eps", var_type, "vlb")
        out = torch.zeros(100, 1, dtype=torch.float64)
        if v is not None:
            out = torch.cat([out, v], dim=1)
        return d.p_mean_variance(None, x_t, t, model_output=out)["log_variance"][:, 0]

    torch.testing.assert_close(log_var("fixed_large")[1:], torch.log(betas[1:]))
    torch.testing.assert_close(log_var("fixed_small")[1:], torch.log(beta_tilde[1:]))
    assert log_var("fixed_small")[0].item() == pytest.approx(math.log(beta_tilde[1]))
    raw = torch.randn(100, 1, dtype=torch.float64)
    torch.testing.assert_close(log_var("learned", raw), raw[:, 0])
    ones = torch.ones(100, 1, dtype=torch.float64)
    torch.testing.assert_close(log_var("learned_range", ones)[1:], torch.log(betas[1:]))
    torch.testing.assert_close(log_var("learned_range", -ones)[1:], torch.log(beta_tilde[1:]))


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
def test_vlb_weighting_is_the_true_bound(mean_type):
    """With a fixed variance, L_{t-1} (t > 1) is a constant plus lambda_t * MSE on the target:
    the vlb weighting must be proportional to lambda_t at every t."""
    betas = beta_schedule("linear", 200)
    d = GaussianDiffusion(betas, mean_type, "fixed_large", "simple", "vlb", clip_denoised=False)
    gen = torch.Generator().manual_seed(10)
    x0 = torch.rand(199, 1, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.arange(1, 200)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = d.q_sample(x0, t, noise)
    target = MEAN_TYPES[mean_type].target(d, x0, x_t, t, noise)
    out = target + 0.1 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    # L_{t-1} = (variance mismatch, independent of the mean) + ||mu-tilde - mu_theta||^2 / 2s^2
    vb = d.vb_terms_from_output(out, x0, x_t, t, clip_denoised=False)
    vb_exact_mean = d.vb_terms_from_output(target, x0, x_t, t, clip_denoised=False)
    mse = ((out - target) ** 2).mean(dim=(1, 2, 3))
    ratio = (vb - vb_exact_mean) / mse / d.loss_weights[1:]
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-8, atol=0)
    assert d.loss_weights.mean().item() == pytest.approx(1.0)


def test_p2_and_min_snr_closed_forms():
    betas = beta_schedule("linear", 1000)
    ab = torch.cumprod(1 - betas, 0)
    snr = ab / (1 - ab)
    p2 = GaussianDiffusion(betas, "eps", weighting="p2", p2_k=1.0, p2_gamma=0.5).loss_weights
    torch.testing.assert_close(p2, 1 / torch.sqrt(1 + snr))
    ms = GaussianDiffusion(betas, "eps", weighting="min_snr", min_snr_gamma=5.0).loss_weights
    torch.testing.assert_close(ms, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr)
    ms_x0 = GaussianDiffusion(betas, "x0", weighting="min_snr", min_snr_gamma=5.0).loss_weights
    torch.testing.assert_close(ms_x0, snr.clamp(max=5.0))


def test_hybrid_vlb_term_does_not_move_the_mean():
    """In L_hybrid the bound term trains only the variance (stop-gradient on the mean)."""
    betas = beta_schedule("linear", 100)
    d = GaussianDiffusion(betas, "eps", "learned_range", "hybrid", hybrid_lambda=0.5)
    simple = GaussianDiffusion(betas, "eps", "learned_range", "hybrid", hybrid_lambda=0.0)
    torch.manual_seed(11)
    net = torch.nn.Conv2d(1, 2, 3, padding=1, dtype=torch.float64)
    model = lambda x, t: net(x)  # noqa: E731
    x0 = torch.rand(8, 1, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.randint(0, 100, (8,))
    noise = torch.randn_like(x0)

    def mean_grad(diff):
        net.zero_grad()
        diff.training_losses(model, x0, t, noise)["loss"].mean().backward()
        return net.weight.grad[0].clone(), net.weight.grad[1].clone()

    mean_full, var_full = mean_grad(d)
    mean_simple, var_simple = mean_grad(simple)
    torch.testing.assert_close(mean_full, mean_simple)  # channel 0: the mean
    assert not torch.allclose(var_full, var_simple)  # channel 1: the variance learns


def test_second_moment_sampler_is_unbiased_and_prefers_large_losses():
    T = 20
    sampler = LossSecondMomentTimesteps(T, history=3)
    gen = torch.Generator().manual_seed(12)
    t, w = sampler.sample(64, gen)
    assert torch.allclose(w, torch.ones_like(w))  # uniform until warm
    for _ in range(5):
        ts = torch.arange(T)
        sampler.update(ts, (ts.double() + 1) ** 2)
    probs = sampler.probabilities()
    assert probs[-1] > 10 * probs[0] and probs.sum().item() == pytest.approx(1.0)
    t, w = sampler.sample(200_000, gen)
    # E_p[w f(t)] = mean_t f(t): importance weights unbias any function of t
    f = torch.sin(t.double())
    assert (w.double() * f).mean().item() == pytest.approx(
        torch.sin(torch.arange(T).double()).mean().item(), abs=0.02)


# --------------------------------------------------------------------------------------------
# Every Table 2 variant trains
# --------------------------------------------------------------------------------------------

COMBINATIONS = [(m, v, l) for m in MEAN_TYPES for v in VAR_TYPES for l in LOSSES
                if not (v in ("learned", "learned_range") and l == "simple")]


@pytest.mark.parametrize("mean_type,var_type,loss", COMBINATIONS)
def test_every_variant_trains_a_tiny_unet(mean_type, var_type, loss):
    from pipeline.model.unet import UNet

    torch.manual_seed(13)
    d = GaussianDiffusion(beta_schedule("linear", 100), mean_type, var_type, loss)
    net = UNet(image_size=8, in_channels=1, out_channels=d.output_channels(1), ch=16,
               ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    t = torch.randint(0, 100, (16,))
    noise = torch.randn_like(x0)
    assert net(x0, t).shape[1] == (2 if var_type in ("learned", "learned_range") else 1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss_value = d.training_losses(net, x0, t, noise)["loss"].mean()
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        losses.append(loss_value.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_from_config_and_bad_names():
    params = load_params("params.yaml")
    for name, exp in params.experiments.items():
        d = GaussianDiffusion.from_config(exp.diffusion)
        assert d.num_timesteps == exp.diffusion.num_timesteps
    with pytest.raises(ValueError, match="fixed_small"):
        GaussianDiffusion(LINEAR_1000, var_type="fixed")
