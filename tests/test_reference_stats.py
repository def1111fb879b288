"""The reference statistics file (pipeline/measure/reference_stats_file.py): written and read back
bit for bit, its digest and provenance checked on load, and the sweep's probe reading it.

The evaluate stage reading it (no train features extracted, the same metrics) and its refusals
as a stage are in test_stages.py; the corrupt file injected into a study in test_reliability.py.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.measure.reference_stats_file import (ReferenceStats, ReferenceStatsError,
                                              load_reference_stats, provenance,
                                              reference_stats_path, save_reference_stats)
from pipeline.measure.stats import FeatureMoments, KernelReference

PROJECT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def made(tmp_path: Path, num_images: int = 30, dim: int = 6, extractor: str = "test-extractor"):
    """Statistics of `num_images` random features, with the provenance of a prepared split and a
    weights file of tmp_path: (stats, their provenance's inputs)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(num_images, dim)).astype(np.float32)
    split, weights = tmp_path / "train.npz", tmp_path / "weights.pt"
    if not split.exists():
        np.savez(split, images=np.zeros((num_images, 1, 2, 2), np.uint8))
        weights.write_bytes(b"weights")
    made_for = provenance("digits", "train", num_images, extractor, weights, split)
    moments = FeatureMoments.of(features[:20]) + FeatureMoments.of(features[20:])
    return ReferenceStats(moments, features[::2], made_for), (split, weights)


def test_written_and_read_back_bit_for_bit(tmp_path):
    stats, _ = made(tmp_path)
    path = reference_stats_path(tmp_path / "reference_stats")
    assert path == tmp_path / "reference_stats" / "train.npz"
    save_reference_stats(path, stats)
    back = load_reference_stats(path, stats.provenance)
    assert back.moments.count == 30
    for name in ("feature_sum", "outer_sum"):
        a, b = getattr(back.moments, name), getattr(stats.moments, name)
        assert a.dtype == np.float64 and a.tobytes() == b.tobytes()
    assert back.kid_features.dtype == np.float32
    assert back.kid_features.tobytes() == stats.kid_features.tobytes()
    assert back.provenance == stats.provenance
    assert back.kernel().yy == KernelReference(stats.kid_features).yy
    assert list(tmp_path.glob("reference_stats/.*")) == []  # written atomically, nothing left


@pytest.mark.parametrize("change, needle", [
    ({"num_images": 40}, "N 30, this study's is 40"),
    ({"extractor": "other"}, "extractor 'test-extractor', this study's is 'other'"),
    ({"split": "test"}, "split 'train', this study's is 'test'"),
    ({"prepared": "0" * 64}, "prepared data (sha256)"),
    ({"extractor_weights": "1" * 64}, "extractor weights (sha256)"),
])
def test_a_file_made_for_another_study_is_refused_in_one_line(tmp_path, change, needle):
    stats, _ = made(tmp_path)
    path = tmp_path / "train.stats.npz"
    save_reference_stats(path, stats)
    with pytest.raises(ReferenceStatsError) as refused:
        load_reference_stats(path, {**stats.provenance, **change})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(path))
    assert needle in message and "`dvc repro reference_stats`" in message


def test_changed_prepared_data_makes_the_file_stale(tmp_path):
    stats, (split, weights) = made(tmp_path)
    path = tmp_path / "stats.npz"
    save_reference_stats(path, stats)
    np.savez(split, images=np.ones((30, 1, 2, 2), np.uint8))  # the data prepared again, changed
    with pytest.raises(ReferenceStatsError, match="prepared data"):
        load_reference_stats(path, provenance("digits", "train", 30, "test-extractor", weights,
                                              split))


def test_a_corrupt_edited_or_missing_file_is_refused(tmp_path):
    stats, _ = made(tmp_path)
    path = tmp_path / "stats.npz"
    save_reference_stats(path, stats)
    good = path.read_bytes()

    # an array edited (and the file rewritten whole): the digest written with them differs
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["outer_sum"] = arrays["outer_sum"] + 1e-12
    np.savez(path, **arrays)
    with pytest.raises(ReferenceStatsError, match="do not match the digest"):
        load_reference_stats(path)

    path.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(ReferenceStatsError, match="unreadable") as refused:
        load_reference_stats(path)
    assert "\n" not in str(refused.value)

    flipped = bytearray(good)  # a byte flipped on disk (zip's CRC or the digest sees it)
    flipped[len(flipped) // 3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ReferenceStatsError, match="unreadable|digest"):
        load_reference_stats(path)

    path.unlink()
    with pytest.raises(ReferenceStatsError, match="not found; make them with `dvc repro "
                                                  "reference_stats`"):
        load_reference_stats(path)


def test_the_sweep_probe_reads_the_statistics_and_refuses_another_n(tmp_path):
    """trial_probe takes the train split's sums from the file (the quick FID extracts only the
    samples' features), and a file of another N stops the sweep before any trial."""
    sys.path.insert(0, str(TESTS))
    from pipeline.training.sweep_trials import trial_probe
    from pipeline.core.params import parse_params
    from pipeline.measure.extractors import FeatureNetwork

    extractor = "helpers_metrics:TinyConvExtractor"
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 12)):
        np.savez(tmp_path / f"{split}.npz",
                 images=rng.integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8),
                 labels=np.zeros(n, np.int64), levels=np.asarray(256))
    raw = copy.deepcopy(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    raw["evaluate"]["feature_extractor"] = extractor
    params = parse_params(raw)
    base = params.experiment(params.sweep.base_experiment)
    train = np.load(tmp_path / "train.npz")["images"]
    features, _ = FeatureNetwork(extractor, None)(train)
    stats = ReferenceStats(FeatureMoments.of(features), features,
                           provenance("digits", "train", 40, extractor, None,
                                      tmp_path / "train.npz"))
    save_reference_stats(tmp_path / "stats.npz", stats)
    probe = trial_probe(params.sweep, base, tmp_path / "train.npz", tmp_path / "test.npz",
                        tmp_path / "no-classifier", tmp_path / "stats.npz")
    assert probe.reference.outer_sum.tobytes() == stats.moments.outer_sum.tobytes()

    fewer = ReferenceStats(FeatureMoments.of(features[:30]), features[:30],
                           {**stats.provenance, "num_images": 30})
    save_reference_stats(tmp_path / "fewer.npz", fewer)
    with pytest.raises(ReferenceStatsError, match="N 30, this study's is 40"):
        trial_probe(params.sweep, base, tmp_path / "train.npz", tmp_path / "test.npz",
                    tmp_path / "no-classifier", tmp_path / "fewer.npz")
