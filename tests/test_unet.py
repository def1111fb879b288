"""Tests for pipeline.model.unet: the DDPM U-Net of Ho et al. 2020, App. B."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.core.config import ModelConfig
from pipeline.model.unet import (AttnBlock, Downsample, UNet, build_unet, count_parameters,
                                 timestep_embedding)

# The paper's CIFAR10 model: 35.7M parameters; the official diffusion_tf model has 35,746,307.
CIFAR10_KWARGS = dict(image_size=32, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2),
                      num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
OFFICIAL_CIFAR10_PARAMETERS = 35_746_307
DIGITS_MODEL = ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,),
                           dropout=0.1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (the zero-initialised ones included) a random value, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
            else:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def test_cifar10_model_has_the_paper_parameter_count() -> None:
    torch.manual_seed(0)
    model = UNet(**CIFAR10_KWARGS)
    count = count_parameters(model)
    print(f"CIFAR10 U-Net parameters: {count:,}")
    assert abs(count - 35.7e6) / 35.7e6 < 0.005
    assert count == OFFICIAL_CIFAR10_PARAMETERS
    attention_blocks = [m for m in model.modules() if isinstance(m, AttnBlock)]
    # 16x16: 2 on the way down, 3 on the way up, plus the one in the middle (at 4x4).
    assert len(attention_blocks) == 6
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([999]))
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_digits_model_output_shape_and_learned_variance(learned_variance: bool) -> None:
    model = build_unet(DIGITS_MODEL, image_size=8, channels=1, learned_variance=learned_variance)
    expected_channels = 2 if learned_variance else 1
    assert model.out_channels == expected_channels
    print(f"digits U-Net (learned_variance={learned_variance}): {count_parameters(model):,}")
    x = torch.randn(4, 1, 8, 8)
    out = model(x, torch.tensor([0, 1, 500, 999]))
    assert out.shape == (4, expected_channels, 8, 8)


@pytest.mark.parametrize(
    ("image_size", "channels", "ch", "ch_mult", "attn_resolutions"),
    [
        (16, 3, 16, (1, 2, 2), (8,)),   # GroupNorm with gcd(32, 16) = 16 groups
        (16, 3, 8, (1, 2), (16, 8)),    # ch=8: 8 groups; attention at both resolutions
        (12, 1, 32, (1, 3), ()),        # no attention outside the middle; 12 -> 6
    ],
)
def test_output_shape_matches_input(image_size: int, channels: int, ch: int,
                                    ch_mult: tuple[int, ...],
                                    attn_resolutions: tuple[int, ...]) -> None:
    cfg = ModelConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=1,
                      attn_resolutions=attn_resolutions, dropout=0.0)
    for learned_variance in (False, True):
        model = _perturb_(build_unet(cfg, image_size=image_size, channels=channels,
                                     learned_variance=learned_variance))
        out = model(torch.randn(2, channels, image_size, image_size), torch.tensor([3, 700]))
        expected = 2 * channels if learned_variance else channels
        assert out.shape == (2, expected, image_size, image_size)
        assert torch.isfinite(out).all()


def test_learned_variance_adds_only_output_channels() -> None:
    fixed = build_unet(DIGITS_MODEL, image_size=8, channels=3, learned_variance=False)
    learned = build_unet(DIGITS_MODEL, image_size=8, channels=3, learned_variance=True)
    conv_out = learned.conv_out
    extra = 3 * (conv_out.in_channels * 3 * 3 + 1)  # 3 more output channels of a 3x3 conv
    assert count_parameters(learned) - count_parameters(fixed) == extra


def test_fresh_model_outputs_zeros_then_learns_a_t_dependent_target() -> None:
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2),
                 num_res_blocks=2, attn_resolutions=(4,), dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (8,), generator=generator)
    target = (t.float() / 500.0 - 1.0)[:, None, None, None].expand_as(x)

    out = model(x, t)
    assert torch.equal(out, torch.zeros_like(out))

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    temb_grad_norms = []
    for step in range(5):
        optimizer.zero_grad()
        loss = (model(x, t) - target).square().mean()
        loss.backward()
        temb_grad_norms.append(model.temb[0].weight.grad.norm().item())
        optimizer.step()
        if step == 0:
            with torch.no_grad():
                assert model(x, t).abs().max() > 0
    # Zero-initialised output layers block the gradient for the first steps; then it flows.
    assert temb_grad_norms[0] == 0.0
    assert temb_grad_norms[-1] > 0.0

    model.eval()
    with torch.no_grad():
        same_x = x[:1].expand(2, -1, -1, -1)
        out = model(same_x, torch.tensor([0, 999]))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("dim", [8, 32, 128, 9])
def test_timestep_embedding_matches_closed_form(dim: int) -> None:
    t_values = [0, 1, 17, 999]
    embedding = timestep_embedding(torch.tensor(t_values), dim)
    assert embedding.shape == (len(t_values), dim)
    assert embedding.dtype == torch.float32
    half = dim // 2
    for row, t in enumerate(t_values):
        expected = []
        for i in range(half):
            expected.append(math.sin(t * 10000.0 ** (-i / (half - 1))))
        for i in range(half):
            expected.append(math.cos(t * 10000.0 ** (-i / (half - 1))))
        expected += [0.0] * (dim - 2 * half)
        torch.testing.assert_close(embedding[row], torch.tensor(expected), atol=2e-4, rtol=0)


def test_integer_float_and_scalar_timesteps_agree() -> None:
    model = _perturb_(build_unet(DIGITS_MODEL, image_size=8, channels=1, learned_variance=False))
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out_int = model(x, torch.tensor([7, 7, 7]))
        out_float = model(x, torch.tensor([7.0, 7.0, 7.0]))
        out_scalar = model(x, torch.tensor(7))
    torch.testing.assert_close(out_int, out_float)
    torch.testing.assert_close(out_int, out_scalar)


def test_attention_matches_einsum_reference() -> None:
    torch.manual_seed(0)
    block = _perturb_(AttnBlock(16))
    x = torch.randn(2, 16, 4, 4)
    # Independent single-head attention over the 16 positions, scale C**-0.5.
    q, k, v = block.qkv(block.norm(x)).flatten(2).chunk(3, dim=1)  # each (B, C, HW)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 16 ** -0.5, dim=-1)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 16, 4, 4)
    expected = x + block.proj_out(attended)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("image_size", "ch_mult"), [(8, (1, 2, 2, 2, 2)), (30, (1, 2, 2)),
                                                     (12, (1, 1, 1, 1))])
def test_bad_image_size_for_ch_mult_raises(image_size: int, ch_mult: tuple[int, ...]) -> None:
    cfg = ModelConfig(ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    with pytest.raises(ValueError) as excinfo:
        build_unet(cfg, image_size=image_size, channels=3, learned_variance=False)
    message = str(excinfo.value)
    assert "model.ch_mult" in message and str(ch_mult) in message
    assert "data.image_size" in message and str(image_size) in message
    assert str(2 ** (len(ch_mult) - 1)) in message


def test_channels_last_and_inference_mode_match_contiguous() -> None:
    torch.manual_seed(0)
    model = _perturb_(UNet(image_size=16, in_channels=3, out_channels=6, ch=16, ch_mult=(1, 2, 2),
                           num_res_blocks=1, attn_resolutions=(16, 8), dropout=0.1))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        reference = model(x, t)
        channels_last = model(x.to(memory_format=torch.channels_last), t)
    assert reference.abs().max() > 1e-3  # a non-trivial output, so the comparison can fail
    torch.testing.assert_close(channels_last, reference, atol=1e-4, rtol=1e-4)

    model_cl = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model_cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_dropout_is_active_in_train_mode_only() -> None:
    model = _perturb_(build_unet(DIGITS_MODEL, image_size=8, channels=1, learned_variance=False))
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5, 50])
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x, t), model(x, t))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t), atol=0, rtol=0)


def test_downsample_pads_like_tensorflow_same() -> None:
    # Official code: 3x3 stride-2 conv with "SAME" padding = 0 rows/cols before, 1 after.
    down = Downsample(2)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[:, :, 0, 0] = torch.eye(2)  # top-left tap: out[i, j] = x[2i, 2j]
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(down(x), x[:, :, ::2, ::2])


def test_up_path_concatenates_activation_before_skip() -> None:
    model = _perturb_(build_unet(DIGITS_MODEL, image_size=8, channels=1, learned_variance=False))
    model.eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.mid_block2.register_forward_hook(lambda m, args, out: seen.update(mid=out)),
        model.down[-1].attns[-1].register_forward_hook(
            lambda m, args, out: seen.update(skip=out)),
        model.up[0].blocks[0].register_forward_hook(lambda m, args, out: seen.update(cat=args[0])),
    ]
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    for hook in hooks:
        hook.remove()
    assert isinstance(model.down[-1].attns[-1], AttnBlock)  # 4x4: the last saved activation
    torch.testing.assert_close(seen["cat"], torch.cat([seen["mid"], seen["skip"]], dim=1))
