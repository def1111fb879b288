"""The DDPM U-Net (Ho, Jain & Abbeel 2020, Appendix B), re-implemented in PyTorch.

The architecture follows the paper's Appendix B and the official `diffusion_tf/models/unet.py`:
a PixelCNN++-style U-Net backbone of wide-ResNet blocks with group normalization, self-attention
at the 16x16 resolution (for 32x32 CIFAR10), and the diffusion time t injected into every
residual block through the Transformer sinusoidal position embedding followed by an MLP.
The CIFAR10 model (ch=128, ch_mult=(1, 2, 2, 2), 2 residual blocks per resolution, attention at
16x16, dropout 0.1) has 35.7M parameters, as in the paper.

Details taken from the official code, where the paper is silent:
- group normalization with eps 1e-6 (32 groups; fewer for narrow models, see `group_norm`);
- weights initialised by `variance_scaling(1, "fan_avg", "uniform")` (= Xavier uniform), biases
  at zero, and the last convolution of each residual block, the attention output projection and
  the output convolution initialised to zero (`init_scale=0`), so a fresh model outputs zeros;
- the stride-2 downsampling convolution pads like TensorFlow's "SAME" (0 before, 1 after);
- skip activations are concatenated after the current activation on the channel axis.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import LEARNED_VAR_TYPES

if TYPE_CHECKING:
    from pipeline.core.config import ExperimentConfig, ModelConfig

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the timestep indices t (B,) into (B, dim), float32.

    The Transformer position embedding used by Ho et al. 2020 (App. B) and the official
    `get_timestep_embedding`: with half = dim // 2 and frequencies
    w_i = exp(-i * log(10000) / (half - 1)), i = 0..half-1, the embedding is
    [sin(t * w_0), ..., sin(t * w_{half-1}), cos(t * w_0), ..., cos(t * w_{half-1})],
    zero-padded by one entry when dim is odd.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {tuple(t.shape)}")
    if dim < 4:
        raise ValueError(f"timestep_embedding needs dim >= 4, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device)
    frequencies = torch.exp(exponent * (-math.log(10000.0) / (half - 1)))
    angles = t.to(torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm as in the official code: 32 groups, eps 1e-6.

    Narrow models (channel counts not divisible by 32, e.g. ch=16 or 8) use gcd(32, channels)
    groups, so that the small configurations of this study are valid.
    """
    groups = GROUP_NORM_GROUPS if channels % GROUP_NORM_GROUPS == 0 else math.gcd(
        GROUP_NORM_GROUPS, channels)
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


def _zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias in place (the official `init_scale=0.`); return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """Wide-ResNet block with the timestep injected between its two convolutions (App. B).

    h = conv3x3(SiLU(GN(x))) + Linear(SiLU(temb)); h = conv3x3(Dropout(SiLU(GN(h))));
    output = skip(x) + h, where skip is a 1x1 convolution when the channel count changes.
    The second convolution starts at zero, so a fresh block is the identity on its skip path.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection (App. B).

    q, k, v are 1x1 convolutions of GN(x) (one convolution producing 3C channels);
    softmax(q k^T * C^-0.5) v is projected by a zero-initialised 1x1 convolution and added to x.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, 3C, H, W) -> (B, H*W, 3C); a view for both contiguous and channels_last layouts.
        qkv = self.qkv(self.norm(x)).reshape(batch, 3 * channels, height * width).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=2)
        h = F.scaled_dot_product_attention(q, k, v, scale=channels ** -0.5)
        # (B, H*W, C) -> (B, C, H, W) in channels_last layout, without a copy.
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 stride-2 convolution, padded like TensorFlow's "SAME" (official `downsample`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (official `upsample`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual (+ attention) blocks of one resolution, and its resampling layer (or None)."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module],
                 resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)  # nn.Identity where the resolution has no attention
        self.resample = resample


class UNet(nn.Module):
    """The DDPM noise-prediction network eps_theta(x_t, t) of Ho et al. 2020, App. B.

    Down path: conv_in, then per level i `num_res_blocks` ResBlocks of ch * ch_mult[i] channels
    (each followed by self-attention where the resolution is in `attn_resolutions`) and a stride-2
    downsample except at the last level. Middle: ResBlock, AttnBlock, ResBlock. Up path: per level,
    in reverse, `num_res_blocks + 1` ResBlocks, each on the concatenation of the activation with
    the matching skip activation of the down path, then a nearest-neighbour upsample (except at
    the highest resolution). Out: GN, SiLU, 3x3 conv to `out_channels`.

    `forward(x, t)` takes x of shape (B, in_channels, H, W) and timestep indices t of shape (B,)
    (index 0 is the paper's t = 1) and returns (B, out_channels, H, W).
    """

    def __init__(self, *, image_size: int, in_channels: int, out_channels: int, ch: int,
                 ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 dropout: float) -> None:
        super().__init__()
        num_levels = len(ch_mult)
        if num_levels < 1 or num_res_blocks < 1:
            raise ValueError("UNet needs at least one level (ch_mult) and one residual block")
        factor = 2 ** (num_levels - 1)
        if image_size % factor != 0:
            raise ValueError(
                f"model.ch_mult {tuple(ch_mult)} has {num_levels} levels, so the image is halved "
                f"{num_levels - 1} times and the image size must be divisible by {factor}, but "
                f"data.image_size is {image_size}. Use fewer levels in model.ch_mult or another "
                "data.image_size.")
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.ch = ch
        temb_ch = 4 * ch

        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)

        def attention(channels: int, resolution: int) -> nn.Module:
            return AttnBlock(channels) if resolution in attn_resolutions else nn.Identity()

        # Down path; `skip_channels` mirrors the stack of activations saved for the up path.
        skip_channels = [ch]
        channels, resolution = ch, image_size
        down = []
        for level, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(channels, ch * mult, temb_ch, dropout))
                channels = ch * mult
                attns.append(attention(channels, resolution))
                skip_channels.append(channels)
            resample = None
            if level != num_levels - 1:
                resample = Downsample(channels)
                resolution //= 2
                skip_channels.append(channels)
            down.append(Level(blocks, attns, resample))
        self.down = nn.ModuleList(down)

        self.mid_block1 = ResBlock(channels, channels, temb_ch, dropout)
        self.mid_attn = AttnBlock(channels)
        self.mid_block2 = ResBlock(channels, channels, temb_ch, dropout)

        up = []
        for level in reversed(range(num_levels)):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                out_ch = ch * ch_mult[level]
                blocks.append(ResBlock(channels + skip_channels.pop(), out_ch, temb_ch, dropout))
                channels = out_ch
                attns.append(attention(channels, resolution))
            resample = None
            if level != 0:
                resample = Upsample(channels)
                resolution *= 2
            up.append(Level(blocks, attns, resample))
        self.up = nn.ModuleList(up)
        assert not skip_channels, "every saved activation is consumed by the up path"

        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official initialisation: Xavier-uniform weights, zero biases, zeroed output layers."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResBlock):
                _zero_(module.conv2)
            elif isinstance(module, AttnBlock):
                _zero_(module.proj_out)
        _zero_(self.conv_out)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict from x_t (B, C, H, W) and timestep indices t (B,); returns (B, out_ch, H, W)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))

        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb)))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb)), temb)

        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(model_cfg: ModelConfig, *, image_size: int, channels: int,
               learned_variance: bool) -> UNet:
    """The U-Net of the `model` section for images of `channels` x `image_size` x `image_size`.

    With a learned variance (var_type `learned` or `learned_range`) the network outputs 2C
    channels: the mean parameterization's C channels, then the variance's C channels.
    """
    return UNet(
        image_size=image_size,
        in_channels=channels,
        out_channels=2 * channels if learned_variance else channels,
        ch=model_cfg.ch,
        ch_mult=tuple(model_cfg.ch_mult),
        num_res_blocks=model_cfg.num_res_blocks,
        attn_resolutions=tuple(model_cfg.attn_resolutions),
        dropout=model_cfg.dropout,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model` (each shared tensor counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def build_model(exp: ExperimentConfig, image_shape: tuple[int, int, int]) -> UNet:
    """The experiment's U-Net for images of shape (C, H, W)."""
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"square images expected, got {height}x{width}")
    return build_unet(exp.model, image_size=height, channels=channels,
                      learned_variance=exp.diffusion.var_type in LEARNED_VAR_TYPES)
