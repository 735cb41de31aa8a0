"""One cell of the reconstruction experiment over data seeds (imprint.reconstruction.experiment)."""

import numpy as np
import pytest
import torch

from imprint.data.digits import even_odd_targets
from imprint.data.images import fixed_heldout, load_digit_images
from imprint.models.mlp import TrainConfig
from imprint.reconstruction.experiment import CellResult, check_cell, class_halves, run_cell, works
from imprint.reconstruction.extraction import ExtractionConfig, Hyperparameters

TRAIN = dict(widths=(12,), lr=0.5, steps=120, first_layer_std=1e-3, hidden_std=3e-3, dtype="float64", log_every=20,
             checkpoint_every=40)
HYPER = Hyperparameters.from_rows([
    dict(init_scale=0.03, lr_x=0.05, lr_lambda=0.01, lambda_min=0.3, alpha=100.0, seed=1),
    dict(init_scale=0.02, lr_x=0.1, lr_lambda=0.02, lambda_min=0.2, alpha=150.0, seed=2)])


def _extract(steps=20):
    return ExtractionConfig(steps=steps, dtype="float64", log_every=5, checkpoint_every=10)


def _cell(out, seeds=(0, 1), n=6, steps=20, **kw):
    return run_cell("t", "digits", n, even_odd_targets, list(seeds), TrainConfig(**TRAIN), HYPER, _extract(steps),
                    out, sizes=kw.pop("sizes", [n, 10]), **kw)


def _rows(x, mean):
    return {tuple(np.round((r + mean).numpy(), 6)) for r in x}


def test_splits_are_disjoint_fresh_per_seed_and_centred_on_the_dataset(tmp_path, one_torch_thread):
    cell = _cell(tmp_path)
    images, _ = load_digit_images()
    mean = torch.as_tensor(images.reshape(len(images), -1).mean(0))
    firsts = []
    for s in cell.seeds:
        torch.testing.assert_close(s.split.mean, mean)
        torch.testing.assert_close(s.disjoint.mean, mean)
        attacked, control = _rows(s.split.x_train, s.split.mean), _rows(s.disjoint.x_train, s.disjoint.mean)
        pool = _rows(s.split.x_heldout, s.split.mean)
        assert len(attacked) == cell.n_train == len(control) and len(pool) == cell.n_heldout
        assert not attacked & control and not attacked & pool and not control & pool
        torch.testing.assert_close(s.split.x_heldout, s.disjoint.x_heldout, rtol=0, atol=1e-6)  # one pool per seed
        firsts.append(attacked)
    assert firsts[0] != firsts[1]  # a fresh draw per data seed
    assert cell.networks == ["trained", "disjoint", "untrained"]
    # the untrained control is the attacked network's initialisation: same shapes, far smaller output layer
    s = cell.seeds[0]
    assert [w.shape for w in s.networks["untrained"]] == [w.shape for w in s.networks["trained"]]
    assert s.networks["untrained"][-1].norm() < s.networks["trained"][-1].norm()


def test_pool_size_is_fixed_across_the_sizes_of_a_sweep():
    _, labels = load_digit_images()
    sizes = [6, 10, 40]
    pools = {n: check_cell("digits", n, [0], sizes=sizes)[1] for n in sizes}
    assert set(pools.values()) == {fixed_heldout(labels, sizes)}
    assert check_cell("digits", 6, [0], sizes=sizes, n_heldout=50)[1] == 50


def test_batched_seeds_match_a_seed_run_alone(tmp_path, one_torch_thread):
    both = _cell(tmp_path / "both", seeds=(0, 3))
    alone = _cell(tmp_path / "alone", seeds=(3,))
    a, b = both.seeds[1], alone.seeds[0]
    assert a.data_seed == b.data_seed == 3
    for net in both.networks:
        torch.testing.assert_close(a.results[net].x, b.results[net].x, rtol=1e-9, atol=1e-12)
        assert a.counts(net) == b.counts(net)


def test_a_second_call_resumes_from_the_checkpoints(tmp_path, one_torch_thread):
    fresh = _cell(tmp_path / "fresh", steps=20)
    _cell(tmp_path / "resumed", steps=10)
    resumed = _cell(tmp_path / "resumed", steps=20)  # same keyed folders: continues from step 10
    again = _cell(tmp_path / "resumed", steps=20)  # nothing left to do: read back
    assert list((tmp_path / "resumed").glob("extraction/*/unit-*.safetensors"))
    for cell in (resumed, again):
        for f, r in zip(fresh.seeds, cell.seeds):
            for net in fresh.networks:
                torch.testing.assert_close(f.results[net].x, r.results[net].x, rtol=0, atol=0)
                torch.testing.assert_close(f.results[net].final_kkt_loss, r.results[net].final_kkt_loss,
                                           rtol=0, atol=0)
            assert f.residuals == r.residuals


def test_a_second_schedule_adds_its_attacked_network_and_control(tmp_path, one_torch_thread):
    normalised = TrainConfig(**TRAIN, schedule="normalised")
    cell = _cell(tmp_path, seeds=(0,), schedules=[normalised])
    assert cell.networks == ["trained", "trained_normalised", "disjoint", "disjoint_normalised", "untrained"]
    s = cell.seeds[0]
    assert set(s.residuals) == {"trained", "trained_normalised"}
    assert all(0 <= r <= 1 for r in s.residuals.values())
    assert float(s.margins["trained_normalised"].min()) > 0  # separated
    # attacked at the plain network's norm; the norm it was trained to is kept
    norm = lambda ws: float(torch.sqrt(sum((w ** 2).sum() for w in ws)))
    for role in ("trained", "disjoint"):
        assert norm(s.networks[role + "_normalised"]) == pytest.approx(s.norms[role], rel=1e-9)
        assert norm(s.networks[role]) == pytest.approx(s.norms[role], rel=1e-9)
    assert s.norms["trained_normalised"] > s.norms["trained"]
    verdict = works(cell, "trained_normalised")
    assert set(verdict["tests"]) == {"disjoint_normalised", "untrained"}
    assert verdict["works"] is False  # one seed cannot give p < 0.05


def test_bad_input_names_the_parameter_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="data_seeds"):
        _cell(tmp_path, seeds=())
    with pytest.raises(ValueError, match="data_seeds"):
        _cell(tmp_path, seeds=(1, 1))
    with pytest.raises(ValueError, match="n_heldout"):
        _cell(tmp_path, n_heldout=10_000)
    with pytest.raises(ValueError, match="sizes"):
        _cell(tmp_path, sizes=[10, 20])
    with pytest.raises(ValueError, match="n_train"):
        _cell(tmp_path, n=1, sizes=[1])
    assert not list(tmp_path.iterdir())  # nothing was trained or written


def test_class_halves_is_a_fixed_split_of_the_ten_digits():
    positive, targets = class_halves(10, seed=0)
    assert len(positive) == 5 and positive == class_halves(10, seed=0)[0]
    assert positive not in [(0, 2, 4, 6, 8), (1, 3, 5, 7, 9)]
    y = targets(torch.arange(10))
    assert y.tolist() == [1.0 if c in positive else -1.0 for c in range(10)]


def test_works_needs_both_controls():
    class Fake(CellResult):
        def __init__(self):
            self.networks = ["trained", "disjoint", "untrained"]

        def paired(self, network, control, rule, configs):
            return {"p": 0.01, "lo": 1.0 if control == "disjoint" else 0.0}

    assert works(Fake())["works"] is False
    with pytest.raises(ValueError, match="network"):
        works(Fake(), "disjoint")
