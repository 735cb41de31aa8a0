"""Chapter 00's run: one network per data seed, batched, with KKT fits at snapshots (run_implicit_bias)."""

import numpy as np
import pytest
import scipy.stats
import torch

from imprint.data.digits import even_odd_targets, load_digit_split
from imprint.models.mlp import TrainConfig, train_mlps
from imprint.reconstruction.implicit_bias import (check_digit_sizes, init_seed_of, kkt_fit, log_snapshots,
                                                  mean_interval, run_implicit_bias)

N_TRAIN, N_HELDOUT = 20, 10


def _config(steps=120, schedule="constant"):
    return TrainConfig(widths=(8, 8), lr=0.5, steps=steps, first_layer_std=0.1, dtype="float64", log_every=20,
                       schedule=schedule)


def _rows(x):
    return {tuple(r) for r in x.numpy().tolist()}


def test_each_data_seed_is_a_fresh_disjoint_draw(one_torch_thread):
    run = run_implicit_bias([0, 1, 2], N_TRAIN, N_HELDOUT, _config(steps=20))
    images = [(_rows(sp.images(sp.x_train).reshape(N_TRAIN, -1)),
               _rows(sp.images(sp.x_heldout).reshape(N_HELDOUT, -1))) for sp in run.splits]
    for train, held in images:
        assert len(train) == N_TRAIN and len(held) == N_HELDOUT and not train & held
    assert images[0][0] != images[1][0] != images[2][0]
    assert images[0][1] != images[1][1]
    assert len(set(run.init_seeds)) == 3 and run.init_seeds[1] == init_seed_of(0, 1)


def test_batched_networks_match_one_network_trained_alone(one_torch_thread):
    """Network k of the batch is the network trained alone on data seed k: x and y stack per network."""
    cfg = _config()
    run = run_implicit_bias([3, 5], N_TRAIN, N_HELDOUT, cfg, snapshots=[40, 120], init_seed=2)
    assert run.snapshots == [40, 120] and len(run.fits) == 2 and len(run.fits[0]) == 2
    for k, ds in enumerate([3, 5]):
        split = load_digit_split(N_TRAIN, N_HELDOUT, ds)
        y = even_odd_targets(split.label_train)
        alone = train_mlps(split.x_train[None], y[None], cfg, seeds=[init_seed_of(2, ds)], progress=False)
        for a, b in zip(alone.weights, run.result.weights):
            torch.testing.assert_close(a[0], b[k], rtol=1e-12, atol=1e-14)
        net = alone.model(0, dtype=torch.float64)
        ref, ref_held = kkt_fit(net, split.x_train, y), kkt_fit(net, split.x_heldout,
                                                               even_odd_targets(split.label_heldout))
        assert run.fits[-1][k].rel_residual == pytest.approx(ref.rel_residual, rel=1e-9, abs=1e-12)
        assert run.fits_heldout[-1][k].rel_residual == pytest.approx(ref_held.rel_residual, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(run.fits[-1][k].margins, ref.margins, rtol=1e-9)
        signs = torch.sign(net(split.x_heldout.double())[:, 0])
        acc = float((signs == even_odd_targets(split.label_heldout)).double().mean())
        assert run.test_accuracy[k] == acc
    np.testing.assert_allclose(run.residuals()[-1], [f.rel_residual for f in run.final()])


@pytest.mark.parametrize("schedule", ["constant", "normalised"])
def test_resumed_run_gives_identical_numbers(tmp_path, schedule, one_torch_thread):
    straight = run_implicit_bias([0, 1], N_TRAIN, N_HELDOUT, _config(schedule=schedule), snapshots=[40, 120])
    # interrupted after the first snapshot, then resumed; then rerun with everything on disk
    run_implicit_bias([0, 1], N_TRAIN, N_HELDOUT, _config(steps=40, schedule=schedule), checkpoint_dir=tmp_path)
    resumed = run_implicit_bias([0, 1], N_TRAIN, N_HELDOUT, _config(schedule=schedule), snapshots=[40, 120],
                                checkpoint_dir=tmp_path)
    again = run_implicit_bias([0, 1], N_TRAIN, N_HELDOUT, _config(schedule=schedule), snapshots=[40, 120],
                              checkpoint_dir=tmp_path)
    for other in (resumed, again):
        np.testing.assert_array_equal(straight.residuals(), other.residuals())
        np.testing.assert_array_equal(straight.residuals(heldout=True), other.residuals(heldout=True))
        np.testing.assert_array_equal(straight.final()[1].lam, other.final()[1].lam)
        np.testing.assert_array_equal(straight.test_accuracy, other.test_accuracy)
        for name in ("loss", "normalized_margin"):
            torch.testing.assert_close(straight.history[name], other.history[name], rtol=0, atol=0)
    # another n_heldout is another configuration: a fresh folder, not the stored fits
    other = run_implicit_bias([0, 1], N_TRAIN, N_HELDOUT + 2, _config(schedule=schedule), checkpoint_dir=tmp_path)
    assert len(other.final(heldout=True)[0].margins) == N_HELDOUT + 2
    assert len(list(tmp_path.iterdir())) == 2


def test_bad_input_names_the_parameter_before_training():
    with pytest.raises(ValueError, match="data_seeds"):
        run_implicit_bias([], N_TRAIN, N_HELDOUT, _config())
    with pytest.raises(ValueError, match="data_seeds"):
        run_implicit_bias([1, 1], N_TRAIN, N_HELDOUT, _config())
    with pytest.raises(ValueError, match="n_train=1000 and n_heldout=800"):
        run_implicit_bias([0], 1000, 800, _config())
    with pytest.raises(ValueError, match="snapshots"):
        run_implicit_bias([0], N_TRAIN, N_HELDOUT, _config(), snapshots=[40, 100])
    with pytest.raises(ValueError, match="n_heldout"):
        check_digit_sizes(10, 0)
    assert check_digit_sizes(890, 850) == (890, 850)  # 174 eights: 89 + 85 fit
    with pytest.raises(ValueError, match="class 8"):
        check_digit_sizes(890, 860)  # 89 + 86 eights do not


def test_snapshots_and_interval():
    assert log_snapshots(4000, 100, 5) == [100, 300, 600, 1600, 4000]
    assert log_snapshots(50, 100, 3) == [50]
    values = [0.3, 0.5, 0.45, 0.2]
    mean, lo, hi = mean_interval(values)
    ref = scipy.stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (lo, hi) == pytest.approx(ref, rel=1e-12)
    assert np.isnan(mean_interval([0.4])[1])
