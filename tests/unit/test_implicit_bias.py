import numpy as np
import pytest
import scipy.optimize
import torch

from imprint.models.mlp import MLP
from imprint.reconstruction.implicit_bias import fit_kkt_multipliers, kkt_fit, nnls_gram, output_jacobian


def _exact_kkt_network():
    """A 2-layer bias-free ReLU net that is an exact KKT point for two orthogonal examples.

    Hidden block k is W_k = |v_k| x_k^T / ||x_k|| with output weights v_k (positive for y=+1, negative for
    y=-1) and ||v_k|| = 1: then theta = sum_k lam_k y_k grad Phi(x_k) with lam_k = 1/||x_k||, and the
    margin of x_k is ||x_k||; equal norms put both on the margin (complementary slackness).
    """
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    v1 = torch.tensor([0.6, 0.8], dtype=torch.float64)  # ||v1|| = 1
    v2 = -torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # ||v2|| = 1
    w = torch.cat([torch.outer(v1.abs(), x[0]) / x[0].norm(), torch.outer(v2.abs(), x[1]) / x[1].norm()])
    net = MLP(4, (5,), 1).double()
    net.layers[0].weight.data = w
    net.layers[1].weight.data = torch.cat([v1, v2])[None]
    return net, x, y


def test_exact_kkt_point_has_zero_residual():
    net, x, y = _exact_kkt_network()
    fit = kkt_fit(net, x, y)
    assert fit.rel_residual < 1e-10
    np.testing.assert_allclose(fit.lam, [1 / 3, 1 / 3], rtol=1e-8)
    np.testing.assert_allclose(fit.margins, [3.0, 3.0], rtol=1e-12)
    assert all(r < 1e-10 for r in fit.layer_residuals.values())


def test_perturbed_point_has_positive_residual():
    net, x, y = _exact_kkt_network()
    net.layers[0].weight.data[0, 1] += 0.3  # a direction no training gradient spans
    assert kkt_fit(net, x, y).rel_residual > 0.05


def test_output_jacobian_matches_loop_of_backward_passes():
    net = MLP(3, (4, 5), 1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    jac = output_jacobian(net, x, chunk_size=4)
    for i in range(6):
        net.zero_grad()
        net(x[i:i + 1]).sum().backward()
        row = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        torch.testing.assert_close(jac[i], row)


def test_output_jacobian_rejects_vector_outputs():
    with pytest.raises(ValueError, match="scalar output"):
        output_jacobian(MLP(3, (4,), 2), torch.randn(2, 3))


def test_nnls_recovers_known_multipliers_and_matches_scipy():
    gen = np.random.default_rng(0)
    a = gen.normal(size=(200, 12))
    lam_true = np.abs(gen.normal(size=12))
    lam_true[[1, 5, 7]] = 0.0
    theta = a @ lam_true
    jac = torch.tensor(a.T)  # rows are the "gradients"
    lam, residual = fit_kkt_multipliers(jac, torch.tensor(theta), torch.ones(12, dtype=torch.float64))
    np.testing.assert_allclose(lam, lam_true, atol=1e-9)
    assert float(residual.norm()) < 1e-8
    # a theta outside the cone: same optimum as scipy's NNLS on the full matrix
    theta_off = theta + gen.normal(size=200)
    ref, ref_norm = scipy.optimize.nnls(a, theta_off)
    lam2, res2 = fit_kkt_multipliers(jac, torch.tensor(theta_off), torch.ones(12, dtype=torch.float64))
    np.testing.assert_allclose(lam2, ref, atol=1e-7)
    assert float(res2.norm()) == pytest.approx(ref_norm, rel=1e-9)


def test_labels_enter_with_their_sign():
    gen = np.random.default_rng(1)
    a = gen.normal(size=(50, 4))
    y = np.array([1.0, -1.0, 1.0, -1.0])
    lam_true = np.array([0.5, 1.0, 0.0, 2.0])
    theta = a @ (y * lam_true)
    lam, residual = fit_kkt_multipliers(torch.tensor(a.T), torch.tensor(theta), torch.tensor(y))
    np.testing.assert_allclose(lam, lam_true, atol=1e-9)


def test_nnls_gram_of_zero_matrix():
    assert not nnls_gram(torch.zeros(3, 3), torch.zeros(3)).any()


def test_singular_gram_gives_bounded_multipliers_and_scipys_residual():
    """A random network whose gradient Gram matrix is singular: the fit must match scipy's NNLS on the
    full matrix (residual <= 1, since lam = 0 already gives 1) with bounded multipliers."""
    torch.manual_seed(0)
    net = MLP(5, [6, 4], 1).double()
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.tensor([1.0, -1, 1, -1, 1, -1, 1], dtype=torch.float64)
    fit = kkt_fit(net, x, y)
    jac = output_jacobian(net, x).numpy()
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    _, ref = scipy.optimize.nnls((jac * y.numpy()[:, None]).T, theta)
    assert fit.rel_residual == pytest.approx(ref / np.linalg.norm(theta), abs=1e-6)
    assert fit.lam.max() < 1e3
