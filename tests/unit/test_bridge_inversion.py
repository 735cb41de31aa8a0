"""Inverting Gradients of chapter 06: the matching loss and TV against hand computations, the batched
attack on a one-hidden-layer model of 4x4 images, several targets (with their own labels and seeds)
inverted as one batch against each inverted alone, and the start of the restarts."""

import numpy as np
import pytest
import torch
from torch import nn

from imprint.bridge.inversion import (decay_milestones, gradient_matching_loss, invert_gradients,
                                      invert_gradients_batch, model_gradients, total_variation)

D = torch.float64
SHAPE = (1, 1, 4, 4)


def _correlation(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / a.norm() / b.norm())


def _case(seed):
    """A sigmoid MLP 16-8-3 at random weights, one random 4x4 image in [0, 1], its label and true gradient."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 3)).to(D).eval()
    gen = torch.Generator().manual_seed(100 + seed)
    image = torch.rand(SHAPE, generator=gen, dtype=D)
    labels = torch.tensor([1])
    return model, image, labels, model_gradients(model, image, labels), gen


def test_matching_loss_at_identical_orthogonal_and_opposite_gradients():
    a = [torch.tensor([[1.0, 2.0]], dtype=D), torch.tensor([3.0], dtype=D)]
    b = [torch.tensor([[-2.0, 1.0]], dtype=D), torch.tensor([0.0], dtype=D)]  # orthogonal to a
    assert float(gradient_matching_loss(a, a)) == pytest.approx(0.0, abs=1e-12)
    assert float(gradient_matching_loss(a, [2.0 * t for t in a])) == pytest.approx(0.0, abs=1e-12)
    assert float(gradient_matching_loss(a, b)) == pytest.approx(1.0, abs=1e-12)
    assert float(gradient_matching_loss(a, [-t for t in a])) == pytest.approx(2.0, abs=1e-12)
    assert float(gradient_matching_loss(a, [torch.zeros_like(t) for t in a])) == pytest.approx(1.0, abs=1e-12)


def test_matching_loss_is_one_cosine_over_all_layers_with_weighted_layers():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (3,), (2, 3)]
    a = [rng.normal(size=s) for s in shapes]
    b = [rng.normal(size=s) for s in shapes]
    w = [0.5, 2.0, 1.5]
    dot = sum(wi * (x * y).sum() for wi, x, y in zip(w, a, b))
    na = sum(wi * (x * x).sum() for wi, x in zip(w, a))
    nb = sum(wi * (y * y).sum() for wi, y in zip(w, b))
    ta, tb = [torch.from_numpy(x) for x in a], [torch.from_numpy(y) for y in b]
    assert float(gradient_matching_loss(ta, tb, w)) == pytest.approx(1 - dot / np.sqrt(na * nb), abs=1e-12)
    flat = np.concatenate([x.ravel() for x in a]) @ np.concatenate([y.ravel() for y in b])
    norms = (np.linalg.norm(np.concatenate([x.ravel() for x in a]))
             * np.linalg.norm(np.concatenate([y.ravel() for y in b])))
    assert float(gradient_matching_loss(ta, tb)) == pytest.approx(1 - flat / norms, abs=1e-12)
    per_layer = np.mean([1 - (x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    assert abs(float(gradient_matching_loss(ta, tb)) - per_layer) > 1e-3  # not the mean of per-layer cosines


def test_total_variation_against_a_loop_over_pixels():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=D)
    b, c, h, w = x.shape
    horizontal = [abs(float(x[i, j, r, q + 1] - x[i, j, r, q])) for i in range(b) for j in range(c) for r in range(h)
                  for q in range(w - 1)]
    vertical = [abs(float(x[i, j, r + 1, q] - x[i, j, r, q])) for i in range(b) for j in range(c) for r in range(h - 1)
                for q in range(w)]
    assert float(total_variation(x)) == pytest.approx(np.mean(horizontal) + np.mean(vertical), abs=1e-12)


def test_step_size_decays_at_three_five_and_seven_eighths():
    assert decay_milestones(8000) == [3000, 5000, 7000]
    assert decay_milestones(200) == [75, 125, 175]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inversion_recovers_the_image_from_its_gradient_and_not_from_a_random_one(seed, one_torch_thread):
    model, image, labels, true_grads, gen = _case(seed)
    random_grads = {}
    for name, g in true_grads.items():
        r = torch.randn(g.shape, generator=gen, dtype=D)
        random_grads[name] = r * g.norm() / r.norm()  # the same norm per layer
    kw = dict(steps=200, lr=0.1, tv_weight=1e-4, restarts=3, seed=0)
    true = invert_gradients(model, true_grads, labels, SHAPE, **kw)
    control = invert_gradients(model, random_grads, labels, SHAPE, **kw)
    # measured over seeds 0..9: correlation >= 0.9994 from the true gradient; |correlation| <= 0.42 from a
    # random one (0.12, 0.07, 0.19 at seeds 0-2), whose matching loss stays >= 0.77
    assert _correlation(true.images, image) > 0.99
    assert float(true.losses.max()) < 1e-4
    assert abs(_correlation(control.images, image)) < 0.5
    assert float(control.losses.min()) > 0.5


def test_batched_restarts_equal_each_restart_alone_and_the_best_is_returned(one_torch_thread):
    model, image, labels, true_grads, gen = _case(3)
    noisy = {n: g + 0.3 * g.norm() / g.numel() ** 0.5 * torch.randn(g.shape, generator=gen, dtype=D)
             for n, g in true_grads.items()}  # restarts then end at different losses
    kw = dict(steps=60, lr=0.1, tv_weight=1e-3, box=(0.0, 1.0))
    batched = invert_gradients(model, noisy, labels, SHAPE, restarts=3, seed=7, **kw)
    assert batched.candidates.shape == (3, *SHAPE) and batched.losses.shape == (3,)
    for k in range(3):
        alone = invert_gradients(model, noisy, labels, SHAPE, restarts=1, seed=7 + k, **kw)
        torch.testing.assert_close(batched.candidates[k], alone.images, rtol=0, atol=1e-10)
        torch.testing.assert_close(batched.losses[k], alone.losses[0], rtol=0, atol=1e-12)
        own = model_gradients(model, batched.candidates[k], labels)
        rescored = gradient_matching_loss(list(own.values()), [noisy[n] for n in own])
        torch.testing.assert_close(batched.losses[k], rescored, rtol=0, atol=1e-12)
    assert len(set(batched.losses.tolist())) == 3
    assert batched.best == int(batched.losses.argmin())
    assert torch.equal(batched.images, batched.candidates[batched.best])
    assert float(batched.candidates.min()) >= 0.0 and float(batched.candidates.max()) <= 1.0


def test_bad_input_is_refused_naming_the_parameter():
    model, image, labels, true_grads, _ = _case(0)
    kw = dict(steps=10, lr=0.1, tv_weight=1e-4, restarts=2, seed=0)
    for change, message in [({"steps": 0}, r"steps=0: expected a value >= 1"),
                            ({"tv_weight": -1.0}, r"tv_weight=-1.0: expected a value >= 0"),
                            ({"restarts": 0}, r"restarts=0: expected a value >= 1"),
                            ({"lr": 0.0}, r"lr=0.0: expected a number > 0"),
                            ({"box": (1.0, 1.0)}, r"box=\(1.0, 1.0\): expected \(lo, hi\) with lo < hi"),
                            ({"box": (1.0, 0.0)}, r"box=\(1.0, 0.0\)")]:
        with pytest.raises(ValueError, match=message):
            invert_gradients(model, true_grads, labels, SHAPE, **{**kw, **change})
    with pytest.raises(ValueError, match=r"shape=\(1, 16\): expected \(batch, channels, height, width\)"):
        invert_gradients(model, true_grads, labels, (1, 16), **kw)
    with pytest.raises(ValueError, match=r"labels has shape \(2,\): expected \(1,\)"):
        invert_gradients(model, true_grads, torch.tensor([0, 1]), SHAPE, **kw)
    with pytest.raises(ValueError, match=r"target_grads has keys \['1.weight'\]"):
        invert_gradients(model, {"1.weight": true_grads["1.weight"]}, labels, SHAPE, **kw)
    with pytest.raises(ValueError, match=r"target_grads has shapes"):
        invert_gradients(model, [t.reshape(-1) for t in true_grads.values()], labels, SHAPE, **kw)
    with pytest.raises(ValueError, match=r"grads_a\[0\] has shape \(2,\) and grads_b\[0\] \(3,\)"):
        gradient_matching_loss([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"weights has 2 entries: expected one per layer \(1\)"):
        gradient_matching_loss([torch.zeros(2)], [torch.zeros(2)], [1.0, 1.0])


def test_one_restart_against_adam_on_signed_autograd_gradients_written_out(one_torch_thread):
    """Eight steps by hand: autograd double backward, the sign, Adam's moments with bias correction, the
    step size divided by ten after steps 3, 5 and 7, and the box."""
    model, image, labels, true_grads, _ = _case(4)
    lr, tv_weight, steps, box = 0.1, 1e-2, 8, (0.2, 0.9)
    result = invert_gradients(model, true_grads, labels, SHAPE, steps=steps, lr=lr, tv_weight=tv_weight,
                              restarts=1, seed=11, box=box)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11), dtype=D)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    params = list(model.parameters())
    for t in range(1, steps + 1):
        x.requires_grad_(True)
        own = torch.autograd.grad(nn.functional.cross_entropy(model(x), labels), params, create_graph=True)
        loss = gradient_matching_loss(list(own), list(true_grads.values())) + tv_weight * total_variation(x)
        g = torch.autograd.grad(loss, x)[0].sign()
        x = x.detach()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        step = lr * 0.1 ** sum(t - 1 >= k for k in (3, 5, 7))
        x = (x - step * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)).clamp(*box)
    torch.testing.assert_close(result.images, x, rtol=0, atol=1e-10)


def _targets(seed):
    """The model and labels of :func:`_case`, and three targets: the true gradient, a noisy one and a random
    one of the same norm per layer."""
    model, image, labels, true_grads, gen = _case(seed)
    noisy = {n: g + 0.3 * g.norm() / g.numel() ** 0.5 * torch.randn(g.shape, generator=gen, dtype=D)
             for n, g in true_grads.items()}
    random = {}
    for n, g in true_grads.items():
        r = torch.randn(g.shape, generator=gen, dtype=D)
        random[n] = r * g.norm() / r.norm()
    return model, labels, [true_grads, noisy, random]


def test_targets_inverted_as_one_batch_equal_each_target_inverted_alone(one_torch_thread):
    model, labels, targets = _targets(5)
    weights = [None, [1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 1.0, 1.0]]  # per layer: 1.weight, 1.bias, 3.weight, 3.bias
    kw = dict(steps=40, lr=0.1, tv_weight=1e-3, restarts=2, seed=3)
    batched = invert_gradients_batch(model, targets, labels, SHAPE, weights=weights, **kw)
    assert len(batched) == 3
    for target, w, got in zip(targets, weights, batched):
        alone = invert_gradients(model, target, labels, SHAPE, weights=w, **kw)
        assert got.candidates.shape == (2, *SHAPE) and got.best == alone.best
        torch.testing.assert_close(got.candidates, alone.candidates, rtol=0, atol=1e-10)
        torch.testing.assert_close(got.losses, alone.losses, rtol=0, atol=1e-12)
        assert torch.equal(got.images, got.candidates[got.best])
    # the targets' layer weights matter: the same gradients unweighted end elsewhere
    plain = invert_gradients_batch(model, targets, labels, SHAPE, **kw)
    assert float((plain[1].candidates - batched[1].candidates).abs().max()) > 1e-3


def test_prior_weights_per_target_and_a_target_without_prior_ignores_its_draws(one_torch_thread):
    model, labels, targets = _targets(6)
    kw = dict(steps=30, lr=0.1, tv_weight=1e-3, restarts=2, seed=1)
    seen = []

    def noisy_prior(x):  # random draws, and a record of what it was given
        seen.append(x.shape)
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)

    gen = torch.Generator().manual_seed(0)
    mixed = invert_gradients_batch(model, targets, labels, SHAPE, prior=noisy_prior, prior_weights=[0.0, 0.5, 0.0],
                                   **kw)
    assert seen and all(s == (1, 2, *SHAPE) for s in seen)  # only the weighted target's candidates
    for i in (0, 2):
        alone = invert_gradients(model, targets[i], labels, SHAPE, **kw)
        torch.testing.assert_close(mixed[i].candidates, alone.candidates, rtol=0, atol=1e-10)
    # the weighted target is the one-target inversion with the same prior and the same draws
    gen = torch.Generator().manual_seed(0)
    alone = invert_gradients(model, targets[1], labels, SHAPE, prior=lambda x: noisy_prior(x[None])[0],
                             prior_weight=0.5, **kw)
    torch.testing.assert_close(mixed[1].candidates, alone.candidates, rtol=0, atol=1e-10)
    unweighted = invert_gradients(model, targets[1], labels, SHAPE, **kw)
    assert float((mixed[1].candidates - unweighted.candidates).abs().max()) > 1e-3
    # a pull to 0.3 for the first and last targets only, each by its own weight
    pulled = invert_gradients_batch(model, targets, labels, SHAPE, prior=lambda x: x - 0.3,
                                    prior_weights=[1e6, 0.0, 1e-3], **kw)
    for i, w in ((0, 1e6), (2, 1e-3)):
        alone = invert_gradients(model, targets[i], labels, SHAPE, prior=lambda x: x - 0.3, prior_weight=w, **kw)
        torch.testing.assert_close(pulled[i].candidates, alone.candidates, rtol=0, atol=1e-10)
    free = invert_gradients(model, targets[0], labels, SHAPE, **kw)
    assert float((pulled[0].candidates - 0.3).abs().mean()) < 0.5 * float((free.candidates - 0.3).abs().mean())
    torch.testing.assert_close(pulled[1].candidates, unweighted.candidates, rtol=0, atol=1e-10)


def test_a_relative_prior_is_a_share_of_the_unit_matching_direction(one_torch_thread):
    """prior_balance="relative": the first signed Adam step goes along sign(g/|g| + w p/|p|) per candidate
    (computed here by hand from the matching loss and TV), and the prior's scale no longer matters."""
    model, labels, targets = _targets(3)
    kw = dict(lr=0.05, tv_weight=1e-3, restarts=2, seed=4, init_mean=0.5, init_std=0.2)
    pattern = torch.linspace(-1.0, 1.0, 16, dtype=D).reshape(SHAPE)

    def prior(x):
        return 1e-4 * (x - 0.5) + pattern.expand_as(x)

    x0 = torch.stack([0.5 + 0.2 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(4 + k), dtype=D)
                      for k in range(2)])
    params = dict(model.named_parameters())
    step = []
    for k in range(2):
        x = x0[k].clone().requires_grad_(True)
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x), labels), list(params.values()),
                                create_graph=True)
        loss = gradient_matching_loss(list(g), [targets[0][n] for n in params]) + 1e-3 * total_variation(x)
        d = torch.autograd.grad(loss, x)[0]
        p = prior(x0[k])
        step.append((d / d.norm() + 0.3 * p / p.norm()).sign())
    first_lr = 0.05 * 0.1 ** decay_milestones(1).count(0)  # one step: every decay falls on it
    expected = (x0 - first_lr * torch.stack(step)).clamp(0.0, 1.0)
    got = invert_gradients(model, targets[0], labels, SHAPE, steps=1, prior=prior, prior_weight=0.3,
                           prior_balance="relative", **kw)
    torch.testing.assert_close(got.candidates, expected, rtol=0, atol=1e-10)
    assert float((got.candidates - x0.clamp(0.0, 1.0)).abs().max()) > 0.5 * first_lr
    # the prior's scale: irrelevant when relative, decisive when absolute
    run = dict(steps=20, prior_weight=0.3, **kw)
    small = invert_gradients(model, targets[0], labels, SHAPE, prior=lambda x: 1e-6 * prior(x),
                             prior_balance="relative", **run)
    large = invert_gradients(model, targets[0], labels, SHAPE, prior=lambda x: 1e6 * prior(x),
                             prior_balance="relative", **run)
    torch.testing.assert_close(small.candidates, large.candidates, rtol=0, atol=1e-9)
    small = invert_gradients(model, targets[0], labels, SHAPE, prior=lambda x: 1e-6 * prior(x), **run)
    large = invert_gradients(model, targets[0], labels, SHAPE, prior=lambda x: 1e6 * prior(x), **run)
    assert float((small.candidates - large.candidates).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="prior_balance"):
        invert_gradients(model, targets[0], labels, SHAPE, steps=1, prior=prior, prior_weight=0.3,
                         prior_balance="both")


def test_bad_batched_input_is_refused_naming_the_parameter():
    model, labels, targets = _targets(0)
    kw = dict(steps=2, restarts=1)
    cases = [
        (dict(targets=[]), r"targets is empty: expected at least one target gradient"),
        (dict(weights=[None]), r"weights has 1 entries: expected one per target \(3\)"),
        (dict(weights=[None, [1.0, 1.0], None]), r"weights\[1\] has 2 entries: expected one per parameter \(4\)"),
        (dict(prior_weights=[0.0, 0.0]), r"prior_weights has 2 entries: expected one per target \(3\)"),
        (dict(prior_weights=[0.0, -1.0, 0.0]), r"prior_weights\[1\]=-1.0: expected a value >= 0"),
        (dict(prior_weights=[0.0, 0.5, 0.0]), r"prior_weights=\[0.0, 0.5, 0.0\]: expected a prior to weigh"),
        (dict(targets=[targets[0], {"1.weight": targets[1]["1.weight"]}, targets[2]]),
         r"targets\[1\] has keys \['1.weight'\]"),
        (dict(targets=[targets[0], targets[1], [t.reshape(-1) for t in targets[2].values()]]),
         r"targets\[2\] has shapes"),
        (dict(steps=0), r"steps=0: expected a value >= 1"),
        (dict(seed=[0, 1]), r"seed has 2 entries: expected one per target \(3\) or one int"),
        (dict(labels=torch.tensor([[1], [0]])), r"labels has shape \(2, 1\): expected \(1,\), one per image, or "
                                                r"\(3, 1\), one row per target"),
        (dict(init_std=-0.1), r"init_std=-0.1: expected a value >= 0"),
    ]
    for change, message in cases:
        args = {"targets": targets, "labels": labels, **kw, **change}
        with pytest.raises(ValueError, match=message):
            invert_gradients_batch(model, args.pop("targets"), args.pop("labels"), SHAPE, **args)


def test_targets_with_their_own_labels_and_seeds_equal_each_inverted_alone(one_torch_thread):
    """Several private batches as one optimisation: row ``i`` of ``labels`` and ``seed[i]`` are target
    ``i``'s, and it comes out as it would alone."""
    model, _, targets = _targets(7)
    labels = torch.tensor([[0], [2], [1]])
    seeds = [4, 1004, 2004]
    kw = dict(steps=30, lr=0.05, tv_weight=1e-3, restarts=2, init_mean=0.4, init_std=0.3)
    batched = invert_gradients_batch(model, targets, labels, SHAPE, seed=seeds, **kw)
    for target, y, seed, got in zip(targets, labels, seeds, batched):
        alone = invert_gradients(model, target, y, SHAPE, seed=seed, **kw)
        torch.testing.assert_close(got.candidates, alone.candidates, rtol=0, atol=1e-10)
        torch.testing.assert_close(got.losses, alone.losses, rtol=0, atol=1e-12)
    # the labels matter: the same targets under the first row's labels end elsewhere
    shared = invert_gradients_batch(model, targets, labels[0], SHAPE, seed=seeds, **kw)
    torch.testing.assert_close(shared[0].candidates, batched[0].candidates, rtol=0, atol=1e-10)
    assert float((shared[1].candidates - batched[1].candidates).abs().max()) > 1e-3


def test_restarts_start_from_the_given_mean_and_spread(one_torch_thread):
    """One step too small to move: the candidates are ``init_mean + init_std * z`` (``z`` the standard normal
    draw of ``seed + k``), clipped to the box; the default start is ``z`` itself."""
    model, image, labels, true_grads, _ = _case(0)
    kw = dict(steps=1, lr=1e-12, tv_weight=0.0, restarts=2, seed=5, box=(-50.0, 50.0))
    z = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(5 + k), dtype=D) for k in range(2)])
    moved = invert_gradients(model, true_grads, labels, SHAPE, init_mean=0.4, init_std=0.2, **kw)
    torch.testing.assert_close(moved.candidates, 0.4 + 0.2 * z, rtol=0, atol=1e-9)
    plain = invert_gradients(model, true_grads, labels, SHAPE, **kw)
    torch.testing.assert_close(plain.candidates, z, rtol=0, atol=1e-9)
