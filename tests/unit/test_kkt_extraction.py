"""The batched extraction loop: optimiser semantics, batching, resume, divergence and bad input."""

import math

import pytest
import torch

from imprint.models.mlp import MLP, load_mlp, save_mlp
from imprint.reconstruction.extraction import (ExtractionConfig, Hyperparameters, extract, initial_state,
                                               random_search)
from imprint.reconstruction.kkt import box_prior, candidate_labels, kkt_stationarity_loss, lambda_prior


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def tiny_weights(dims=(6, 8, 7, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a) for a, b in zip(dims[:-1], dims[1:])]


HYPER = Hyperparameters(init_scale=(0.1, 0.3, 0.05), lr_x=(0.05, 0.01, 0.1), lr_lambda=(0.02, 0.1, 0.05),
                        lambda_min=(0.2, 0.4, 0.1), alpha=(10.0, 50.0, 150.0), seed=(3, 4, 5))


def test_momentum_updates_match_torch_sgd():
    weights = tiny_weights()
    labels = candidate_labels(6, signed=True)
    hyper = HYPER.subset([0])
    config = ExtractionConfig(steps=5, dtype="float64", log_every=1)
    got = extract(weights, labels, 3, hyper, config, progress=False)
    x0, lam0 = initial_state(hyper, 6, 6, "binary")
    x = x0.clone().requires_grad_()
    lam = lam0.clone().requires_grad_()
    row = hyper.row(0)
    opt_x = torch.optim.SGD([x], lr=row["lr_x"], momentum=0.9)
    opt_l = torch.optim.SGD([lam], lr=row["lr_lambda"], momentum=0.9)
    losses = []
    for _ in range(5):
        loss = (kkt_stationarity_loss(weights, x, lam, labels, torch.tensor([row["alpha"]], dtype=torch.float64))
                + box_prior(x) + lambda_prior(lam, torch.tensor([row["lambda_min"]])))
        losses.append(loss.item())
        opt_x.zero_grad()
        opt_l.zero_grad()
        loss.sum().backward()
        opt_x.step()
        opt_l.step()
    assert torch.allclose(got.x, x.detach(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(got.lam, lam.detach(), rtol=1e-12, atol=1e-14)
    logged = (got.history["kkt_loss"] + got.history["prior_loss"])[:5, 0]
    assert torch.allclose(logged, torch.tensor(losses, dtype=torch.float64), rtol=1e-12)


def test_batched_configurations_equal_separate_runs():
    weights = tiny_weights()
    labels = candidate_labels(8, signed=True)
    config = ExtractionConfig(steps=15, dtype="float64", log_every=5)
    together = extract(weights, labels, 4, HYPER, config, progress=False)
    for k in range(len(HYPER)):
        alone = extract(weights, labels, 4, HYPER.subset([k]), config, progress=False)
        assert torch.allclose(together.x[k], alone.x[0], rtol=1e-10, atol=1e-12)
        assert torch.allclose(together.lam[k], alone.lam[0], rtol=1e-10, atol=1e-12)
        assert torch.allclose(together.history["kkt_loss"][:, k], alone.history["kkt_loss"][:, 0], rtol=1e-10)
    # the configurations really differ
    assert not torch.allclose(together.x[0], together.x[1])


def test_extraction_decreases_the_kkt_loss_on_a_trained_network():
    from imprint.models.mlp import TrainConfig, train_mlps

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 6, generator=gen, dtype=torch.float64)
    y = torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0).to(torch.float64)[None]
    trained = train_mlps(x, y, TrainConfig(widths=(16,), lr=0.5, steps=300, first_layer_std=1e-3, dtype="float64",
                                           log_every=100), progress=False)
    weights = [w[0] for w in trained.weights]
    hyper = Hyperparameters.single(init_scale=0.1, lr_x=0.01, lr_lambda=0.01, lambda_min=0.1, alpha=20.0)
    result = extract(weights, candidate_labels(24, signed=True), 12, hyper,
                     ExtractionConfig(steps=200, dtype="float64", log_every=50), progress=False)
    kkt = result.history["kkt_loss"][:, 0]
    assert kkt[-1] < 0.5 * kkt[0]


def test_resumed_run_gives_the_same_numbers(tmp_path):
    weights = tiny_weights()
    labels = candidate_labels(8, signed=True)
    full = extract(weights, labels, 4, HYPER, ExtractionConfig(steps=12, dtype="float64", log_every=3,
                                                                checkpoint_every=6), progress=False)
    # a run "killed" after its first checkpoint: it stops at step 6, then is called again for 12 steps
    first = extract(weights, labels, 4, HYPER, ExtractionConfig(steps=6, dtype="float64", log_every=3),
                    checkpoint_dir=tmp_path, progress=False)
    assert first.steps_done == 6
    resumed = extract(weights, labels, 4, HYPER, ExtractionConfig(steps=12, dtype="float64", log_every=3,
                                                                   checkpoint_every=6),
                      checkpoint_dir=tmp_path, progress=False)
    assert resumed.steps_done == 12
    assert torch.equal(resumed.x, full.x) and torch.equal(resumed.lam, full.lam)
    assert torch.equal(resumed.history["step"], full.history["step"])
    assert torch.equal(resumed.history["kkt_loss"], full.history["kkt_loss"])
    # a completed run is read back, not recomputed
    again = extract(weights, labels, 4, HYPER, ExtractionConfig(steps=12, dtype="float64", log_every=3),
                    checkpoint_dir=tmp_path, progress=False)
    assert torch.equal(again.x, full.x)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    weights = tiny_weights()
    labels = candidate_labels(8, signed=True)
    extract(weights, labels, 4, HYPER, ExtractionConfig(steps=2, dtype="float64"), checkpoint_dir=tmp_path,
            progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        extract(weights, labels, 4, HYPER.subset([0, 1]), ExtractionConfig(steps=4, dtype="float64"),
                checkpoint_dir=tmp_path, progress=False)


def test_a_diverging_configuration_is_frozen_and_does_not_disturb_the_others():
    weights = tiny_weights()
    labels = candidate_labels(8, signed=True)
    rows = HYPER.rows()[:2]
    rows[1] = {**rows[1], "lr_x": 1e6, "lr_lambda": 1e6}
    hyper = Hyperparameters.from_rows(rows)
    config = ExtractionConfig(steps=20, dtype="float64", log_every=5)
    result = extract(weights, labels, 4, hyper, config, progress=False)
    assert result.diverged.tolist() == [False, True]
    alone = extract(weights, labels, 4, hyper.subset([0]), config, progress=False)
    assert torch.allclose(result.x[0], alone.x[0], rtol=1e-10, atol=1e-12)


def test_general_form_draws_free_sign_multipliers_and_skips_the_hinge():
    weights = tiny_weights()
    hyper = HYPER.subset([0])
    _, lam = initial_state(hyper, 200, 6, "general")
    assert (lam < 0).any() and (lam > 0).any()
    result = extract(weights, candidate_labels(8, signed=True), 4, hyper,
                     ExtractionConfig(steps=3, form="general", dtype="float64", box_low=-10.0, box_high=10.0,
                                      log_every=1), progress=False)
    assert torch.all(result.history["prior_loss"] == 0)


def test_multiclass_extraction_runs_with_class_labels():
    weights = tiny_weights((6, 8, 3))
    labels = candidate_labels(9, n_classes=3)
    result = extract(weights, labels, 4, HYPER.subset([0]), ExtractionConfig(steps=3, form="multiclass",
                                                                              dtype="float32"), progress=False)
    assert result.x.shape == (1, 9, 6) and torch.isfinite(result.x).all()


def test_random_search_draws_within_ranges_and_is_reproducible():
    ranges = {"init_scale": (1e-3, 1e-1, "log"), "lr_x": (1e-3, 1.0, "log"), "lr_lambda": 0.01,
              "lambda_min": (0.05, 0.5, "linear"), "alpha": (10, 300, "linear")}
    a = random_search(16, ranges, seed=7)
    b = random_search(16, ranges, seed=7)
    assert a == b and len(a) == 16
    assert all(1e-3 <= v <= 1e-1 for v in a.init_scale)
    assert all(0.05 <= v <= 0.5 for v in a.lambda_min)
    assert set(a.lr_lambda) == {0.01}
    assert len(set(a.seed)) == 16


# ------------------------------------------------------------------------------------------- bad input

def test_fewer_candidates_than_training_samples_is_refused():
    with pytest.raises(ValueError, match="n_candidates=4.*n_train=5"):
        extract(tiny_weights(), candidate_labels(4, signed=True), 5, HYPER, ExtractionConfig(steps=1))


def test_nonpositive_lambda_min_is_refused():
    with pytest.raises(ValueError, match="lambda_min=0.0"):
        Hyperparameters.single(init_scale=0.1, lr_x=0.1, lr_lambda=0.1, lambda_min=0.0, alpha=10.0)
    with pytest.raises(ValueError, match="lambda_min=-0.1"):
        Hyperparameters.single(init_scale=0.1, lr_x=0.1, lr_lambda=0.1, lambda_min=-0.1, alpha=10.0)


def test_mismatched_weights_are_refused():
    bad = tiny_weights()
    bad[1] = torch.randn(7, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        extract(bad, candidate_labels(8, signed=True), 4, HYPER, ExtractionConfig(steps=1))
    with pytest.raises(ValueError, match="d_out=3"):
        extract(tiny_weights((6, 8, 3)), candidate_labels(8, signed=True), 4, HYPER, ExtractionConfig(steps=1))


def test_weights_file_of_another_architecture_is_refused_before_any_compute(tmp_path):
    path = save_mlp(tmp_path / "net.safetensors", MLP(6, [8, 7], 1))
    with pytest.raises(ValueError, match="widths=\\[8, 9\\]"):
        load_mlp(path, 6, [8, 9], 1)


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="box_low"):
        ExtractionConfig(box_low=1.0, box_high=-1.0)
    with pytest.raises(ValueError, match="form"):
        ExtractionConfig(form="hinge")
    with pytest.raises(ValueError, match="lengths"):
        Hyperparameters((0.1,), (0.1, 0.2), (0.1,), (0.1,), (1.0,), (0,))


def test_per_pixel_box_and_one_network_per_configuration():
    nets = [tiny_weights(seed=s) for s in range(3)]
    stacked = [torch.stack([net[i] for net in nets]) for i in range(3)]
    labels = candidate_labels(8, signed=True)
    low, high = -torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    config = ExtractionConfig(steps=6, dtype="float64", log_every=2)
    together = extract(stacked, labels, 4, HYPER, config, progress=False, box=(low, high))
    for k in range(3):
        alone = extract(nets[k], labels, 4, HYPER.subset([k]), config, progress=False, box=(low, high))
        assert torch.allclose(together.x[k], alone.x[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="box"):
        extract(nets[0], labels, 4, HYPER, config, box=(high, low))


def test_attack_networks_equals_one_run_per_network():
    from imprint.reconstruction.extraction import attack_networks

    nets = {"a": tiny_weights(seed=0), "b": tiny_weights(seed=1)}
    labels = candidate_labels(8, signed=True)
    config = ExtractionConfig(steps=5, dtype="float64", log_every=1)
    results = attack_networks(nets, labels, 4, HYPER, config, progress=False)
    assert list(results) == ["a", "b"]
    for name, weights in nets.items():
        alone = extract(weights, labels, 4, HYPER, config, progress=False)
        assert torch.allclose(results[name].x, alone.x, rtol=1e-10, atol=1e-12)
        assert torch.allclose(results[name].history["kkt_loss"], alone.history["kkt_loss"], rtol=1e-10)
        assert results[name].hyper == HYPER
    with pytest.raises(ValueError, match="architecture"):
        attack_networks({"a": tiny_weights(), "c": tiny_weights((6, 9, 7, 1))}, labels, 4, HYPER, config)


def test_per_class_multipliers_batch_like_separate_runs():
    weights = tiny_weights((6, 8, 3))
    labels = candidate_labels(9, n_classes=3)
    config = ExtractionConfig(steps=6, form="multiclass_all", dtype="float64", log_every=2)
    together = extract(weights, labels, 4, HYPER, config, progress=False)
    assert together.lam.shape == (3, 9, 3)
    for k in range(3):
        alone = extract(weights, labels, 4, HYPER.subset([k]), config, progress=False)
        assert torch.allclose(together.lam[k], alone.lam[0], rtol=1e-10, atol=1e-12)
        assert torch.allclose(together.x[k], alone.x[0], rtol=1e-10, atol=1e-12)
