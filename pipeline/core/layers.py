"""The layers of `pipeline/`, bottom to top: a module imports only from its own layer and those
below it (tests/test_layers.py checks every import, those inside functions too).

- core: plumbing: errors, run statuses, the typed params, files and storage, progress, MLflow
- diffusion: the math: variance schedules, the Gaussian process, its bound and samplers, seeds
- model: the U-Net, its precision, the EMA of its weights
- data: raw data to the prepared format, and minibatches of it
- artifacts: the files the stages write, each writer beside its reader
- measure: sampling a batch, feature extractors, the NLL bound in parts, FID / IS / KID, the
  chunks a stage's work is cut into and what each kind computes
- training: the training loop and what a sweep trial measures, without Ray
- cluster: running on Ray, and only that: Ray Train, Ray Tune, chunks on Ray Data, connecting
- jobs: the stages' work: a run trained and kept, the sweep, the sample, evaluate and reference
  stages' jobs of chunks
- reporting: results read back, the findings, the tables, the cost plan

Imports sit at the top of each module, so that its first lines say what it depends on. The one
exception is a library that costs a second or more to import and that only some paths use: Ray,
MLflow, torch-fidelity, torchvision, scikit-learn, SciPy, matplotlib, pyarrow and DVC are
imported inside the functions that use them, and so is a module of ours that imports one of
them at its top (`measure/extractors.py`, torch-fidelity). Every process pays for what it
imports: each stage, and each Ray worker that unpickles a task, so a sampling worker never
loads the feature extractors' libraries, and a stage that refuses its params, or a test of a
table, loads none of them. For the same reason core/, which every stage imports before it has
checked its params, imports torch only where it is used, and a stage (stages/) imports its
job's modules at the start of its `body`, once the params are valid. tests/test_layers.py holds
every module to this (`LAZY_LIBRARIES`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.io import sha256_hex

LAYERS = ("core", "diffusion", "model", "data", "artifacts", "measure", "training", "cluster",
          "jobs", "reporting")
PACKAGE = Path(__file__).resolve().parents[1]

# What shapes a number: the layers whose code, changed, changes a trained model or a measured
# chunk (the plumbing and the files around them do not).
SHAPES_A_MODEL = ("diffusion", "model", "data")
SHAPES_A_CHUNK = ("diffusion", "model", "data", "measure")

# Imported inside functions (see above): everywhere, and in core/ also torch.
LAZY_LIBRARIES = ("ray", "mlflow", "torch_fidelity", "torchvision", "sklearn", "scipy",
                  "matplotlib", "pyarrow", "dvc")
LAZY_IN_CORE = ("torch",)


def layer_files(*layers: str) -> list[Path]:
    """The modules of `layers`, in a fixed order."""
    unknown = set(layers) - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; known: {', '.join(LAYERS)}")
    return [path for layer in layers for path in sorted((PACKAGE / layer).glob("*.py"))]


def source_digest(layers: tuple[str, ...], *files: str | Path) -> str:
    """Short hash of the source of every module of `layers`, and of `files`."""
    paths = [*layer_files(*layers), *map(Path, files)]
    return sha256_hex(*(path.read_bytes() for path in paths), length=8)
