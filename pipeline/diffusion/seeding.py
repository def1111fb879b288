"""Per-item random streams: the noise of image i (and of bound term j of image i) comes from a
generator of its own, seeded by (purpose, run seed, i) alone, so that a result does not depend on
how its items were batched, chunked or spread over workers (as EDM's `generate.py --seeds`).

    generators = item_generators("sample", seed=1, indices=range(400, 600))

gives one `torch.Generator` per image 400..599, stacked
(`pipeline.diffusion.gaussian.StackedGenerator`):
the samplers draw row r's noise from generator r. Item i of a stream is seeded with
(offset + i) mod 2^32, where the offset is a hash of (purpose, seed): distinct items of one
stream never share a seed (torch's CPU generator, a Mersenne Twister, keeps only 32 bits of its
seed), and each stream starts at its own place.
"""

from __future__ import annotations

from typing import Iterable

import torch

from pipeline.core.io import sha256_hex
from pipeline.diffusion.gaussian import StackedGenerator

SEED_BITS = 32


def stream_offset(purpose: str, seed: int) -> int:
    """Where stream (purpose, seed) starts among the 2^32 generator seeds."""
    return int(sha256_hex(f"{purpose}:{seed}", length=SEED_BITS // 4), 16)


def item_seed(purpose: str, seed: int, index: int) -> int:
    """The generator seed of item `index` of stream (purpose, seed)."""
    if index < 0:
        raise ValueError(f"item index must be >= 0, got {index}")
    return (stream_offset(purpose, seed) + index) % 2 ** SEED_BITS


def item_generators(purpose: str, seed: int, indices: Iterable[int],
                    device: str | torch.device = "cpu") -> StackedGenerator:
    """One generator per item of `indices`, on `device`, stacked in that order."""
    offset = stream_offset(purpose, seed)
    return StackedGenerator([torch.Generator(device=device).manual_seed(
        (offset + int(i)) % 2 ** SEED_BITS) for i in indices])
