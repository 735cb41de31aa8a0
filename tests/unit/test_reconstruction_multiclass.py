"""Chapter 02's cells: weight decays as recipes of one run_cell, the free-sign general form, held-out fits,
multiclass targets (imprint.reconstruction.multiclass and the additions to run_cell)."""

import numpy as np
import pytest
import torch

from imprint.data.digits import even_odd_targets
from imprint.models.mlp import TrainConfig, train_mlps
from imprint.reconstruction.evaluation import plot_seed_counts
from imprint.reconstruction.experiment import free_sign_fit, run_cell
from imprint.reconstruction.extraction import ExtractionConfig, Hyperparameters
from imprint.reconstruction.kkt import fit_kkt_multipliers
from imprint.reconstruction.multiclass import (class_index_targets, decay_tag, decayed, effect, plot_decay_sweep,
                                               plot_residual_seeds, summarise)

TRAIN = dict(widths=(12,), lr=0.5, steps=120, first_layer_std=1e-3, hidden_std=3e-3, dtype="float64", log_every=20,
             checkpoint_every=40)
HYPER = Hyperparameters.from_rows([
    dict(init_scale=0.03, lr_x=0.05, lr_lambda=0.01, lambda_min=0.3, alpha=100.0, seed=1),
    dict(init_scale=0.02, lr_x=0.1, lr_lambda=0.02, lambda_min=0.2, alpha=150.0, seed=2)])


def _extract(form="binary", steps=20):
    return ExtractionConfig(steps=steps, form=form, dtype="float64", log_every=5, checkpoint_every=10)


def _binary(out, form="binary", decays=(0.0, 0.01), seeds=(0, 1), **kw):
    base, *others = decays
    return run_cell("t-" + form, "digits", 6, even_odd_targets, list(seeds), TrainConfig(**TRAIN, weight_decay=base),
                    HYPER, _extract(form), out, schedules=[TrainConfig(**TRAIN, weight_decay=w) for w in others],
                    match_norm=False, heldout_fit=True, **kw)


def test_class_index_targets_maps_digits_to_indices_and_refuses_others():
    targets = class_index_targets([3, 5, 7])
    assert targets(torch.tensor([7, 3, 5, 3])).tolist() == [2, 0, 1, 0]
    with pytest.raises(ValueError, match="labels"):
        targets(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="labels"):
        targets(torch.tensor([12]))
    with pytest.raises(ValueError, match="classes"):
        class_index_targets([1, 1])


def test_names_and_tags_of_decays():
    assert decayed("trained", 0.0, 0.0) == "trained"
    assert decayed("disjoint", 0.0005, 0.0) == "disjoint_wd0.0005"
    assert decayed("trained", 0.002, 0.002) == "trained"
    assert [decay_tag(w) for w in (0.0, 0.0005, 0.002, 0.01, 2.0)] == ["wd0", "wd5em4", "wd2em3", "wd1em2", "wd2e0"]
    with pytest.raises(ValueError, match="role"):
        decayed("untrained", 0.1, 0.0)


def test_a_decayed_recipe_is_a_network_of_the_cell_trained_as_alone(tmp_path, one_torch_thread):
    cell = _binary(tmp_path)
    assert cell.networks == ["trained", "trained_wd0.01", "disjoint", "disjoint_wd0.01", "untrained"]
    s = cell.seeds[1]
    # reference: the same data, initialisation and decay trained on its own; attacked as trained (no rescaling)
    alone = train_mlps(s.split.x_train.unsqueeze(0), even_odd_targets(s.split.label_train).unsqueeze(0),
                       TrainConfig(**TRAIN, weight_decay=0.01), seeds=[s.data_seed], progress=False)
    for w, ref in zip(s.networks["trained_wd0.01"], alone.weights):
        torch.testing.assert_close(w.cpu(), ref[0].cpu(), rtol=1e-9, atol=1e-12)
    norm = lambda ws: float(torch.sqrt(sum((w ** 2).sum() for w in ws)))
    assert norm(s.networks["trained_wd0.01"]) == pytest.approx(s.norms["trained_wd0.01"], rel=1e-9)
    assert s.norms["trained_wd0.01"] < s.norms["trained"]
    # every attacked network has a fit on the training set and on as many held-out digits
    for net in ("trained", "trained_wd0.01"):
        w = [v.double() for v in s.networks[net]]
        held = fit_kkt_multipliers(w, s.split.x_heldout[:6].double(), even_odd_targets(s.split.label_heldout[:6]),
                                   "binary")[1]
        assert s.residuals_heldout[net] == pytest.approx(held, rel=1e-9)
        assert 0 <= s.residuals[net] < s.residuals_heldout[net] <= 1


def test_the_same_decay_twice_is_refused_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        _binary(tmp_path, decays=(0.0, 0.01, 0.01))
    with pytest.raises(ValueError, match="distinct"):
        _binary(tmp_path, decays=(0.01, 0.01))
    assert not list(tmp_path.iterdir())


def test_free_sign_fit_is_least_squares_over_the_output_gradients(one_torch_thread):
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(1, 5, generator=gen, dtype=torch.float64)]
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    rows = []
    for xi in x:  # reference: one autograd gradient of the output per example
        params = [v.clone().requires_grad_(True) for v in w]
        out = params[1] @ torch.relu(params[0] @ xi)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.sum(), params)]))
    rows = torch.stack(rows)
    theta = torch.cat([v.reshape(-1) for v in w])
    ref = torch.linalg.lstsq(rows.T, theta.unsqueeze(1)).solution[:, 0]
    lam, residual = free_sign_fit(w, x)
    torch.testing.assert_close(lam, ref, rtol=1e-7, atol=1e-9)
    assert residual == pytest.approx(float((theta - rows.T @ ref).norm() / theta.norm()), rel=1e-7)
    with pytest.raises(ValueError, match="outputs"):
        free_sign_fit([w[0], torch.randn(2, 5, dtype=torch.float64)], x)


def test_the_general_form_attacks_one_output_networks_without_labels(tmp_path, one_torch_thread):
    margin = _binary(tmp_path, decays=(0.01,))
    general = _binary(tmp_path, form="general", decays=(0.01,))  # same training folder: the same networks
    for a, b in zip(margin.seeds, general.seeds):
        for wa, wb in zip(a.networks["trained"], b.networks["trained"]):
            torch.testing.assert_close(wa, wb, rtol=0, atol=0)
        assert general.labels.abs().eq(1).all() and b.results["trained"].lam.shape == (2, 12)
        # free sign bounds the signed non-negative fit below, on the training set and held out
        assert b.residuals["trained"] <= a.residuals["trained"] + 1e-9
        assert b.residuals_heldout["trained"] <= a.residuals_heldout["trained"] + 1e-9
        # label-free scoring: the match may pair a training image with a candidate of the other label
        scores = b.searches["trained"].scores[0]
        assert scores.match.shape == (6,) and len(set(scores.match.tolist())) == 6


def test_a_multiclass_cell_with_decays_fits_every_attacked_network(tmp_path, one_torch_thread):
    classes = [1, 4, 7]
    cell = run_cell("m", "digits", 6, class_index_targets(classes), [0, 2],
                    TrainConfig(**TRAIN, loss="cross_entropy"), HYPER, _extract("multiclass_all"), tmp_path,
                    classes=classes, n_classes=3, match_norm=False, heldout_fit=True,
                    schedules=[TrainConfig(**TRAIN, loss="cross_entropy", weight_decay=0.003)])
    s = cell.seeds[0]
    assert set(s.split.label_train.tolist()) <= set(classes) and s.networks["trained"][-1].shape[0] == 3
    assert set(s.residuals) == set(s.residuals_heldout) == {"trained", "trained_wd0.003"}
    row = summarise(cell, "trained_wd0.003")
    assert len(row["trained"]) == len(row["residual"]) == len(row["residual_heldout"]) == 2
    assert row["disjoint"] == cell.counts("disjoint_wd0.003") and row["untrained"] == cell.counts("untrained")
    assert row["works"] is False  # two seeds cannot give p < 0.05
    assert np.isfinite(row["residual"]).all()


def test_effect_follows_the_test():
    words = ("up", "down", "same")
    assert effect({"p": 0.01, "lo": 0.5, "hi": 2.0}, *words) == "up"
    assert effect({"p": 0.01, "lo": -2.0, "hi": -0.5}, *words) == "down"
    assert effect({"p": 0.01, "lo": -0.5, "hi": 2.0}, *words) == "same"
    assert effect({"p": 0.5, "lo": 0.5, "hi": 2.0}, *words) == "same"


def test_figures_draw_every_seed():
    fig = plot_residual_seeds({"a\nb": {"residual": [0.1, 0.2], "residual_heldout": [0.5, 0.6]},
                               "c": {"residual": [0.3], "residual_heldout": []}})
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections if hasattr(c, "get_offsets")) >= 5
    fig = plot_decay_sweep({"x": ([0.0, 0.01], {"trained": [[1, 2], [3, 4]], "disjoint": [[0, 0], [1, 0]]})}, 20)
    assert len(fig.axes) == 1 and [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "0.01"]
    fig = plot_seed_counts({"a": {"trained": [1, 0], "untrained": [0, 0]}}, 16, points_on_top=True)
    points = [c for c in fig.axes[0].collections if len(c.get_offsets()) == 2]
    bars = [c for c in fig.axes[0].collections if c not in points]
    assert points and bars and min(c.get_zorder() for c in points) > max(c.get_zorder() for c in bars)
