"""ModifiedReLU and the one-backward KKT stationarity loss against float64 references."""

import math

import pytest
import torch

from imprint.models.mlp import MLP
from imprint.reconstruction.kkt import (ModifiedReLU, box_prior, candidate_labels, check_weights,
                                        extraction_model, kkt_stationarity_loss, lambda_prior, model_weights,
                                        modified_relu, reference_kkt_residuals)



@pytest.fixture(autouse=True)
def float64_and_seeded():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def random_weights(dims, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, a, generator=gen) * scale / math.sqrt(a) for a, b in zip(dims[:-1], dims[1:])]


# ---------------------------------------------------------------------------------------------- ModifiedReLU

def test_modified_relu_forward_is_relu_and_backward_is_sigmoid_surrogate():
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    alpha = 3.0
    y = modified_relu(x, alpha)
    assert torch.equal(y, torch.relu(x))
    g = torch.randn(41)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(gx, g * torch.sigmoid(alpha * x.detach()), rtol=0, atol=1e-15)


def test_modified_relu_double_backward_matches_closed_form():
    x = torch.randn(30, requires_grad=True)
    alpha = 2.5
    g = torch.randn(30)
    (gx,) = torch.autograd.grad(modified_relu(x, alpha), x, g, create_graph=True)
    v = torch.randn(30)
    (ggx,) = torch.autograd.grad(gx, x, v)
    s = torch.sigmoid(alpha * x.detach())
    assert torch.allclose(ggx, v * g * alpha * s * (1 - s), rtol=1e-12, atol=1e-14)


def test_modified_relu_passes_gradgradcheck():
    # second derivatives (w.r.t. input and incoming gradient) against finite differences of the backward
    x = torch.randn(12, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: modified_relu(t, 1.7), (x,), eps=1e-6, atol=1e-6)


def test_modified_relu_tends_to_relu_derivative_for_large_alpha():
    x = torch.tensor([-1.0, -0.1, 0.1, 1.0], requires_grad=True)
    (gx,) = torch.autograd.grad(modified_relu(x, 1e4).sum(), x)
    assert torch.equal(gx, torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_modified_relu_broadcasts_one_alpha_per_configuration():
    x = torch.randn(3, 4, 5, requires_grad=True)
    alpha = torch.tensor([1.0, 5.0, 50.0]).reshape(3, 1, 1)
    (gx,) = torch.autograd.grad(modified_relu(x, alpha).sum(), x)
    for k in range(3):
        assert torch.allclose(gx[k], torch.sigmoid(float(alpha[k]) * x[k].detach()))


def test_modified_relu_works_under_torch_func():
    # per-sample input gradients with vmap(grad) against a loop
    x = torch.randn(6, 4)
    w = torch.randn(3, 4)

    def f(xi):
        return modified_relu(w @ xi, 2.0).sum()

    batched = torch.func.vmap(torch.func.grad(f))(x)
    looped = torch.stack([torch.autograd.grad(f(xi.clone().requires_grad_()), xi)[0]
                          for xi in (r.clone().requires_grad_() for r in x)])
    assert torch.allclose(batched, looped)


def test_modified_relu_module_rejects_nonpositive_alpha():
    with pytest.raises(ValueError, match="alpha"):
        ModifiedReLU(0.0)


def test_extraction_model_keeps_weights_and_outputs():
    model = MLP(5, [7, 6], 1).double()
    ext = extraction_model(model, 10.0)
    assert isinstance(ext.activation, ModifiedReLU)
    for a, b in zip(model_weights(model), model_weights(ext)):
        assert torch.equal(a, b)
    x = torch.randn(4, 5)
    assert torch.allclose(model(x), ext(x))


# ------------------------------------------------------------------------------------------- KKT loss

@pytest.mark.parametrize("form,d_out", [("binary", 1), ("multiclass", 3), ("multiclass_all", 3), ("general", 1),
                                        ("general", 3)])
def test_one_backward_loss_equals_per_candidate_loop(form, d_out):
    weights = random_weights([6, 9, 8, d_out], seed=1)
    k, m = 3, 7
    x = torch.randn(k, m, 6)
    lam = {"general": torch.randn(k, m), "multiclass_all": torch.rand(k, m, d_out)}.get(form, torch.rand(k, m))
    y = candidate_labels(m, n_classes=2 if d_out == 1 else d_out, signed=(d_out == 1))
    alpha = torch.tensor([3.0, 20.0, 150.0])
    fast = kkt_stationarity_loss(weights, x, lam, y, alpha, form)
    for i in range(k):
        res = reference_kkt_residuals(weights, x[i], lam[i], y, float(alpha[i]), form)
        assert torch.allclose(fast[i], sum((r**2).sum() for r in res), rtol=1e-11)


def closed_form_two_layer_loss(w, v, x, lam, y, alpha):
    """sum ||theta - (1/m) sum_j lam_j y_j grad Phi(x_j)||^2 for Phi(x) = v . relu(W x), written out by hand."""
    z = x @ w.T  # [m, h]
    # value relu(z), derivative sigmoid(alpha z): softplus_alpha's derivative, attached to relu's value
    soft = torch.nn.functional.softplus(alpha * z) / alpha
    grad_v = torch.relu(z).detach() + soft - soft.detach()  # dPhi/dv
    grad_w = (v[0] * torch.sigmoid(alpha * z)).unsqueeze(-1) * x.unsqueeze(1)  # dPhi/dW with the surrogate
    c = (lam * y) / x.shape[0]
    res_v = v[0] - (c[:, None] * grad_v).sum(0)
    res_w = w - (c[:, None, None] * grad_w).sum(0)
    return (res_v**2).sum() + (res_w**2).sum()


def test_loss_matches_hand_written_two_layer_formula_and_its_gradient():
    w, v = random_weights([5, 8, 1], seed=2)
    m = 6
    x = torch.randn(1, m, 5, requires_grad=True)
    lam = torch.rand(1, m, requires_grad=True)
    y = candidate_labels(m, signed=True).double()
    alpha = 4.0
    fast = kkt_stationarity_loss([w, v], x, lam, y, torch.tensor([alpha]))
    ref = closed_form_two_layer_loss(w, v, x[0], lam[0], y, alpha)
    assert torch.allclose(fast[0], ref, rtol=1e-12)
    gx, gl = torch.autograd.grad(fast.sum(), (x, lam))
    rx, rl = torch.autograd.grad(ref, (x, lam))
    assert torch.allclose(gx, rx, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gl, rl, rtol=1e-10, atol=1e-12)


def test_gradient_matches_per_candidate_loop_through_second_order_terms():
    weights = random_weights([4, 6, 5, 1], seed=3)
    m = 5
    x = torch.randn(1, m, 4, requires_grad=True)
    lam = torch.rand(1, m, requires_grad=True)
    y = candidate_labels(m, signed=True)
    fast = kkt_stationarity_loss(weights, x, lam, y, torch.tensor([7.0]))
    gx, gl = torch.autograd.grad(fast.sum(), (x, lam))
    # the loop keeps each candidate's backward graph (create_graph), so its loss is differentiable too
    x2 = x.detach()[0].clone().requires_grad_()
    l2 = lam.detach()[0].clone().requires_grad_()
    loop = sum((r**2).sum() for r in reference_kkt_residuals(weights, x2, l2, y, 7.0))
    assert torch.allclose(fast[0], loop, rtol=1e-12)
    rx, rl = torch.autograd.grad(loop, (x2, l2))
    assert torch.allclose(gx[0], rx, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gl[0], rl, rtol=1e-10, atol=1e-12)


def central_difference(f, t, eps=1e-6):
    g = torch.zeros_like(t)
    flat = t.reshape(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = f().item()
        flat[i] = old - eps
        down = f().item()
        flat[i] = old
        g.reshape(-1)[i] = (up - down) / (2 * eps)
    return g


def test_lambda_gradient_matches_finite_differences():
    weights = random_weights([4, 6, 5, 1], seed=4)
    x = torch.randn(1, 5, 4)
    lam = torch.rand(1, 5)
    y = candidate_labels(5, signed=True)
    alpha = torch.tensor([5.0])
    lam_v = lam.clone().requires_grad_()
    (gl,) = torch.autograd.grad(kkt_stationarity_loss(weights, x, lam_v, y, alpha).sum(), lam_v)
    fd = central_difference(lambda: kkt_stationarity_loss(weights, x, lam, y, alpha).sum(), lam)
    assert torch.allclose(gl, fd, rtol=1e-7, atol=1e-8)


def test_input_gradient_matches_finite_differences_in_the_relu_limit():
    # with a sharp surrogate and no pre-activation near a kink, the surrogate derivative is the ReLU's
    # own, so the loss is an ordinary smooth function of x there and finite differences must agree
    weights = random_weights([4, 6, 5, 1], seed=5)
    x = torch.randn(1, 5, 4)
    z1 = x @ weights[0].T
    z2 = torch.relu(z1) @ weights[1].T
    assert z1.abs().min() > 1e-3 and z2.abs().min() > 1e-3
    lam = torch.rand(1, 5)
    y = candidate_labels(5, signed=True)
    alpha = torch.tensor([1e5])
    x_v = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(kkt_stationarity_loss(weights, x_v, lam, y, alpha).sum(), x_v)
    fd = central_difference(lambda: kkt_stationarity_loss(weights, x, lam, y, alpha).sum(), x)
    assert torch.allclose(gx, fd, rtol=1e-6, atol=1e-7)


def exact_kkt_point(m_half=4, d=5, hidden=6, seed=0):
    """A two-layer network, candidates and multipliers that satisfy theta = (1/m) sum_j lam_j y_j grad Phi(x_j)
    exactly, with every neuron active on half of the candidates and inactive on the other half.

    Neurons point along a unit vector s (w = a s, v = a) or against it (w = -b s, v = -b). Positive
    candidates have s.x > 0 and (1/m) sum lam x = s; negative ones mirror them (plus a perturbation whose
    lam-weighted sum is zero), so (1/m) sum lam x = -s over them. Then both layers' stationarity holds.
    """
    gen = torch.Generator().manual_seed(seed)
    m = 2 * m_half
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    pos = direction * (1.0 + torch.rand(m_half, 1, generator=gen)) + 0.3 * torch.randn(m_half, d, generator=gen)
    lam_pos = 0.5 + torch.rand(m_half, generator=gen)
    u = (lam_pos[:, None] * pos).sum(0) / m
    s = u / u.norm()
    lam_pos = lam_pos / u.norm()  # now (1/m) sum lam x = s exactly
    noise = 0.1 * torch.randn(m_half, d, generator=gen)
    noise -= (lam_pos[:, None] * noise).sum(0) / lam_pos.sum()
    neg = -pos + noise
    x = torch.cat([neg, pos])
    lam = torch.cat([lam_pos, lam_pos])
    y = candidate_labels(m, signed=True)
    scales = 0.5 + torch.rand(hidden, generator=gen)
    signs = torch.where(torch.arange(hidden) % 2 == 0, 1.0, -1.0)
    w = (signs * scales)[:, None] * s[None, :]
    v = (signs * scales)[None, :]
    assert ((x @ s) * y > 0.05).all()  # no candidate sits near a kink
    return [w, v], x, lam, y


def test_loss_vanishes_with_zero_gradient_at_a_constructed_kkt_point():
    weights, x, lam, y = exact_kkt_point()
    xv = x[None].clone().requires_grad_()
    lv = lam[None].clone().requires_grad_()
    loss = kkt_stationarity_loss(weights, xv, lv, y, torch.tensor([1e4]))
    theta_sq = sum((w**2).sum() for w in weights)
    assert loss.item() < 1e-24 * theta_sq
    gx, gl = torch.autograd.grad(loss.sum(), (xv, lv))
    assert gx.abs().max() < 1e-10 and gl.abs().max() < 1e-10
    # and it is a strict zero: moving one candidate makes the loss positive
    moved = x.clone()
    moved[0] += 0.01
    assert kkt_stationarity_loss(weights, moved[None], lam[None], y, torch.tensor([1e4])).item() > 1e-8


def test_constructed_kkt_point_in_multiclass_and_general_forms():
    (w, v), x, lam, y = exact_kkt_point(seed=1)
    # general form: lam of free sign absorbs the label
    loss = kkt_stationarity_loss([w, v], x[None], (lam * y)[None], y, torch.tensor([1e4]), "general")
    assert loss.item() < 1e-24
    # multiclass with two outputs V = [-v/2; v/2]: rescaling W by 1/sqrt(2) and lam by 1/sqrt(2) keeps it exact
    beta = 1 / math.sqrt(2)
    classes = (y > 0).long()
    weights = [beta * w, torch.cat([-v / 2, v / 2])]
    loss = kkt_stationarity_loss(weights, x[None], (lam * beta)[None], classes, torch.tensor([1e4]), "multiclass")
    assert loss.item() < 1e-24


def test_priors_match_their_definitions():
    x = torch.tensor([[[-1.5, 0.0, 1.2]]])
    assert torch.allclose(box_prior(x), torch.tensor([0.25 + 0.04]))
    lam = torch.tensor([[0.1, 0.6], [0.0, 1.0]])
    got = lambda_prior(lam, torch.tensor([0.5, 0.2]), weight=5.0)
    assert torch.allclose(got, torch.tensor([5 * 0.4**2, 5 * 0.2**2]))


def test_bad_weights_and_labels_are_refused():
    w = random_weights([4, 6, 1])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        check_weights([w[0], torch.randn(1, 5)])
    with pytest.raises(ValueError, match="d_in=3"):
        check_weights(w, d_in=3)
    with pytest.raises(ValueError, match="n_candidates"):
        candidate_labels(1, n_classes=2)
    model = MLP(4, [6], 1)
    model.layers[0] = torch.nn.Linear(4, 6, bias=True)
    with pytest.raises(ValueError, match="bias"):
        model_weights(model)


def test_one_network_per_configuration_equals_separate_networks():
    nets = [random_weights([5, 7, 6, 1], seed=s) for s in range(3)]
    stacked = [torch.stack([net[i] for net in nets]) for i in range(3)]
    x = torch.randn(3, 4, 5)
    lam = torch.rand(3, 4)
    y = candidate_labels(4, signed=True)
    alpha = torch.tensor([5.0, 10.0, 20.0])
    together = kkt_stationarity_loss(stacked, x, lam, y, alpha)
    for k in range(3):
        alone = kkt_stationarity_loss(nets[k], x[k:k + 1], lam[k:k + 1], y, alpha[k:k + 1])
        assert torch.allclose(together[k], alone[0], rtol=1e-12)
    with pytest.raises(ValueError, match="stacks 2 networks"):
        check_weights([stacked[0], stacked[1][:2], stacked[2]])
    with pytest.raises(ValueError, match="one per configuration"):
        check_weights(stacked, n_configs=5)


def test_multiclass_all_with_two_classes_equals_the_max_competitor_form():
    weights = random_weights([5, 7, 2], seed=6)
    x, lam = torch.randn(2, 6, 5), torch.rand(2, 6)
    y = candidate_labels(6, n_classes=2)
    alpha = torch.tensor([5.0, 50.0])
    per_class = lam.unsqueeze(-1).expand(-1, -1, 2).clone()
    assert torch.allclose(kkt_stationarity_loss(weights, x, per_class, y, alpha, "multiclass_all"),
                          kkt_stationarity_loss(weights, x, lam, y, alpha, "multiclass"), rtol=1e-12)


@pytest.mark.parametrize("form,d_out", [("binary", 1), ("general", 1), ("multiclass_all", 3), ("general", 3)])
def test_residual_is_the_weight_decay_training_gradient(form, d_out):
    """With multipliers read off the loss derivative, the KKT residual of every form is the gradient of
    mean loss + wd/2 ||theta||^2 divided by wd, at ANY theta: checked against the trainer's hand-written
    backward (so at a stationary point of weight-decayed training the loss is exactly zero)."""
    from imprint.models.mlp import batched_grads, batched_forward

    gen = torch.Generator().manual_seed(7)
    n, d, wd = 9, 5, 0.03
    weights = [torch.randn(12, d, generator=gen), torch.randn(10, 12, generator=gen) / 3,
               torch.randn(d_out, 10, generator=gen) / 3]
    x = torch.randn(n, d, generator=gen)
    out, pre = batched_forward([w[None] for w in weights], x[None])
    assert min(float(z.abs().min()) for z in pre) > 1e-6  # no kink: the surrogate below is the ReLU's derivative
    out = out[0]
    if d_out == 1:
        y = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
        q = y * out[:, 0]
        lam = torch.sigmoid(-q) / wd if form == "binary" else torch.sigmoid(-q) * y / wd
        grads = batched_grads([w[None] for w in weights], x[None], y[None], "logistic", wd)
        labels = y
    else:
        labels = torch.arange(n) % d_out
        p = torch.softmax(out, -1)
        lam = p / wd if form == "multiclass_all" else torch.full((n,), -1.0 / wd)
        grads = batched_grads([w[None] for w in weights], x[None], labels[None], "cross_entropy", wd)
    loss = kkt_stationarity_loss(weights, x[None], lam[None], labels, torch.tensor([1e9]), form)
    expected = sum((g[0] ** 2).sum() for g in grads) / wd**2
    assert torch.allclose(loss[0], expected, rtol=1e-9)


def test_per_class_multiplier_prior():
    lam = torch.tensor([[[0.9, 0.05, -0.1], [0.2, 0.3, 0.0]]])  # two candidates, three classes
    y = torch.tensor([0, 2])
    got = lambda_prior(lam, torch.tensor([0.5]), weight=2.0, y=y)
    # candidate 0 (class 0): total 0.05 - 0.1 = -0.05 -> (0.55)^2, and -0.1 < 0 -> 0.1^2
    # candidate 1 (class 2): total 0.5 -> 0; no negative entry among its competitors
    assert torch.allclose(got, torch.tensor([2.0 * (0.55**2 + 0.1**2)]))
    with pytest.raises(ValueError, match="y is needed"):
        lambda_prior(lam, torch.tensor([0.5]))


def test_constraint_gradients_and_residual_against_references():
    import scipy.optimize

    from imprint.reconstruction.kkt import constraint_gradients, kkt_residual

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 5, generator=gen)
    # binary rows against a per-sample autograd loop, the residual against scipy's NNLS on the full matrix
    model = MLP(5, [6, 4], 1).double()
    weights = model_weights(model)
    y = torch.where(torch.arange(7) % 2 == 0, 1.0, -1.0)
    rows = constraint_gradients(weights, x, y, "binary")
    for i in range(7):
        g = torch.autograd.grad(y[i] * model(x[i:i + 1])[0, 0], list(model.parameters()))
        assert torch.allclose(rows[i], torch.cat([t.reshape(-1) for t in g]))
    theta = torch.cat([w.reshape(-1) for w in weights])
    _, norm = scipy.optimize.nnls(rows.T.numpy(), theta.numpy())
    assert abs(kkt_residual(weights, x, y, "binary") - norm / float(theta.norm())) < 1e-10
    # multiclass: each row is the gradient of a margin, checked by autograd one constraint at a time
    w3 = random_weights([5, 6, 3], seed=9)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    rows = constraint_gradients(w3, x, labels, "multiclass_all")
    assert rows.shape == (7 * 2, sum(w.numel() for w in w3))
    params = [w.clone().requires_grad_() for w in w3]
    out = torch.relu(x[3] @ params[0].T) @ params[1].T
    g = torch.autograd.grad(out[0] - out[2], params)
    blocks = [[i for i in range(7) if labels[i] != k] for k in range(3)]
    row = len(blocks[0]) + len(blocks[1]) + blocks[2].index(3)
    assert torch.allclose(rows[row], torch.cat([t.reshape(-1) for t in g]))
    # one multiplier per competitor can only fit better than one per sample
    assert kkt_residual(w3, x, labels, "multiclass_all") <= kkt_residual(w3, x, labels, "multiclass") + 1e-12


def test_fitted_multipliers_reach_zero_residual_at_a_constructed_kkt_point():
    from imprint.reconstruction.kkt import fit_kkt_multipliers

    weights, x, lam, y = exact_kkt_point(seed=2)
    fitted, residual = fit_kkt_multipliers(weights, x, y.double(), "binary")
    assert residual < 1e-7
    assert (fitted >= 0).all() and fitted.shape == (len(x),)
    # the residual is not trivially small: on other inputs the same weights are far from stationary
    assert fit_kkt_multipliers(weights, torch.randn(8, 5), y.double(), "binary")[1] > 0.1
