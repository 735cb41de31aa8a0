"""Proxy pairs of chapter 06: per-example gradients and one-step LoRA updates with torch.func, against a
Python loop of autograd backward passes and against a peft adapter's own SGD step."""

import copy

import peft
import pytest
import torch
from torch import nn

from imprint.bridge.decoders import min_norm_lift
from imprint.bridge.per_example import lora_step_pairs, per_example_full_gradients

D = torch.float64
ADAPTED = ("1.weight", "3.weight")


def _case(n=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(D).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 4, 4, generator=gen, dtype=D)
    labels = torch.randint(0, 3, (n,), generator=gen)
    lora_a = {"1.weight": torch.randn(2, 16, generator=gen, dtype=D),
              "3.weight": torch.randn(4, 8, generator=gen, dtype=D)}
    return model, x, labels, lora_a


def _loop_full_gradients(model, x, labels, batch_size):
    out = {n: [] for n, _ in model.named_parameters()}
    for i in range(0, x.shape[0], batch_size):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + batch_size]), labels[i:i + batch_size]).backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.clone())
    return {n: torch.stack(g) for n, g in out.items()}


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_per_example_gradients_match_a_loop(batch_size):
    model, x, labels, _ = _case()
    got = per_example_full_gradients(model, x, labels, batch_size=batch_size)
    want = _loop_full_gradients(model, x, labels, batch_size)
    assert list(got) == list(want)
    for n in want:
        assert got[n].shape == (6 // batch_size, *dict(model.named_parameters())[n].shape)
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lora_step_pairs_match_a_loop_through_the_adapted_weights(batch_size):
    model, x, labels, lora_a = _case()
    lr, s = 0.3, 1.5
    pairs = lora_step_pairs(model, x, labels, lora_a, lr=lr, scaling=s, batch_size=batch_size)
    base = {n: p.detach() for n, p in model.named_parameters()}
    full = _loop_full_gradients(model, x, labels, batch_size)
    for k, i in enumerate(range(0, x.shape[0], batch_size)):
        b = {n: torch.zeros(base[n].shape[0], lora_a[n].shape[0], dtype=D, requires_grad=True) for n in ADAPTED}
        params = {**base, **{n: base[n] + s * b[n] @ lora_a[n] for n in ADAPTED}}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x[i:i + batch_size],)),
                                           labels[i:i + batch_size])
        grads = torch.autograd.grad(loss, [b[n] for n in ADAPTED])
        for n, g_b in zip(ADAPTED, grads):
            torch.testing.assert_close(pairs.delta_b[n][k], -lr * g_b, rtol=0, atol=1e-10)
            torch.testing.assert_close(pairs.full[n][k], full[n][k], rtol=0, atol=1e-10)
            # the algebra of the first step: Delta B = -lr s G A^T and Delta W = -lr s^2 G A^T A
            torch.testing.assert_close(pairs.delta_b[n][k], -lr * s * full[n][k] @ lora_a[n].T, rtol=0, atol=1e-10)
            torch.testing.assert_close(pairs.delta_w[n][k], -lr * s ** 2 * full[n][k] @ lora_a[n].T @ lora_a[n],
                                       rtol=0, atol=1e-10)
    # and the minimum-norm lift of the update is G projected onto A's row space
    n = "3.weight"
    proj = torch.linalg.pinv(lora_a[n]) @ lora_a[n]
    torch.testing.assert_close(min_norm_lift(pairs.delta_w[n], lora_a[n], lr=lr, scaling=s), pairs.full[n] @ proj,
                               rtol=0, atol=1e-9)


def test_lora_step_pairs_equal_a_peft_adapters_first_sgd_step():
    model, x, labels, lora_a = _case(n=2)
    rank, alpha, lr = 4, 8, 0.2
    lora_a = {"1.weight": torch.randn(rank, 16, dtype=D), "3.weight": torch.randn(rank, 8, dtype=D)}
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["1", "3"], bias="none")
    tuned = peft.get_peft_model(copy.deepcopy(model), config)
    layers = {"1.weight": tuned.base_model.model[1], "3.weight": tuned.base_model.model[3]}
    with torch.no_grad():
        for n, layer in layers.items():
            layer.lora_A["default"].weight.copy_(lora_a[n])
            assert float(layer.lora_B["default"].weight.abs().max()) == 0.0
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    nn.functional.cross_entropy(tuned(x), labels).backward()
    optimizer.step()
    pairs = lora_step_pairs(model, x, labels, lora_a, lr=lr, scaling=alpha / rank, batch_size=2)
    for n, layer in layers.items():
        torch.testing.assert_close(pairs.delta_b[n][0], layer.lora_B["default"].weight.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.lora_A["default"].weight.detach(), lora_a[n], rtol=0, atol=0)


def test_bad_input_is_refused_naming_the_parameter():
    model, x, labels, lora_a = _case()
    rank_zero = r"lora_a\['1.weight'\] has shape \(0, 16\): expected \[r, 16\] with rank r >= 1"
    with pytest.raises(ValueError, match=rank_zero):
        lora_step_pairs(model, x, labels, {"1.weight": torch.zeros(0, 16, dtype=D)}, lr=0.1)
    with pytest.raises(ValueError, match=r"lora_a\['1.weight'\] has shape \(2, 15\): expected \[r, 16\]"):
        lora_step_pairs(model, x, labels, {"1.weight": torch.zeros(2, 15, dtype=D)}, lr=0.1)
    with pytest.raises(ValueError, match=r"lora_a\['1.bias'\]: the parameter '1.bias' has shape \(8,\)"):
        lora_step_pairs(model, x, labels, {"1.bias": torch.zeros(2, 16, dtype=D)}, lr=0.1)
    with pytest.raises(ValueError, match=r"names=\['9.weight'\]: expected a non-empty list of parameters"):
        lora_step_pairs(model, x, labels, {"9.weight": torch.zeros(2, 16, dtype=D)}, lr=0.1)
    with pytest.raises(ValueError, match=r"lr=-0.1: expected a number > 0"):
        lora_step_pairs(model, x, labels, lora_a, lr=-0.1)
    with pytest.raises(ValueError, match=r"scaling=0.0"):
        lora_step_pairs(model, x, labels, lora_a, lr=0.1, scaling=0.0)
    with pytest.raises(ValueError, match=r"batch_size=7: expected a divisor of the number of examples \(6\)"):
        per_example_full_gradients(model, x, labels, batch_size=7)
    with pytest.raises(ValueError, match=r"batch_size=4: expected a divisor"):
        lora_step_pairs(model, x, labels, lora_a, lr=0.1, batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size=0: expected a value >= 1"):
        per_example_full_gradients(model, x, labels, batch_size=0)
