"""FID against torchmetrics and a closed form; PRDC against a brute-force transcription of Naeem et al. 2020."""

import math

import numpy as np
import pytest
import torch

from imprint.generative.metrics import (class_histogram, fid_from_features, frechet_distance, knn_radii, prdc,
                                        total_variation_to_uniform)
from imprint.models.feature_net import (DigitFeatureNet, FeatureExtractor, FeatureNetOptions, accuracy,
                                        train_feature_net)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fid_matches_torchmetrics_with_the_same_custom_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    net = DigitFeatureNet(n_features=16).eval()
    extractor = FeatureExtractor(net)
    real = torch.rand(300, 1, 8, 8) * 2 - 1
    fake = (torch.rand(250, 1, 8, 8) * 2 - 1) * 0.7 + 0.1
    fid_tm = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
    fid_tm.update(real, real=True)
    fid_tm.update(fake, real=False)
    expected = float(fid_tm.compute())
    with torch.no_grad():
        ours = fid_from_features(extractor(real), extractor(fake))
    assert ours == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected > 1e-3  # the two sets do differ


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a, b = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # rotation invariance: the same Gaussians in a rotated basis
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    rotated = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero():
    x = torch.randn(100, 5)
    assert abs(fid_from_features(x, x)) < 1e-8


def _brute_force_prdc(real, fake, k):
    """Naeem et al. 2020, eqs. (1)-(4) with pairwise loops; B(x, r) the open ball."""
    real, fake = real.tolist(), fake.tolist()
    dist = lambda a, b: math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))  # noqa: E731

    def radius(points, i):
        return sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    n, m = len(real), len(fake)
    precision = sum(any(dist(fake[j], real[i]) < r_real[i] for i in range(n)) for j in range(m)) / m
    recall = sum(any(dist(real[i], fake[j]) < r_fake[j] for j in range(m)) for i in range(n)) / n
    density = sum(sum(dist(fake[j], real[i]) < r_real[i] for i in range(n)) for j in range(m)) / (k * m)
    coverage = sum(any(dist(fake[j], real[i]) < r_real[i] for j in range(m)) for i in range(n)) / n
    return precision, recall, density, coverage


@pytest.mark.parametrize("k,shift", [(5, 0.0), (5, 0.8), (3, 0.3)])
def test_prdc_matches_brute_force(k, shift):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(35, 3, generator=g, dtype=torch.float64) * 0.6 + shift
    ours = prdc(real, fake, k)
    expected = _brute_force_prdc(real, fake, k)
    np.testing.assert_allclose([ours.precision, ours.recall, ours.density, ours.coverage], expected, rtol=1e-12)


def test_prdc_sees_mode_collapse_as_lost_recall_and_coverage():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 2, generator=g)
    collapsed = real[real[:, 0] > 0.8][:20] + 0.01 * torch.randn(20, 2, generator=g)
    spread = torch.randn(200, 2, generator=g)
    good, bad = prdc(real, spread, 5), prdc(real, collapsed, 5)
    assert bad.recall < good.recall and bad.coverage < good.coverage
    assert bad.precision > 0.8


def test_knn_radii_exclude_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(knn_radii(x, 1), torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(knn_radii(x, 2), torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=torch.float64))


def test_bad_metric_inputs_are_refused():
    with pytest.raises(ValueError, match="real has 4 rows"):
        prdc(torch.randn(4, 2), torch.randn(10, 2), k=5)
    with pytest.raises(ValueError, match="features"):
        fid_from_features(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(torch.full((10, 3), float("nan")), torch.randn(10, 3))


def test_class_histogram_and_its_distance_to_uniform():
    h = class_histogram(torch.tensor([0, 0, 1, 3]), 4)
    torch.testing.assert_close(h, torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64))
    assert total_variation_to_uniform(h) == pytest.approx(0.25)
    assert total_variation_to_uniform(class_histogram(torch.zeros(10, dtype=torch.long), 4)) == pytest.approx(0.75)


def test_feature_net_learns_the_real_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1) * 2 - 1
    y = torch.tensor(d.target)
    net = train_feature_net(x[:1000], y[:1000], seed=0, options=FeatureNetOptions(n_epochs=4))
    assert accuracy(net, x[1000:], y[1000:]) > 0.85
    assert net.embed(x[:7]).shape == (7, 64)
    again = train_feature_net(x[:1000], y[:1000], seed=0, options=FeatureNetOptions(n_epochs=4))
    torch.testing.assert_close(net.embed(x[:20]), again.embed(x[:20]))
