"""KID and IS against torchmetrics, precision/recall against a brute-force implementation.

torchmetrics' metrics take a custom feature module; an identity passes precomputed
features straight through. Their randomness (torch.randperm after a manual seed) is
replayed by drawing the same permutations here and handing them to ours.
"""

import warnings

import numpy as np
import pytest
import torch
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from t2i_jax.metrics import inception_score, kid, precision_recall


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    # Non-negative like pool3 features, with some correlation between dimensions.
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(shift, 1.0, (n, d)) @ rng.normal(0, 1 / d**0.5, (d, d)))


def _torchmetrics(metric_cls, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        return metric_cls(feature=torch.nn.Identity(), **kwargs)


def test_kid_matches_torchmetrics_on_the_same_subsets():
    real, fake = _features(0, 70, 64), _features(1, 55, 64, shift=0.3)
    subsets, size, seed = 20, 40, 123
    torch.manual_seed(seed)
    indices = [
        (torch.randperm(len(real))[:size].numpy(), torch.randperm(len(fake))[:size].numpy())
        for _ in range(subsets)
    ]
    metric = _torchmetrics(KernelInceptionDistance, subsets=subsets, subset_size=size)
    metric.update(torch.from_numpy(real), real=True)  # float64: the reference is exact
    metric.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(seed)
    mean_ref, std_ref = (float(v) for v in metric.compute())
    mean, std = kid.kid_of_subsets(real, fake, indices)
    # Kernels are float32 on the device (the float64 reference shows their rounding):
    # measured 1.8e-7 relative on the mean, 3e-7 on the std.
    assert mean == pytest.approx(mean_ref, rel=2e-6)
    assert std == pytest.approx(std_ref, rel=1e-5)
    assert mean > 10 * std_ref / np.sqrt(subsets)  # the distributions differ, measurably


def test_kid_seeded_subsets_and_streaming():
    real, fake = _features(2, 50, 32), _features(3, 40, 32, shift=0.2)
    a = kid.kernel_inception_distance(real, fake, seed=0, subsets=10, subset_size=1000)
    assert a == kid.kernel_inception_distance(real, fake, seed=0, subsets=10, subset_size=1000)
    assert a != kid.kernel_inception_distance(real, fake, seed=1, subsets=10, subset_size=30)
    # subset_size above the counts takes all samples: every subset is then the same set.
    indices = kid.subset_indices(50, 40, seed=0, subsets=3, subset_size=1000)
    assert all(len(r) == len(f) == 40 for r, f in indices)
    metric = kid.kid_metric(seed=0, dim=32, subsets=10, subset_size=1000)
    left = metric.update(metric.update(metric.init(), real[:20], True), fake[:25], False)
    right = metric.update(metric.update(metric.init(), fake[25:], False), real[20:], True)
    assert metric.compute(metric.merge(left, right)) == pytest.approx(a, rel=1e-6)


def test_kid_of_identical_sets_is_near_zero_and_unbiased():
    x = _features(4, 200, 16)
    mean, _ = kid.kernel_inception_distance(x[:100], x[100:], seed=0, subsets=20, subset_size=50)
    far, _ = kid.kernel_inception_distance(x[:100], x[100:] + 1, seed=0, subsets=20, subset_size=50)
    assert abs(mean) < 0.05 * far


@pytest.mark.parametrize("n", [60, 53])  # 53: torch.chunk makes 9 chunks of 6 and one of 5
def test_inception_score_matches_torchmetrics(n):
    logits = np.random.default_rng(n).normal(0, 3, (n, 40))
    seed = 7
    torch.manual_seed(seed)
    order = torch.randperm(n).numpy()
    metric = _torchmetrics(InceptionScore, splits=10)
    metric.update(torch.from_numpy(logits))
    torch.manual_seed(seed)
    mean_ref, std_ref = (float(v) for v in metric.compute())
    mean, std = inception_score.inception_score(logits[order], seed=None, splits=10)
    assert mean == pytest.approx(mean_ref, rel=1e-12)
    assert std == pytest.approx(std_ref, rel=1e-10)
    assert mean > 1.5  # confident, varied predictions: a score well above its minimum 1


def test_inception_score_seed_and_streaming():
    logits = np.random.default_rng(0).normal(0, 2, (100, 20)).astype(np.float32)
    a = inception_score.inception_score(logits, seed=3)
    assert a == inception_score.inception_score(logits, seed=3)
    assert a != inception_score.inception_score(logits, seed=4)
    metric = inception_score.inception_score_metric(seed=3, num_classes=20)
    left = metric.update(metric.init(), logits[:37])
    right = metric.update(metric.init(), logits[37:])
    assert metric.compute(metric.merge(left, right)) == a
    # One class for everything: p(y|x) = p(y), so the score is exactly 1.
    constant = np.tile(np.eye(20)[3] * 30, (50, 1))
    assert inception_score.inception_score(constant, seed=None)[0] == pytest.approx(1.0)


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def coverage(queries, refs, r):
        d = np.sqrt(((queries[:, None] - refs[None]) ** 2).sum(-1))
        return np.mean((d <= r[None]).any(axis=1))

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(0, 1, (300, 16))
    fake = rng.normal(0.3, 1.2, (230, 16))  # wider and shifted: both numbers below one
    expected = _brute_force_precision_recall(real, fake, k)
    # A block size that divides neither count exercises the padded last block.
    got = precision_recall.precision_recall(real, fake, k=k, block_size=64)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.1 < expected[0] < 0.99 and 0.1 < expected[1] < 0.99


def test_precision_recall_radii_and_streaming():
    # Points on a line: the 3rd nearest other point of 0 is 3, of 5 is 2 (from 3, 4, 6, 7).
    x = np.arange(10, dtype=np.float32)[:, None]
    radii = precision_recall.knn_radii(x, 3, block_size=4)
    np.testing.assert_allclose(np.sqrt(radii)[[0, 5]], [3.0, 2.0])
    real, fake = _features(5, 80, 8), _features(6, 70, 8, shift=0.5)
    metric = precision_recall.precision_recall_metric(dim=8)
    left = metric.update(metric.update(metric.init(), real[:30], True), fake[:10], False)
    right = metric.update(metric.update(metric.init(), real[30:], True), fake[10:], False)
    assert metric.compute(metric.merge(left, right)) == precision_recall.precision_recall(
        real, fake
    )
    with pytest.raises(ValueError, match="k=3"):
        precision_recall.knn_radii(x[:3], 3)
