"""The attacked CNN of chapter 06: shapes on digits and faces, its LoRA targets, peft's A initialisation,
seeded pretraining."""

import numpy as np
import pytest
import torch

from imprint.bridge.per_example import lora_step_pairs
from imprint.bridge.targets import (PretrainOptions, TargetOptions, accuracy, init_lora_factors, lora_targets,
                                    make_target, pretrain)
from imprint.data.images import load_digit_images


@pytest.mark.parametrize("size,classes,flat", [(8, 10, 16 * 2 * 2), (25, 2, 16 * 6 * 6)])
def test_shapes_for_digits_and_faces(size, classes, flat):
    model = make_target(TargetOptions(image_size=size, n_classes=classes), seed=0)
    assert model(torch.rand(3, 1, size, size)).shape == (3, classes)
    assert lora_targets(model) == ["fc1.weight", "fc2.weight"]
    assert model.fc1.weight.shape == (32, flat)
    with pytest.raises(ValueError, match="x has shape"):
        model(torch.rand(3, 1, size + 1, size))


def test_seeded_init_leaves_global_state_and_repeats():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = make_target(TargetOptions(), seed=3)
    assert torch.rand(1) == before
    b = make_target(TargetOptions(), seed=3)
    c = make_target(TargetOptions(), seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_lora_factors_follow_peft_bounds_and_feed_the_step_pairs():
    model = make_target(TargetOptions(), seed=0)
    a = init_lora_factors(model, rank=4, seed=1)
    assert {n: tuple(v.shape) for n, v in a.items()} == {"fc1.weight": (4, 64), "fc2.weight": (4, 32)}
    assert a["fc1.weight"].abs().max() <= 1 / 8 and a["fc2.weight"].abs().max() <= 1 / np.sqrt(32)
    assert torch.equal(a["fc1.weight"], init_lora_factors(model, rank=4, seed=1)["fc1.weight"])
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    pairs = lora_step_pairs(model, x, y, a, lr=0.1)
    assert pairs.delta_b["fc1.weight"].shape == (4, 32, 4)
    with pytest.raises(ValueError, match="rank"):
        init_lora_factors(model, rank=0, seed=1)
    with pytest.raises(ValueError, match="names"):
        init_lora_factors(model, rank=2, seed=1, names=["conv1.bias"])


def test_options_refuse_bad_values():
    with pytest.raises(ValueError, match="activation"):
        TargetOptions(activation="swish")
    with pytest.raises(ValueError, match="channels"):
        TargetOptions(channels=(8,))
    with pytest.raises(ValueError, match="lr"):
        PretrainOptions(lr=0.0)
    model = make_target(TargetOptions(), seed=0)
    with pytest.raises(ValueError, match="labels"):
        pretrain(model, torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def test_pretraining_on_digits_learns_and_is_seeded():
    images, labels = load_digit_images()
    x = torch.as_tensor(images[:200]).unsqueeze(1)
    y = torch.as_tensor(labels[:200])
    xt, yt = torch.as_tensor(images[1400:]).unsqueeze(1), torch.as_tensor(labels[1400:])
    opts = PretrainOptions(epochs=3, batch_size=20, lr=1e-2, seed=0)
    m1, m2 = make_target(TargetOptions(), seed=0), make_target(TargetOptions(), seed=0)
    h1, h2 = pretrain(m1, x, y, opts), pretrain(m2, x, y, opts)
    assert h1 == h2 and all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert h1[-1] < 0.6 * h1[0]
    assert accuracy(m1, xt, yt) > 0.5  # chance is 0.1
