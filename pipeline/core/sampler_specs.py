"""The samplers that `sample.sampler` names, each declared once: its name, what it does, and the
options of the `sample` section it is called with. `SampleConfig` takes its choices from here and
refuses an option the chosen sampler does not take; `pipeline.diffusion.samplers` registers a
function under each name (tests/test_config.py holds the two equal, the functions' keyword
arguments included), and `pipeline.measure.sampling` calls it with `sampler_options`, so no code
asks which sampler it runs. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    summary: str
    options: tuple[str, ...] = ()  # the keys of `sample` it takes, as keyword arguments


SAMPLER_SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ancestral", "Algorithm 2 of Ho et al. 2020: all T steps, fresh noise at each"),
    SamplerSpec("ddim", "strided DDIM (Song et al. 2021): `steps` evenly spaced steps, the "
                        "noise of each scaled by `eta` (0: deterministic)",
                options=("steps", "eta")),
)}
SAMPLER_NAMES = tuple(SAMPLER_SPECS)
# The keys of `sample` that belong to some sampler, with the value that means "not used".
SAMPLER_OPTIONS: dict[str, Any] = {"steps": None, "eta": 0.0}


def sampler_options(cfg) -> dict[str, Any]:
    """The keyword arguments of the sampler `cfg` (a SampleConfig) names: its declared options'
    values in `cfg`."""
    return {key: getattr(cfg, key) for key in SAMPLER_SPECS[cfg.sampler].options}


def unused_options(cfg) -> list[str]:
    """The sampler options set in `cfg` (a SampleConfig) that its sampler does not take."""
    taken = SAMPLER_SPECS[cfg.sampler].options
    return [key for key, unset in SAMPLER_OPTIONS.items()
            if key not in taken and getattr(cfg, key) != unset]
