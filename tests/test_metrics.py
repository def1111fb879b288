"""FID / IS / KID through torch-fidelity, and the digits classifier that measures the default study.

The classifier is trained once per module on the real digits train split; the metric tests then
check the orderings any sound FID / IS / KID must show: real vs real is close, real vs noise and
real vs one repeated digit are far; real digits have a high Inception Score, noise and a single
repeated image have IS near 1.
"""

from __future__ import annotations

import math
import socket
import time

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from helpers_metrics import STANDIN_EXTRACTOR, TinyConvExtractor, register_standin_extractor
from pipeline.core.config import EvaluateConfig
from pipeline.measure.digits_classifier import (ClassifierError, classifier_accuracy, classifier_predict,
                                         load_classifier, save_classifier, train_digits_classifier)
from pipeline.measure.extractors import (DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR,
                                         DigitsFeatureExtractor, FeatureNetwork, MetricsError,
                                         extractor_name, fidelity_of, register_digits_extractor,
                                         resolve_extractor)

CLASSIFIER_STEPS = 600
METRIC_KEYS = {"fid", "is_mean", "kid_mean"}


@pytest.fixture(scope="module")
def digits():
    """The digits split as the pipeline prepares it: uint8 N x 1 x 8 x 8, 20% test, stratified."""
    data = load_digits()
    images = np.rint(data.images * (255.0 / 16)).astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, data.target, test_size=0.2, stratify=data.target, random_state=0)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    x_train, y_train, _, _ = digits
    start = time.perf_counter()
    model = train_digits_classifier(x_train, y_train, steps=CLASSIFIER_STEPS, seed=0)
    seconds = time.perf_counter() - start
    path = tmp_path_factory.mktemp("classifier") / "digits_classifier.pt"
    save_classifier(model, path)
    return model, path, seconds


@pytest.fixture(scope="module")
def digit_metrics(digits, classifier):
    """FID / IS / KID of real, noise and single-digit image sets against real digits."""
    x_train, _, x_test, _ = digits
    _, path, _ = classifier
    n = len(x_test)
    generator = np.random.default_rng(0)
    image_sets = {
        "real": (x_test, x_train[:n]),  # IS of real test digits; FID test vs a train subset
        "noise": (generator.integers(0, 256, size=x_test.shape, dtype=np.uint8), x_test),
        "single": (np.repeat(x_test[:1], n, axis=0), x_test),
    }
    results = {name: fidelity_of(samples, reference, extractor=DIGITS_EXTRACTOR,
                                      weights_path=str(path))
               for name, (samples, reference) in image_sets.items()}
    for name, metrics in results.items():
        print(f"{name:>6}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return results


# --------------------------------------------------------------------------------------------
# The digits classifier
# --------------------------------------------------------------------------------------------


def test_classifier_reaches_95_percent_on_digits_test_split(digits, classifier):
    _, _, x_test, y_test = digits
    model, _, seconds = classifier
    accuracy = classifier_accuracy(model, x_test, y_test)
    print(f"digits classifier: {CLASSIFIER_STEPS} steps in {seconds:.1f}s, "
          f"test accuracy {accuracy:.4f} on {len(y_test)} images")
    assert accuracy >= 0.95


def test_classifier_training_is_deterministic_for_a_seed(digits):
    x_train, y_train, _, _ = digits
    first, second, other = (train_digits_classifier(x_train, y_train, steps=20, seed=seed)
                            for seed in (3, 3, 4))
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_save_load_round_trip_gives_identical_logits(digits, classifier, tmp_path):
    _, _, x_test, _ = digits
    model, _, _ = classifier
    path = tmp_path / "sub" / "clf.pt"
    save_classifier(model, path)
    assert [p.name for p in path.parent.iterdir()] == ["clf.pt"]  # no temp file left behind
    loaded = load_classifier(path)
    assert loaded.hparams == model.hparams
    assert torch.equal(classifier_predict(loaded, x_test), classifier_predict(model, x_test))


def test_a_feature_network_built_from_weight_bytes_matches_its_file_and_leaves_no_file(
        digits, classifier, tmp_path, monkeypatch):
    """A worker gets the extractor's weights as bytes (another node cannot read the driver's
    file): the network built from them gives the file's features and logits bit for bit, and
    the temporary file torch-fidelity loaded is gone once it is built."""
    import tempfile

    _, _, x_test, _ = digits
    _, path, _ = classifier
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from_bytes = FeatureNetwork.from_bytes("digits-classifier", path.read_bytes())
    assert list(scratch.iterdir()) == []
    from_file = FeatureNetwork("digits-classifier", str(path))
    for ours, theirs in zip(from_bytes(x_test[:50]), from_file(x_test[:50])):
        assert ours.tobytes() == theirs.tobytes()


def test_the_weights_file_has_the_same_bytes_each_time_it_is_saved(classifier, tmp_path):
    """DVC hashes models/classifier/: the same weights must give the same file, whatever
    temporary name the atomic write used."""
    model, _, _ = classifier
    save_classifier(model, tmp_path / "a" / "classifier.pt")
    save_classifier(model, tmp_path / "b" / "other-name.pt")
    assert (tmp_path / "a" / "classifier.pt").read_bytes() == \
        (tmp_path / "b" / "other-name.pt").read_bytes()


def test_missing_classifier_weights_name_the_file_and_the_remake_command(digits, tmp_path):
    path = tmp_path / "nowhere" / "digits_classifier.pt"
    with pytest.raises(ClassifierError, match="dvc repro classifier") as info:
        load_classifier(path)
    assert str(path) in str(info.value)
    _, _, x_test, _ = digits
    with pytest.raises(ClassifierError) as info:
        fidelity_of(x_test, x_test, extractor=DIGITS_EXTRACTOR, weights_path=str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_classifier_weights_raise_a_classifier_error(classifier, tmp_path, damage):
    _, good_path, _ = classifier
    raw = good_path.read_bytes()
    bad = tmp_path / "digits_classifier.pt"
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"not a checkpoint" * 10,
                     "empty": b""}[damage])
    with pytest.raises(ClassifierError, match="python -m stages.classifier") as info:
        load_classifier(bad)
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------------------------
# FID / IS / KID on digits
# --------------------------------------------------------------------------------------------


def test_metrics_are_finite_floats(digit_metrics):
    for metrics in digit_metrics.values():
        assert set(metrics) == METRIC_KEYS
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_fid_of_real_digits_is_much_smaller_than_of_noise_or_a_single_digit(digit_metrics):
    real, noise, single = (digit_metrics[k]["fid"] for k in ("real", "noise", "single"))
    assert 0.0 <= real
    assert real * 10 < noise
    assert real * 10 < single


def test_kid_orders_image_sets_like_fid(digit_metrics):
    real, noise, single = (digit_metrics[k]["kid_mean"] for k in ("real", "noise", "single"))
    assert abs(real) * 10 < noise
    assert abs(real) * 10 < single


def test_inception_score_is_high_for_real_digits_and_near_one_for_degenerate_sets(digit_metrics):
    real, noise, single = (digit_metrics[k]["is_mean"] for k in ("real", "noise", "single"))
    assert real > 5.0  # 10 balanced, confidently classified classes: the maximum is 10
    assert single == pytest.approx(1.0, abs=1e-6)  # one image: p(y|x) = p(y), KL = 0
    assert noise < real / 2


def test_grey_and_three_channel_digits_give_the_same_metrics(digits, classifier):
    x_train, _, x_test, _ = digits
    _, path, _ = classifier
    grey = fidelity_of(x_test[:100], x_train[:100], extractor=DIGITS_EXTRACTOR,
                       weights_path=str(path))
    rgb = fidelity_of(np.repeat(x_test[:100], 3, axis=1), torch.from_numpy(x_train[:100]),
                      extractor=DIGITS_EXTRACTOR, weights_path=str(path))
    assert rgb == pytest.approx(grey)


def test_small_runs_clip_is_splits(digits, classifier):
    x_train, _, x_test, _ = digits
    _, path, _ = classifier
    metrics = fidelity_of(x_test[:7], x_train[:30], extractor=DIGITS_EXTRACTOR,
                          weights_path=str(path), is_splits=10)
    assert all(math.isfinite(v) for v in metrics.values())


def test_inputs_must_be_uint8_nchw(digits, classifier):
    _, _, x_test, _ = digits
    _, path, _ = classifier
    with pytest.raises(ValueError, match="uint8"):
        fidelity_of(x_test.astype(np.float32), x_test, extractor=DIGITS_EXTRACTOR,
                    weights_path=str(path))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        fidelity_of(x_test[:, 0], x_test, extractor=DIGITS_EXTRACTOR, weights_path=str(path))
    with pytest.raises(MetricsError, match="at least 2"):
        fidelity_of(x_test[:1], x_test, extractor=DIGITS_EXTRACTOR, weights_path=str(path))


# --------------------------------------------------------------------------------------------
# Extractors: registry, inception-v3-compat offline, the stand-in for CIFAR10-shaped tests
# --------------------------------------------------------------------------------------------


def test_the_extractor_of_each_dataset_and_the_params_override():
    assert extractor_name("digits") == DIGITS_EXTRACTOR
    assert extractor_name("cifar10") == INCEPTION_EXTRACTOR
    assert extractor_name("folder") == INCEPTION_EXTRACTOR
    assert extractor_name("digits", INCEPTION_EXTRACTOR) == INCEPTION_EXTRACTOR
    with pytest.raises(MetricsError, match="mnist"):
        extractor_name("mnist")


def test_resolve_extractor_checks_the_digits_classifier_before_any_work(tmp_path):
    missing = tmp_path / "classifier.pt"
    with pytest.raises(ClassifierError, match="dvc repro classifier") as info:
        resolve_extractor("digits", EvaluateConfig(), missing, download=False)
    assert str(missing) in str(info.value)
    model = train_digits_classifier(np.zeros((20, 1, 8, 8), np.uint8), np.arange(20) % 10,
                                    steps=1, seed=0)
    save_classifier(model, missing)
    assert resolve_extractor("digits", EvaluateConfig(), missing, download=False) == (
        DIGITS_EXTRACTOR, str(missing))


def test_resolve_extractor_refuses_a_custom_extractor_that_does_not_import(tmp_path):
    cfg = EvaluateConfig(feature_extractor="no_such_module:Extractor")
    with pytest.raises(MetricsError, match="evaluate.feature_extractor: cannot import "
                                           "'no_such_module:Extractor'"):
        resolve_extractor("cifar10", cfg, tmp_path / "unused.pt", download=False)


def test_registration_is_idempotent():
    assert register_digits_extractor() == register_digits_extractor() == DIGITS_EXTRACTOR
    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS_EXTRACTOR] is DigitsFeatureExtractor
    assert register_standin_extractor() == register_standin_extractor() == STANDIN_EXTRACTOR
    assert FEATURE_EXTRACTORS_REGISTRY[STANDIN_EXTRACTOR] is TinyConvExtractor


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty torch hub cache: any download attempt fails the test at once."""
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)


def test_inception_with_missing_weights_file_names_the_params_key(offline, tmp_path):
    images = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(MetricsError, match="evaluate.inception_weights") as info:
        fidelity_of(images, images, extractor=INCEPTION_EXTRACTOR, weights_path=str(missing))
    assert str(missing) in str(info.value)


def test_inception_without_weights_offline_says_where_to_get_them(offline, monkeypatch):
    images = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(MetricsError, match="evaluate.inception_weights") as info:
        fidelity_of(images, images, extractor=INCEPTION_EXTRACTOR, weights_path=None)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(info.value)
    monkeypatch.setattr("pipeline.measure.extractors._network_reachable", lambda *a, **k: False)
    with pytest.raises(MetricsError, match="unreachable"):
        fidelity_of(images, images, extractor=INCEPTION_EXTRACTOR, weights_path=None,
                         download=True)


def test_unregistered_extractor_is_an_error():
    images = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    with pytest.raises(MetricsError, match="not registered"):
        fidelity_of(images, images, extractor="no-such-extractor", weights_path=None)


def test_standin_extractor_gives_finite_metrics_on_cifar_shaped_images():
    name = register_standin_extractor()
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, size=(60, 3, 32, 32), dtype=np.uint8)
    reference = rng.integers(0, 256, size=(80, 3, 32, 32), dtype=np.uint8)
    metrics = fidelity_of(samples, reference, extractor=name, weights_path=None)
    print("stand-in, random 32x32x3: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    assert set(metrics) == METRIC_KEYS
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["is_mean"] >= 1.0 - 1e-9
    again = fidelity_of(samples, reference, extractor=name, weights_path=None)
    assert again == metrics  # deterministic: fixed weights, all pairs of KID


def test_standin_extractor_tells_structured_images_from_noise():
    name = register_standin_extractor()
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(60, 3, 32, 32), dtype=np.uint8)
    more_noise = rng.integers(0, 256, size=(60, 3, 32, 32), dtype=np.uint8)
    ramps = np.linspace(0, 255, 32)[None, None, None, :] * rng.uniform(0.2, 1.0, (60, 3, 1, 1))
    gradients = np.broadcast_to(ramps, (60, 3, 32, 32)).round().astype(np.uint8)
    same = fidelity_of(noise, more_noise, extractor=name, weights_path=None)["fid"]
    different = fidelity_of(gradients, noise, extractor=name, weights_path=None)["fid"]
    print(f"stand-in FID: noise vs noise {same:.4g}, gradients vs noise {different:.4g}")
    assert same * 4 < different
