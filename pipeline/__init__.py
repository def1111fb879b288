"""A reproducible pipeline for the DDPM study (Ho, Jain & Abbeel 2020).

The library: no work at import time, no argv parsing. Stages in `stages/` call into it.

A trained run is one call away (`pipeline.measure.trained`): `load_run("eps_simple-0")` reads
models/eps_simple-0/ with params.yaml, `load_logged_model(<MLflow run id>)` its logged model, and
the `TrainedModel` they give samples with the sample stage's code and seeds. They are imported
from that module on first use, so that `import pipeline` imports neither torch nor MLflow.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.measure.trained import TrainedModel, load_logged_model, load_run

_TRAINED = ("TrainedModel", "load_logged_model", "load_run")


def __getattr__(name: str):
    if name in _TRAINED:
        from pipeline.measure import trained

        return getattr(trained, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
