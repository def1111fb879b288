"""Per-item random streams: the noise of image i (and of bound term j of image i) comes from a
generator of its own, seeded by (purpose, run seed, i) alone, so that a result does not depend on
how its items were batched, chunked or spread over workers (as EDM's `generate.py --seeds`).

    generators = item_generators("sample", seed=1, indices=range(400, 600))

gives one `torch.Generator` per image 400..599, stacked (`StackedGenerator`): `randn` and
`rand` draw row r's noise from generator r, and the bound draws term j's from the generator
that `term_generator` picks. Item i of a stream is seeded with (offset + i) mod 2^32, where
the offset is a hash of (purpose, seed): distinct items of one stream never share a seed
(torch's CPU generator, a Mersenne Twister, keeps only 32 bits of its seed), and each stream
starts at its own place.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch

from pipeline.core.io import sha256_hex

SEED_BITS = 32


class StackedGenerator:
    """One `torch.Generator` per row of a batch (EDM's StackedRandomGenerator): row r of every
    draw comes from generator r, so an image's noise does not depend on which other images
    share its batch. `item_generators` makes one per image."""

    def __init__(self, generators):
        self.generators = list(generators)
        if not self.generators:
            raise ValueError("a StackedGenerator needs at least one generator")
        self.device = self.generators[0].device

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, fn, shape, dtype) -> torch.Tensor:
        """`fn` (torch.randn or torch.rand) of `shape`, row r from generator r."""
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} generators cannot draw a batch of "
                             f"{shape[0]}")
        return torch.stack([fn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])


Generator = Union[torch.Generator, StackedGenerator]
# the noise source of a bound term: one generator for every term, or a function of the term
TermGenerators = Union[None, Generator, Callable[[int], Generator]]


def term_generator(generator: TermGenerators, term: int) -> Optional[Generator]:
    """The generator of bound term `term`: `generator(term)` if it is a function of the term."""
    return generator(term) if callable(generator) else generator


def _draw(fn, shape, generator: Optional[Generator], device, dtype) -> torch.Tensor:
    if isinstance(generator, StackedGenerator):
        values = generator.draw(fn, shape, dtype)
    else:
        gen_device = generator.device if generator is not None else device
        values = fn(shape, generator=generator, device=gen_device, dtype=dtype)
    return values.to(device) if device is not None else values


def randn(shape, generator: Optional[Generator], device=None, dtype=torch.float32):
    """Standard normal noise drawn from `generator` (on its own device; a StackedGenerator
    draws each row from its own), moved to `device`."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape, generator: Optional[Generator], device=None, dtype=torch.float32):
    """Uniform [0, 1) values drawn like `randn`."""
    return _draw(torch.rand, shape, generator, device, dtype)


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
