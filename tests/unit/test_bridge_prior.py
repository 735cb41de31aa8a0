"""The score-distillation prior of chapter 06 against its closed form for Gaussian data, and its place in
the inversion's signed step."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from imprint.bridge.inversion import invert_gradients, model_gradients
from imprint.bridge.prior import SDSOptions, sds_gradient, sds_prior, sds_priors, unet_epsilon

D = torch.float64


def gaussian_denoiser(mu, sigma, abar):
    """The exact noise prediction for data N(mu, sigma^2 I) in the denoiser's range."""
    def eps(x_t, t_index):
        a = abar[t_index].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * sigma ** 2 + 1 - a)
    return eps


@pytest.mark.parametrize("weighting,t", [("uniform", 10), ("sds", 40), ("sds", 90)])
def test_the_mean_gradient_is_the_closed_form_for_gaussian_data(weighting, t):
    abar = torch.linspace(0.999, 0.01, 100, dtype=D)
    mu, sigma = 0.2, 0.5
    options = SDSOptions(weighting=weighting, box=(0.0, 1.0))
    x = torch.tensor([[0.1, 0.9], [0.5, 0.7]], dtype=D).view(1, 1, 2, 2).expand(40000, 1, 2, 2)
    gen = torch.Generator().manual_seed(0)
    g = sds_gradient(gaussian_denoiser(mu, sigma, abar), x, abar, options, gen,
                     t_index=torch.full((x.shape[0],), t))
    a = abar[t]
    y = 2 * x[0] - 1
    w = (1 - a) if weighting == "sds" else 1.0
    want = w * (a * (1 - a)).sqrt() * (y - mu) / (a * sigma ** 2 + 1 - a) * 2
    # the per-draw spread is w * 2 * (1 - (1 - a) / (a sigma^2 + 1 - a)) * |eps|: a 5-sigma tolerance
    spread = w * 2 * (1 - (1 - a) / (a * sigma ** 2 + 1 - a))
    torch.testing.assert_close(g.mean(0), want, rtol=0, atol=float(5 * spread / 200))


def test_drawn_timesteps_stay_in_the_range_and_the_stream_is_seeded():
    abar = torch.linspace(0.999, 0.01, 50, dtype=D)
    seen = []

    def record(x_t, t_index):
        seen.append(t_index.clone())
        return torch.zeros_like(x_t)

    options = SDSOptions(t_min=0.2, t_max=0.4)
    prior = sds_prior(record, abar, options, seed=3)
    x = torch.rand(2, 5, 1, 3, 3, dtype=D)  # restarts x batch
    out = prior(x)
    assert out.shape == x.shape
    t = torch.cat(seen)
    assert t.shape == (10,) and int(t.min()) >= round(0.2 * 49) and int(t.max()) <= round(0.4 * 49)
    again = sds_prior(record, abar, options, seed=3)(x)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_stacked_priors_draw_each_slice_from_its_own_stream_in_one_denoiser_call():
    abar = torch.linspace(0.999, 0.01, 50, dtype=D)
    calls = []

    def eps(x_t, t_index):  # depends on x_t and t, so equal outputs need equal draws
        calls.append(x_t.shape[0])
        return 0.5 * x_t + abar[t_index].view(-1, 1, 1, 1)

    options = SDSOptions(t_min=0.1, t_max=0.9)
    x = torch.rand(3, 2, 4, 1, 3, 3, dtype=D)  # targets x restarts x batch
    seeds = [3, 5, 3]
    stacked = sds_priors(eps, abar, seeds, options)
    for _ in range(2):  # each call a fresh draw of every stream
        calls.clear()
        got = stacked(x)
        assert calls == [24] and got.shape == x.shape
    for i, s in enumerate(seeds):
        alone = sds_prior(eps, abar, options, seed=s)
        alone(x[i])  # the first draw; got is the second
        torch.testing.assert_close(got[i], alone(x[i]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"x has shape \(2, 2, 4, 1, 3, 3\): expected \(3, ..., channels"):
        stacked(x[:2])
    with pytest.raises(ValueError, match=r"seeds is empty"):
        sds_priors(eps, abar, [], options)


def test_the_prior_enters_the_signed_step_and_a_heavy_one_wins():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 3)).to(D).eval()
    image = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    labels = torch.tensor([1])
    grads = model_gradients(model, image, labels)
    kw = dict(steps=150, lr=0.05, restarts=2, seed=0)
    plain = invert_gradients(model, grads, labels, (1, 1, 4, 4), **kw)
    zero = invert_gradients(model, grads, labels, (1, 1, 4, 4), prior=lambda x: x - 0.3, prior_weight=0.0, **kw)
    torch.testing.assert_close(plain.candidates, zero.candidates, rtol=0, atol=0)
    heavy = invert_gradients(model, grads, labels, (1, 1, 4, 4), prior=lambda x: x - 0.3, prior_weight=1e6, **kw)
    assert float((heavy.candidates - 0.3).abs().max()) < 0.02  # a quadratic pull to 0.3 outweighs matching
    assert float((plain.images - image).abs().max()) < float((heavy.images - image).abs().max())


def test_unet_epsilon_repeats_the_labels_over_restarts():
    calls = []

    def unet(x_t, t, class_labels=None):
        calls.append(class_labels)
        return SimpleNamespace(sample=torch.zeros_like(x_t))

    eps = unet_epsilon(unet, labels=torch.tensor([4, 7]))
    eps(torch.zeros(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
    assert calls[0].tolist() == [4, 7, 4, 7, 4, 7]
    with pytest.raises(ValueError, match="5 images for 2 labels: expected a multiple"):
        eps(torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("kwargs,message", [
    (dict(t_min=0.5, t_max=0.5), r"t_min=0.5, t_max=0.5: expected 0 <= t_min < t_max <= 1"),
    (dict(t_max=1.5), r"t_max=1.5: expected a value <= 1"),
    (dict(weighting="snr"), r"weighting='snr': expected one of"),
    (dict(box=(1.0, 0.0)), r"box=\(1.0, 0.0\): expected \(lo, hi\) with lo < hi"),
])
def test_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SDSOptions(**kwargs)


def test_a_negative_or_orphan_prior_weight_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).to(D)
    grads = model_gradients(model, torch.rand(1, 1, 2, 2, dtype=D), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"prior_weight=-1.0: expected a value >= 0"):
        invert_gradients(model, grads, torch.tensor([0]), (1, 1, 2, 2), steps=2, prior=lambda x: x, prior_weight=-1.0)
    with pytest.raises(ValueError, match=r"prior_weight=0.5: expected a prior to weigh"):
        invert_gradients(model, grads, torch.tensor([0]), (1, 1, 2, 2), steps=2, prior_weight=0.5)
