"""Numeric precision of the U-Net's forward (and backward) pass: `train.precision`,
`sample.precision`.

- `fp32`: float32 throughout, and on GPU strict IEEE float32 matmuls and convolutions (TF32 off,
  although cuDNN allows it for convolutions by default).
- `tf32`: float32 tensors; on an Ampere or newer GPU the matmuls and convolutions use TF32
  tensor cores (10-bit mantissa inputs, float32 accumulation). CPUs have no TF32: same as fp32.
- `bf16`: the network's forward runs under `torch.autocast(dtype=bfloat16)` (convolutions,
  matmuls and attention in bfloat16; normalizations and softmax in float32) and returns float32.
  Weights, gradients, Adam, the EMA, the loss and every diffusion formula stay float32 (mixed
  precision: no loss scaling is needed with bfloat16's float32 range). Fast on GPUs and on CPUs
  with AVX-512 BF16 or AMX.

Only the network's evaluation changes. The diffusion math (posterior, KL terms, discretized
decoder) is float32 in every mode, and the evaluate stage's NLL bound always runs in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from pipeline.core.config import PRECISIONS


class Autocast(nn.Module):
    """`net`'s forward under autocast to `dtype` on the input's device; the output as float32.

    A wrapper, not a change of `net`: its parameters (float32) are `net`'s, its state dict is
    `net.` + `net`'s, and the saved weights are those of `net` itself.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.net = net
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.net(x, t)
        return out.float()


def with_precision(net: nn.Module, precision: str) -> nn.Module:
    """`net` evaluated at `precision` (one of PRECISIONS): wrapped in `Autocast` for bf16, else
    `net` itself (TF32 is a process setting: `matmul_precision`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return Autocast(net, torch.bfloat16) if precision == "bf16" else net


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Within the block, CUDA float32 matmuls and cuDNN convolutions use TF32 for `tf32` and
    strict IEEE float32 otherwise; the previous settings are restored after it. No effect on
    CPU kernels."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    mode = "tf32" if precision == "tf32" else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = mode, mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
