"""The closed-form lifts of chapter 06 against float64 least squares and scikit-learn's ridge."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from imprint.bridge.decoders import decoded_cosine, fit_ridge_lift, gram_pinv, min_norm_lift

D = torch.float64


def _update(g, a, lr, s):
    """One SGD step of ``W0 + s B A`` from ``B = 0``: ``Delta B = -lr s G A^T``, ``Delta W = s Delta B A``."""
    return s * (-lr * s * g @ a.T) @ a


@pytest.mark.parametrize("method", ["svd", "pinv"])
def test_lift_recovers_a_gradient_in_the_row_space_of_a(method):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 10, generator=gen, dtype=D)
    g = torch.randn(5, 3, generator=gen, dtype=D) @ a  # rows in A's row space
    lifted = min_norm_lift(_update(g, a, 0.1, 2.0), a, lr=0.1, scaling=2.0, method=method)
    torch.testing.assert_close(lifted, g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["svd", "pinv"])
def test_lift_is_the_least_norm_solution_of_the_update_equation(method):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 12, generator=gen, dtype=D)
    g = torch.randn(2, 6, 12, generator=gen, dtype=D)  # a batch of two updates, generic gradients
    lr, s = 0.05, 0.5
    dw = _update(g, a, lr, s)
    lifted = min_norm_lift(dw, a, lr=lr, scaling=s, method=method)
    gram = (a.T @ a).numpy()
    for k in range(2):
        # G_hat A^T A = -dW / (lr s^2), i.e. (A^T A) G_hat^T = rhs^T; numpy's lstsq is the minimum-norm solution
        rhs = (-dw[k] / (lr * s ** 2)).numpy()
        reference = np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T
        np.testing.assert_allclose(lifted[k].numpy(), reference, rtol=0, atol=1e-9)
        assert not np.allclose(reference, g[k].numpy(), atol=1e-3)  # generic G is not recovered
    # and it is the projection of G onto A's row space
    proj = torch.linalg.pinv(a) @ a
    torch.testing.assert_close(lifted, g @ proj, rtol=0, atol=1e-9)


def test_both_forms_of_the_pseudo_inverse_agree_on_a_rank_deficient_factor():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 8, generator=gen, dtype=D)
    a = torch.cat([a, a[:1] * 3.0])  # rank 2 of 3 rows
    torch.testing.assert_close(gram_pinv(a, "svd"), gram_pinv(a, "pinv"), rtol=0, atol=1e-9)
    torch.testing.assert_close(gram_pinv(a, "svd"), torch.linalg.pinv(a.T @ a), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n", [40, 7])  # primal (n >= features) and dual (n < features) systems
def test_ridge_lift_matches_sklearn(n):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 12))
    y = rng.normal(size=(n, 30))
    lift = fit_ridge_lift(torch.from_numpy(x), torch.from_numpy(y), alpha=0.7)
    ref = Ridge(alpha=0.7, fit_intercept=False).fit(x, y)
    np.testing.assert_allclose(lift.weight.numpy(), ref.coef_.T, rtol=0, atol=1e-10)
    x_new = rng.normal(size=(3, 12))
    np.testing.assert_allclose(lift(torch.from_numpy(x_new)).numpy(), ref.predict(x_new), rtol=0, atol=1e-10)


def test_ridge_lift_learns_a_linear_decoder_from_proxy_pairs():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 9, generator=gen, dtype=D)
    # gradients of a linear layer, G = delta x^T, with inputs on a 3-dim subspace the decoder can learn
    basis = torch.randn(3, 9, generator=gen, dtype=D)
    x = torch.randn(200, 3, generator=gen, dtype=D) @ basis
    delta = torch.randn(200, 4, generator=gen, dtype=D)
    g = delta[:, :, None] * x[:, None, :]
    db = -0.1 * g @ a.T
    lift = fit_ridge_lift(db.flatten(1)[:150], g.flatten(1)[:150], alpha=1e-6)
    decoded = lift(db.flatten(1)[150:]).reshape(-1, 4, 9)
    learned = decoded_cosine(decoded, g[150:])
    closed = decoded_cosine(min_norm_lift(db[150:] @ a, a, lr=0.1), g[150:])
    assert learned.shape == (50,)
    assert float(learned.mean()) > float(closed.mean()) + 0.05


def test_decoded_cosine_per_layer_against_a_hand_computation():
    gen = torch.Generator().manual_seed(5)
    g = {"fc1": torch.randn(3, 4, generator=gen, dtype=D), "fc2": torch.randn(2, 3, generator=gen, dtype=D)}
    g_hat = {"fc1": -2.0 * g["fc1"], "fc2": torch.randn(2, 3, generator=gen, dtype=D)}
    cos = decoded_cosine(g_hat, g)
    assert float(cos["fc1"]) == pytest.approx(-1.0, abs=1e-12)
    u, v = g_hat["fc2"].flatten().numpy(), g["fc2"].flatten().numpy()
    assert float(cos["fc2"]) == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), abs=1e-12)
    assert float(decoded_cosine(torch.zeros(2, 3, dtype=D), g["fc2"])) == 0.0


def test_bad_input_is_refused_naming_the_parameter():
    a = torch.randn(3, 10, dtype=D)
    with pytest.raises(ValueError, match=r"lora_a has shape \(0, 10\).*rank r >= 1"):
        min_norm_lift(torch.zeros(5, 10, dtype=D), torch.zeros(0, 10, dtype=D), lr=0.1)
    with pytest.raises(ValueError, match=r"delta_w has shape \(5, 9\).*\[\.\.\., out, 10\]"):
        min_norm_lift(torch.zeros(5, 9, dtype=D), a, lr=0.1)
    with pytest.raises(ValueError, match=r"lr=0.0: expected a number > 0"):
        min_norm_lift(torch.zeros(5, 10, dtype=D), a, lr=0.0)
    with pytest.raises(ValueError, match=r"method='qr'"):
        min_norm_lift(torch.zeros(5, 10, dtype=D), a, lr=0.1, method="qr")
    with pytest.raises(ValueError, match=r"targets has shape \(4, 3\): expected \[5, n_targets\]"):
        fit_ridge_lift(torch.zeros(5, 2, dtype=D), torch.zeros(4, 3, dtype=D), alpha=1.0)
    with pytest.raises(ValueError, match=r"features has shape \(5, 0\)"):
        fit_ridge_lift(torch.zeros(5, 0, dtype=D), torch.zeros(5, 3, dtype=D), alpha=1.0)
    with pytest.raises(ValueError, match=r"alpha=-1.0: expected a number > 0"):
        fit_ridge_lift(torch.zeros(5, 2, dtype=D), torch.zeros(5, 3, dtype=D), alpha=-1.0)
    lift = fit_ridge_lift(torch.randn(5, 2, dtype=D), torch.randn(5, 3, dtype=D), alpha=1.0)
    with pytest.raises(ValueError, match=r"features has shape \(1, 4\): expected \[\.\.\., 2\]"):
        lift(torch.zeros(1, 4, dtype=D))
    with pytest.raises(ValueError, match=r"g_hat\['fc'\] has shape \(2, 3\) and g\['fc'\] \(3, 2\)"):
        decoded_cosine({"fc": torch.zeros(2, 3)}, {"fc": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"expected the same layer names"):
        decoded_cosine({"fc": torch.zeros(2, 3)}, {"fc2": torch.zeros(2, 3)})
