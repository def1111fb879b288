"""A stand-in torch-fidelity feature extractor for tests that cannot load Inception weights.

`TinyConvExtractor` is a fixed (seeded, untrained) two-layer conv net for RGB images of any size
(e.g. 32x32x3 CIFAR10-shaped samples). It exposes the same feature names the pipeline relies on:
`feat` for FID / KID and `logits_unbiased` for IS. Use it as

    from helpers_metrics import register_standin_extractor  # tests/ is on sys.path
    name = register_standin_extractor()
    fidelity_of(samples, reference, extractor=name, weights_path=None)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from pipeline.measure.extractors import register_extractor

STANDIN_EXTRACTOR = "test-tiny-conv"


class TinyConvExtractor(FeatureExtractorBase):
    """Random-but-fixed conv features: conv(3->16, s2) -> conv(16->32, s2) -> 2x2 mean pool.

    `feat` has 128 dimensions (32 channels x 2 x 2 regions); `logits_unbiased` are 10 logits.
    """

    def __init__(self, name, features_list, seed: int = 0, **kwargs):
        super().__init__(name, list(features_list))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.head = nn.Linear(128, 10, bias=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("feat", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, x.shape)
        h = x.float() / 127.5 - 1.0
        h = F.relu(self.conv2(F.relu(self.conv1(h))))
        feat = F.adaptive_avg_pool2d(h, 2).flatten(1)
        computed = {"feat": feat, "logits_unbiased": 4.0 * self.head(feat)}
        return tuple(computed[name] for name in self.features_list)


def register_standin_extractor() -> str:
    """Register `TinyConvExtractor` with torch-fidelity (idempotent); return its name."""
    register_extractor(STANDIN_EXTRACTOR, TinyConvExtractor)
    return STANDIN_EXTRACTOR
