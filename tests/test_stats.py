"""pipeline.measure.stats: standard errors and intervals against known values on synthetic cases."""

import math

import numpy as np
import pytest

from pipeline.measure.stats import (Estimate, FeatureGroups, FeatureMoments, KernelReference,
                                    LogitMoments, combine_seeds, delete_a_group, fidelity_scores,
                                    precision_recall_estimates, precision_recall_reference,
                                    frechet_distance, group_bounds, inception_score,
                                    inception_score_of, jackknife, mean_estimate, paired_difference,
                                    total)


class FrechetReference:
    """FID against fixed reference features, from the sums `frechet_distance` takes."""

    def __init__(self, features):
        self.moments = FeatureMoments.of(features)

    def distance(self, features) -> float:
        return frechet_distance(FeatureMoments.of(features), self.moments)


def whitened(n: int, d: int, seed: int) -> np.ndarray:
    """n points whose empirical mean is 0 and covariance (np.cov) exactly the identity."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    x -= x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    return x @ vectors @ np.diag(values ** -0.5) @ vectors.T


def test_fid_against_the_closed_form():
    """N(mu, diag(s^2)) against N(0, I): FID = |mu|^2 + sum (1 - s)^2."""
    exact = FrechetReference(whitened(2000, 4, 2))
    mu, s = np.array([0.5, 0, 0, -0.5]), np.array([1.0, 2.0, 0.5, 1.0])
    samples = mu + s * whitened(5000, 4, 3)
    assert exact.distance(samples) == pytest.approx(mu @ mu + np.sum((1 - s) ** 2), rel=1e-6)


def test_jackknife_interval_covers_a_known_fid_at_about_its_nominal_rate():
    """Samples of N(mu, diag(s^2)) against exact N(0, I) statistics, where the FID of 1,000
    samples in 2 dimensions is nearly unbiased: the 95 % interval covers the true FID in
    about 95 % of 200 independent draws."""
    reference = FrechetReference(whitened(4000, 2, 0))
    mu, s = np.array([0.3, 0.0]), np.array([1.0, 1.2])
    true = mu @ mu + np.sum((1 - s) ** 2)
    rng = np.random.default_rng(5)
    covered = 0
    for repeat in range(200):
        samples = mu + s * rng.standard_normal((1000, 2))
        low, high = jackknife(lambda i: reference.distance(samples[i]), 1000,
                              seed=repeat).interval()
        covered += low <= true <= high
    assert 0.9 <= covered / 200 <= 0.99, covered / 200


def test_jackknife_follows_the_spread_of_fid_over_new_draws_in_high_dimension():
    """400 samples in 128 dimensions (the digits classifier's feature size): the jackknife
    standard error is close to the standard deviation of FID over fresh draws of 400 samples
    (a little above it: conservative); a bootstrap over the same samples is 3x too wide."""
    rng = np.random.default_rng(0)
    reference = FrechetReference(rng.standard_normal((20000, 128)))
    mu, s = np.full(128, 0.05), np.linspace(0.8, 1.3, 128)

    def draw():
        return mu + s * rng.standard_normal((400, 128))

    true_sd = np.std([reference.distance(draw()) for _ in range(60)], ddof=1)
    ses = []
    for repeat in range(3):
        samples = draw()
        ses.append(jackknife(lambda i: reference.distance(samples[i]), 400, seed=repeat).se)
    assert 0.9 < np.mean(ses) / true_sd < 1.6, (np.mean(ses), true_sd)


def test_kid_is_unbiased_and_sees_a_shift():
    """Both sides from one distribution: MMD^2 is 0 and KID averages to 0 over draws (to within
    its spread); a shifted distribution scores far above that spread."""
    rng = np.random.default_rng(7)
    kernel = KernelReference(rng.standard_normal((600, 5)))
    estimates = []
    for _ in range(30):
        k_xx, sums = kernel.prepare(rng.standard_normal((150, 5)))
        estimates.append(kernel.distance(k_xx, sums, np.arange(150)))
    spread = np.std(estimates, ddof=1)
    assert abs(np.mean(estimates)) < 3 * spread / math.sqrt(30)
    k_xx, sums = kernel.prepare(rng.standard_normal((150, 5)) + 0.5)
    assert kernel.distance(k_xx, sums, np.arange(150)) > 10 * spread


def test_inception_score_of_known_class_probabilities():
    """IS = exp(E_x KL(p(y|x) || p(y))): confident predictions spread evenly over 4 classes give
    4, identical predictions give 1; ten splits of 10 images each hold 1 class: IS 1."""
    confident = np.repeat(np.eye(4) * 50.0, 25, axis=0)
    assert inception_score_of(confident) == pytest.approx(4.0, rel=1e-6)
    assert inception_score_of(np.zeros((40, 4))) == pytest.approx(1.0)
    assert inception_score_of(np.repeat(np.eye(10) * 50.0, 10, axis=0), splits=10) == \
        pytest.approx(1.0, abs=1e-6)


def test_sums_give_torch_fidelitys_statistics_and_scores():
    """The mean and covariance from FeatureMoments' sums are torch-fidelity's (np.cov of the
    features), and IS from LogitMoments' sums is torch-fidelity's isc_features_to_metric, for
    one split and for five (consecutive, unshuffled)."""
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.metric_isc import isc_features_to_metric

    rng = np.random.default_rng(4)
    features = rng.standard_normal((500, 16)) * 3 + 1.5
    logits = rng.standard_normal((500, 10)) * 2
    ours = FeatureMoments.of(features).frechet_statistics()
    theirs = fid_features_to_statistics(torch.from_numpy(features))
    np.testing.assert_allclose(ours["mu"], theirs["mu"], rtol=1e-12)
    np.testing.assert_allclose(ours["sigma"], theirs["sigma"], rtol=1e-10, atol=1e-12)
    for splits in (1, 5):
        expected = isc_features_to_metric(torch.from_numpy(logits), splits, False)
        assert inception_score_of(logits, splits) == pytest.approx(
            expected["inception_score_mean"], rel=1e-12)


def test_sums_of_chunks_merge_into_the_sums_of_the_whole():
    """Cutting the images anywhere and adding the parts' sums gives the whole set's FID and
    IS: what the workers' chunks give the driver."""
    rng = np.random.default_rng(6)
    features, logits = rng.standard_normal((300, 8)), rng.standard_normal((300, 5)) * 3
    reference = FeatureMoments.of(rng.standard_normal((400, 8)) + 0.3)
    cuts = [0, 17, 120, 121, 300]
    parts = [(FeatureMoments.of(features[a:b]), LogitMoments.of(logits[a:b]))
             for a, b in zip(cuts[:-1], cuts[1:])]
    assert frechet_distance(total([f for f, _ in parts]), reference) == pytest.approx(
        frechet_distance(FeatureMoments.of(features), reference), rel=1e-10)
    assert inception_score([p for _, p in parts]) == pytest.approx(
        inception_score_of(logits), rel=1e-12)


def test_group_bounds_cut_contiguous_groups_of_near_equal_size():
    assert group_bounds(10, 4).tolist() == [0, 2, 5, 7, 10]
    assert group_bounds(3, 50).tolist() == [0, 1, 2, 3]  # no more groups than items
    sizes = np.diff(group_bounds(50_000, 50))
    assert set(sizes.tolist()) == {1000}


def test_delete_a_group_jackknife_of_a_mean_is_the_standard_error_of_the_group_means():
    """For a mean over G equal groups the delete-a-group jackknife is exactly
    sd(group means) / sqrt(G)."""
    rng = np.random.default_rng(2)
    values = rng.standard_normal((20, 7))  # 20 groups of 7 items
    estimate = delete_a_group(lambda kept: values[kept].mean(), 20)
    means = values.mean(axis=1)
    assert estimate.value == pytest.approx(values.mean())
    assert estimate.se == pytest.approx(means.std(ddof=1) / np.sqrt(20), rel=1e-12)
    assert math.isnan(delete_a_group(lambda kept: 1.0, 1).se)


def test_fidelity_scores_of_a_run():
    rng = np.random.default_rng(3)
    reference_features = rng.standard_normal((300, 6))
    features, logits = rng.standard_normal((120, 6)) + 0.4, rng.standard_normal((120, 10)) * 3
    reference = FeatureMoments.of(reference_features)
    groups = FeatureGroups.of(features, logits)
    scores = fidelity_scores(groups, reference, KernelReference(reference_features))
    assert set(scores) == {"fid", "is_mean", "kid_mean", "precision", "recall"}
    for name, estimate in scores.items():
        low, high = estimate.interval()
        assert 0 < estimate.se < abs(estimate.value) and low < estimate.value < high, name
    assert scores["fid"].value == pytest.approx(
        frechet_distance(FeatureMoments.of(features), reference), rel=1e-10)
    assert scores["is_mean"].value == pytest.approx(inception_score_of(logits), rel=1e-12)
    real = precision_recall_reference(reference_features, 120)
    assert (scores["precision"].value, scores["recall"].value) == pytest.approx(
        knn_precision_recall(features, real, 3), abs=1e-12)


def knn_precision_recall(generated, real, k):
    """Kynkäänniemi et al. 2019 written out: an image's ball reaches its k-th nearest neighbour
    in its own set; precision is the share of generated images inside some real ball, recall
    the share of real images inside some generated ball."""
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the image itself

    cross = np.sqrt(((generated[:, None, :] - real[None, :, :]) ** 2).sum(-1))
    precision = (cross <= radii(real)[None, :]).any(axis=1).mean()
    recall = (cross.T <= radii(generated)[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_and_recall_on_cases_with_known_answers():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((200, 4))
    same = precision_recall_estimates(real.copy(), real)
    assert same["precision"].value == 1.0 and same["recall"].value == 1.0
    far = precision_recall_estimates(real + 100.0, real)
    assert far["precision"].value == 0.0 and far["recall"].value == 0.0
    # a generator that covers a quarter of the real cloud, densely: samples that look real
    # (high precision) but miss most of the data (low recall)
    inner = real[np.linalg.norm(real, axis=1) < np.quantile(np.linalg.norm(real, axis=1), 0.25)]
    collapsed = inner[rng.integers(len(inner), size=200)] + rng.normal(0, 0.01, (200, 4))
    mode = precision_recall_estimates(collapsed, real, seed=1)
    assert mode["precision"].value > 0.95 and mode["recall"].value < 0.5
    assert (mode["precision"].value, mode["recall"].value) == pytest.approx(
        knn_precision_recall(collapsed, real, 3), abs=1e-12)
    low, high = mode["recall"].interval()
    assert 0 < mode["recall"].se < 0.2 and low < mode["recall"].value < high
    assert mode["precision"].se == 0.0 or mode["precision"].value < 1  # all inside: no spread
    # a larger real set is cut to the generated set's size, the same images every time
    big = rng.standard_normal((500, 4))
    chosen = precision_recall_reference(big, 200)
    assert len(chosen) == 200 and np.array_equal(chosen, precision_recall_reference(big, 200))
    assert math.isnan(precision_recall_estimates(real[:4], real)["recall"].value)


def test_paired_differences_see_a_shift_that_each_run_alone_cannot():
    """Two runs scored on the same 100 images: the bound varies by 0.5 bits/dim between images,
    but run B is 0.02 bits/dim worse on every image. The paired difference's interval excludes
    0; the difference of the two unpaired intervals would not."""
    rng = np.random.default_rng(0)
    a = rng.normal(4.0, 0.5, size=100)
    b = a + 0.02 + rng.normal(0, 0.005, size=100)
    low, high = paired_difference(b, a).interval()
    assert 0.015 < low < 0.02 < high < 0.025
    unpaired_low, _ = (mean_estimate(b) - mean_estimate(a)).interval()
    assert unpaired_low < 0
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, b[:50])


def test_several_seeds_use_the_spread_between_seeds_with_a_t_interval():
    combined = combine_seeds([Estimate(1.0, 0.01), Estimate(2.0, 0.01), Estimate(3.0, 0.01)])
    assert combined.value == pytest.approx(2.0) and combined.df == 2
    assert combined.se == pytest.approx(1.0 / math.sqrt(3))
    low, high = combined.interval()
    assert high - low == pytest.approx(2 * 4.302653 / math.sqrt(3), rel=1e-5)  # t_{0.975, 2}
    single = Estimate(5.0, 0.2)
    assert combine_seeds([single]) is single
    assert single.interval() == pytest.approx((5.0 - 1.959964 * 0.2, 5.0 + 1.959964 * 0.2))
    # a difference of two t estimates: Welch-Satterthwaite degrees of freedom
    diff = combined - Estimate(0.0, 1.0 / math.sqrt(3), 2)
    assert diff.df == pytest.approx(4.0) and diff.value == pytest.approx(2.0)
