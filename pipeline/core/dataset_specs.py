"""The datasets that `data.dataset` names, each declared once: its image shape, its pixels'
levels, whether training flips it, the feature extractor of its FID and IS, its split sizes where
the dataset fixes them, and the paper's numbers where Ho et al. (2020) report any.

What reads it: `DataConfig` (the choices of `data.dataset`, the resolution and image shape),
`pipeline.data.datasets` (the levels, the default of `data.hflip`; its readers are registered
under the same names, and tests/test_config.py holds the two equal),
`pipeline.measure.extractors` (the default extractor), `pipeline.reporting.tables` (the
dataset's name, the paper's rows beside ours) and `pipeline.reporting.cost_plan` (split sizes
and shape before anything is prepared). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

# The feature extractors of FID and IS (evaluate.feature_extractor names one, or a class)
DIGITS_EXTRACTOR = "digits-classifier"    # a small CNN trained on the digits (the classifier stage)
INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's, the TF Inception of the paper

# The paper's published numbers (Ho et al. 2020, on CIFAR10). None: "unstable" (blank).
PAPER_TABLE1 = (  # Table 1: (objective, is_mean, is_std, fid, nll_bpd, nll_bpd_train)
    ("fixed", 7.67, 0.13, 13.51, 3.70, 3.69),
    ("simple", 9.46, 0.11, 3.17, 3.75, 3.72),
)
PAPER_TABLE2: dict[tuple[str, str], tuple[float, float, float] | None] = {  # IS, its sd, FID
    ("mu", "learned"): (7.28, 0.10, 23.69),
    ("mu", "fixed"): (8.06, 0.09, 13.22),
    ("mu", "simple"): None,
    ("eps", "learned"): None,
    ("eps", "fixed"): (7.67, 0.13, 13.51),
    ("eps", "simple"): (9.46, 0.11, 3.17),
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str                                   # data.dataset
    label: str                                  # the tables' name for it
    shape: Optional[tuple[int, int, int]]       # (C, H, W); None: data.channels x image_size²
    levels: int                                 # intensity levels of its raw pixels
    flip: bool                                  # random horizontal flips unless data.hflip
    extractor: str                              # FID / IS features (evaluate.feature_extractor: null)
    sizes: Optional[tuple[int, int]] = None     # (train, test) images, where the dataset fixes them
    images: Optional[int] = None                # images that data.test_fraction splits
    paper_table1: tuple = ()                    # the paper's rows of Table 1 / Table 2, if any
    paper_table2: Mapping[tuple[str, str], Optional[tuple]] = field(default_factory=dict)


DATASET_SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    # scikit-learn's 1797 handwritten digits, 8x8 on 17 grey levels: bundled, no download.
    # Not mirror-symmetric, so not flipped (a flipped digit is not a digit).
    DatasetSpec("digits", "Digits (8x8)", (1, 8, 8), 17, flip=False,
                extractor=DIGITS_EXTRACTOR, images=1797),
    # cifar-10-python.tar.gz, read in place; flipped in training as in the paper (App. B)
    DatasetSpec("cifar10", "CIFAR10", (3, 32, 32), 256, flip=True,
                extractor=INCEPTION_EXTRACTOR, sizes=(50_000, 10_000),
                paper_table1=PAPER_TABLE1, paper_table2=PAPER_TABLE2),
    # a folder of images, resized to data.image_size with data.channels
    DatasetSpec("folder", "Image folder", None, 256, flip=True,
                extractor=INCEPTION_EXTRACTOR),
)}
DATASET_NAMES = tuple(DATASET_SPECS)
