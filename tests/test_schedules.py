"""Beta schedules against the paper's constants and independent closed forms."""

import math

import pytest
import torch

from pipeline.diffusion.schedules import SCHEDULES, beta_schedule


def test_linear_matches_paper_constants():
    betas = beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    # the same product written out in plain Python floats
    product = 1.0
    for i in range(1000):
        product *= 1.0 - (1e-4 + i * (0.02 - 1e-4) / 999)
    assert alphas_cumprod[-1].item() == pytest.approx(product, rel=1e-12)
    # beta-tilde_2 = beta_2 (1 - alpha_bar_1) / (1 - alpha_bar_2)
    beta_tilde_1 = betas[1] * (1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1])
    assert beta_tilde_1.item() == pytest.approx(5.45319e-5, rel=1e-5)


def test_linear_default_range_scales_with_T():
    betas = beta_schedule("linear", 100)
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)
    explicit = beta_schedule("linear", 100, beta_start=1e-4, beta_end=0.02)
    assert explicit[-1].item() == pytest.approx(0.02)
    short = beta_schedule("linear", 10)  # 0.02 * 100 would be 2: capped below 1
    assert short[-1].item() == pytest.approx(0.999)
    assert torch.cumprod(1 - short, 0)[-1].item() > 0


def test_cosine_follows_its_alpha_bar_until_the_clip():
    T, s = 1000, 0.008
    betas = beta_schedule("cosine", T)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):
        assert alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)
    assert bool((betas[:-1] <= betas[1:] + 1e-15).all())


def test_other_schedules_closed_forms():
    T = 50
    quad = beta_schedule("quadratic", T, beta_start=1e-4, beta_end=0.02)
    assert quad[0].item() == pytest.approx(1e-4) and quad[-1].item() == pytest.approx(0.02)
    assert quad[T // 2].item() == pytest.approx(
        (math.sqrt(1e-4) + (T // 2) / (T - 1) * (math.sqrt(0.02) - math.sqrt(1e-4))) ** 2)
    sig = beta_schedule("sigmoid", T, beta_start=1e-4, beta_end=0.02)
    assert sig[0].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(6)))
    assert bool((sig[1:] > sig[:-1]).all())
    const = beta_schedule("constant", T, beta_end=0.01)
    assert torch.equal(const, torch.full((T,), 0.01, dtype=torch.float64))
    jsd = beta_schedule("jsd", T)
    assert jsd[0].item() == pytest.approx(1 / T) and jsd[-2].item() == pytest.approx(1 / 2)
    assert jsd[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_is_float64_in_unit_interval(name):
    betas = beta_schedule(name, 200)
    assert betas.dtype == torch.float64 and betas.shape == (200,)
    assert bool(((betas > 0) & (betas < 1)).all())
    assert torch.cumprod(1 - betas, 0)[-1].item() < 0.05  # x_T is close to pure noise


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        beta_schedule("cosin", 10)
