"""Tests for pipeline.model.precision: bf16 autocast of the U-Net, TF32 settings, and sampling at
sample.precision (training at train.precision is in test_training.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.params import parse_params
from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.measure.sampling import generate
from pipeline.model.precision import PRECISIONS, Autocast, matmul_precision, with_precision
from pipeline.model.unet import build_model


def _digits_experiment(**sample):
    return parse_params({
        "diffusion": {"num_timesteps": 20},
        "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                  "dropout": 0.0},
        "sample": {"num_samples": 32, "batch_size": 32, **sample},
        "experiments": {"eps_simple": {}},
    }).experiment("eps_simple")


def _random_unet(exp, seed: int = 0) -> nn.Module:
    """The experiment's U-Net with every parameter random (its zero-initialised output layer
    would make every precision return exactly 0)."""
    model = build_model(exp, (1, 8, 8)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def test_bf16_runs_the_convolutions_in_bfloat16_and_returns_float32():
    exp = _digits_experiment()
    model = _random_unet(exp)
    seen = []
    model.conv_in.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.arange(8) * 2
    with torch.no_grad():
        exact = model(x, t)
        mixed = with_precision(model, "bf16")(x, t)
    assert seen == [torch.float32, torch.bfloat16]
    assert mixed.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights untouched
    relative = ((mixed - exact).norm() / exact.norm()).item()
    assert 0.0 < relative < 0.03  # bfloat16's 8-bit mantissa: close, but not the same numbers


def test_fp32_and_tf32_leave_the_network_as_it_is_and_unknown_names_are_refused():
    net = nn.Linear(2, 2)
    assert with_precision(net, "fp32") is net and with_precision(net, "tf32") is net
    wrapped = with_precision(net, "bf16")
    assert isinstance(wrapped, Autocast) and wrapped.net is net
    for precision in PRECISIONS:  # every precision params.yaml accepts is one with_precision knows
        assert isinstance(with_precision(net, precision), nn.Module)
        with matmul_precision(precision):
            pass
    for call in (lambda: with_precision(net, "fp16"), lambda: matmul_precision("half").__enter__()):
        with pytest.raises(ValueError, match="unknown precision"):
            call()


def test_matmul_precision_sets_tf32_or_strict_fp32_and_restores_the_settings():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with matmul_precision("tf32"):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with matmul_precision("fp32"):  # strict: cuDNN's default TF32 convolutions off too
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert matmul.fp32_precision == "tf32"
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with pytest.raises(RuntimeError, match="an error inside the block"), matmul_precision("bf16"):
        assert matmul.fp32_precision == "ieee"  # bf16 autocast leaves float32 ops strict
        raise RuntimeError("an error inside the block")
    assert (matmul.fp32_precision, conv.fp32_precision) == before


@pytest.mark.parametrize("sampler", [{"sampler": "ancestral"}, {"sampler": "ddim", "steps": 5}])
def test_sampling_at_bf16_draws_nearly_the_fp32_images(sampler):
    """The same seed and weights: bf16 samples differ from fp32 ones by a few pixel levels."""
    exact_exp = _digits_experiment(**sampler)
    mixed_exp = _digits_experiment(**sampler, precision="bf16")
    model = _random_unet(exact_exp)
    diffusion = GaussianDiffusion.from_config(exact_exp.diffusion)
    runs = [generate(model, diffusion, exp, (1, 8, 8), seed=3, progress=False, num_progressive=0)
            for exp in (exact_exp, mixed_exp)]
    exact, mixed = (run.images.astype(np.int64) for run in runs)
    assert exact.shape == mixed.shape == (32, 1, 8, 8)
    difference = np.abs(exact - mixed)
    assert difference.max() > 0  # the bf16 network really ran
    assert difference.mean() < 2.0  # out of 255 (about 0.2 here); other seeds differ by ~100
    other = generate(model, diffusion, exact_exp, (1, 8, 8), seed=4, progress=False,
                     num_progressive=0).images.astype(np.int64)
    assert np.abs(exact - other).mean() > 5 * difference.mean()
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_compiled_sampling_draws_the_eager_images():
    """sample.compile: TorchInductor's forward, the same seed, the same images up to float
    rounding (a fused kernel may round the last bit differently)."""
    eager_exp = _digits_experiment(sampler="ddim", steps=5)
    compiled_exp = _digits_experiment(sampler="ddim", steps=5, compile=True)
    model = _random_unet(eager_exp)
    diffusion = GaussianDiffusion.from_config(eager_exp.diffusion)
    eager, compiled = (generate(model, diffusion, exp, (1, 8, 8), seed=3, progress=False,
                                num_progressive=0).images.astype(np.int64)
                       for exp in (eager_exp, compiled_exp))
    assert np.abs(eager - compiled).mean() < 0.05  # out of 255; bf16 differs by ~0.2
