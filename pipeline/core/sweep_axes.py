"""The axes of the sweep's grid, each declared once (`SWEEP_AXES`).

A trial of the `sweep` stage is one cell of the grid: one value of each axis, in the order
below. An axis names:

- `name`: the trial's key for its value. It is the key of Ray Tune's search space, a column of
  results/sweep/trials.csv and of results/sweep.csv, an MLflow param and tag
  (`ddpm.<name>`) of the trial's run, and a key of best.yaml;
- `values`: the field of `SweepConfig` (params.yaml's `sweep:` section) that lists the values
  to try. Its `Literal` annotation is the allowed values, in the order tables show them;
- `label`: the axis's title on the heat map;
- `patch`: what a value sets in the trial's experiment, `{section: {key: value}}`. A trial is
  `sweep.base_experiment` with the patches of its cell applied, axis by axis.

Everything the sweep does with a cell reads this list. The first axis gives the rows of the
sweep's table and heat map, and the other axes give the columns (joined with " / " where there
are several). So a new axis is a field of `SweepConfig` and an entry here
(docs/layout.md, "A sweep axis").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

# A sweep "weighting" names an objective: the simple loss with one of its weightings, or the
# hybrid loss (Nichol & Dhariwal) with the uniform weighting. Name -> (diffusion.loss, weighting).
# Its keys are the choices of SweepConfig.weightings (tests/test_config.py holds them equal).
SWEEP_OBJECTIVES: dict[str, tuple[str, str]] = {
    "uniform": ("simple", "uniform"),  # L_simple (Ho et al. 2020 Eq. 14)
    "vlb": ("simple", "vlb"),          # the simple loss weighted as the true bound
    "p2": ("simple", "p2"),            # Choi et al. 2022
    "min_snr": ("simple", "min_snr"),  # Hang et al. 2023
    "hybrid": ("hybrid", "uniform"),   # L_simple + lambda L_vlb
}

Patch = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class SweepAxis:
    """One axis of the sweep's grid (see the module's docstring)."""

    name: str
    values: str
    label: str
    patch: Callable[[str], Patch]


SWEEP_AXES: tuple[SweepAxis, ...] = (
    SweepAxis("schedule", "schedules", "noise schedule",
              lambda value: {"diffusion": {"schedule": value}}),
    SweepAxis("weighting", "weightings", "loss weighting",
              lambda value: {"diffusion": dict(zip(("loss", "weighting"),
                                                   SWEEP_OBJECTIVES[value]))}),
)

Cell = tuple[str, ...]


def axis_names(axes: Sequence[SweepAxis] = SWEEP_AXES) -> tuple[str, ...]:
    return tuple(axis.name for axis in axes)


def cell_of(config: Mapping[str, Any], axes: Sequence[SweepAxis] = SWEEP_AXES) -> Cell:
    """The cell of a trial's config (Ray Tune's) or of a row of its table."""
    return tuple(str(config.get(axis.name)) for axis in axes)


def cell_label(config: Mapping[str, Any], axes: Sequence[SweepAxis] = SWEEP_AXES) -> str:
    """`cosine x uniform`: a cell as the sweep prints it."""
    return " x ".join(cell_of(config, axes))


def cell_patch(cell: Sequence[str], axes: Sequence[SweepAxis] = SWEEP_AXES) -> Patch:
    """What the cell's values set, merged section by section, axis by axis."""
    merged: Patch = {}
    for axis, value in zip(axes, cell, strict=True):
        for section, keys in axis.patch(value).items():
            merged.setdefault(section, {}).update(keys)
    return merged
