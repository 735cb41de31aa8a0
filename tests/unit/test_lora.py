"""Chapter 05's kernels: the coupled and update stationarity losses against float64 per-candidate loops and
a constructed exact point, the batched adapter trainer against peft, users' adapter folders, statistics."""

import math

import numpy as np
import pytest
import torch

from imprint.lora.adapters import (LoRATrainConfig, check_rank, initial_factors, load_adapter, lora_model,
                                   peft_factors, train_adapters)
from imprint.lora.experiment import cell_table, mean_interval, paired_sign_flip_p, CellResult
from imprint.lora.kkt import (LoRAFactors, WeightUpdate, balancedness, coupled_kkt_loss, coupled_kkt_residual,
                              reference_coupled_residuals, update_kkt_residual)
from imprint.models.mlp import MLP, TrainConfig, train_mlps
from imprint.reconstruction.extraction import ExtractionConfig, Hyperparameters, attack_networks, extract
from imprint.reconstruction.kkt import candidate_labels, kkt_stationarity_loss, reference_kkt_residuals


def small_net(seed=0, dims=(5, 6, 4, 1)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a) for a, b in zip(dims[:-1], dims[1:])]


def factors_for(base, rank, seed=1, layers=(0, 1)):
    gen = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(rank, base[i].shape[1], generator=gen, dtype=torch.float64) * 0.3,
                torch.randn(base[i].shape[0], rank, generator=gen, dtype=torch.float64) * 0.3) for i in layers}


@pytest.mark.parametrize("at", ["tuned", "base", "mid"])
@pytest.mark.parametrize("terms", [("A", "B"), ("B",), ("A",)])
def test_coupled_loss_matches_the_per_candidate_loop(at, terms):
    base = small_net()
    factors = factors_for(base, 2)
    gen = torch.Generator().manual_seed(3)
    k, m = 2, 6
    x = torch.randn(k, m, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(k, m, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = candidate_labels(m, signed=True)
    alpha = torch.tensor([20.0, 60.0], dtype=torch.float64)
    scaling = torch.tensor([0.7, 0.7], dtype=torch.float64)
    got = coupled_kkt_loss(base, factors, scaling, x, lam, y, alpha, "binary", terms, at)
    gx, gl = torch.autograd.grad(got.sum(), (x, lam))
    want, wx, wl = [], torch.zeros_like(x), torch.zeros_like(lam)
    for c in range(k):
        xc, lc = x[c].detach().requires_grad_(True), lam[c].detach().requires_grad_(True)
        res = reference_coupled_residuals(base, factors, 0.7, xc, lc, y, float(alpha[c]), "binary", at)
        total = sum((ra ** 2).sum() * ("A" in terms) + (rb ** 2).sum() * ("B" in terms) for ra, rb in res.values())
        want.append(total.detach())
        ax, al = torch.autograd.grad(total, (xc, lc))
        wx[c], wl[c] = ax, al
    torch.testing.assert_close(got.detach(), torch.stack(want), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, wx, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gl, wl, rtol=1e-8, atol=1e-10)


def test_loss_vanishes_at_a_constructed_coupled_kkt_point():
    """Positive data and weights keep every ReLU open, so grad_W f = v x^T does not depend on W; with
    M = c u w^T (rank one) the pair A = a w^T, B = a u satisfies both conditions when s c = 1."""
    gen = torch.Generator().manual_seed(0)
    d, h, m = 4, 5, 6
    w0 = torch.rand(h, d, generator=gen, dtype=torch.float64) + 0.1
    v = torch.rand(1, h, generator=gen, dtype=torch.float64) + 0.1
    x = torch.rand(1, m, d, generator=gen, dtype=torch.float64) + 0.1
    lam = torch.rand(1, m, generator=gen, dtype=torch.float64) + 0.5
    y = torch.ones(m, dtype=torch.long)
    z = (lam[0, :, None] * x[0]).sum(0) / m
    u, w = v[0] / v.norm(), z / z.norm()
    scaling = 1.0 / float(v.norm() * z.norm())
    factors = {0: ((0.8 * w).reshape(1, d), (0.8 * u).reshape(h, 1))}
    alpha = torch.tensor([1e4], dtype=torch.float64)  # sigmoid(alpha z) == 1 in float64 for these z
    s = torch.tensor([scaling], dtype=torch.float64)
    for at in ("tuned", "base"):
        exact = coupled_kkt_loss([w0, v], factors, s, x, lam, y, alpha, "binary", ("A", "B"), at)
        assert float(exact.detach()) < 1e-24
    moved = {0: (factors[0][0] * 1.1, factors[0][1])}
    assert float(coupled_kkt_loss([w0, v], moved, s, x, lam, y, alpha, "binary", ("A", "B"))) > 1e-4
    assert coupled_kkt_residual([w0, v], factors, scaling, x[0], y.double()) < 1e-10


@pytest.mark.parametrize("at", ["tuned", "base", "mid"])
def test_update_loss_matches_the_per_candidate_loop(at):
    base = small_net(2)
    factors = factors_for(base, 3)
    system = WeightUpdate.from_factors(base, factors, 0.5, at)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 5, generator=gen, dtype=torch.float64)
    lam = torch.rand(1, 6, generator=gen, dtype=torch.float64)
    y = candidate_labels(6, signed=True)
    alpha = torch.tensor([30.0], dtype=torch.float64)
    got = system.loss(x, lam, y, alpha, "binary")
    theta = system.weights
    ref = reference_kkt_residuals(theta, x[0], lam[0], y, 30.0)  # theta - (1/m) sum grad
    want = sum(((system.updates[i] - theta[i] + ref[i]) ** 2).sum() for i in system.updates)
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-12)
    # the full-weight form without targets is unchanged
    plain = kkt_stationarity_loss(theta, x, lam, y, alpha)
    torch.testing.assert_close(plain[0], sum((r ** 2).sum() for r in ref), rtol=1e-10, atol=1e-12)


def test_stacking_zero_pads_ranks_without_changing_the_loss():
    base = small_net(5)
    low, high = factors_for(base, 2, seed=6), factors_for(base, 4, seed=7)
    systems = [LoRAFactors(base, low, 1.0, ("A", "B")), LoRAFactors(base, high, 0.5, ("A", "B"))]
    stacked = LoRAFactors.stack(systems, 1, "cpu", torch.float64)
    assert stacked.factors[0][0].shape == (2, 4, 5)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    lam = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    y = candidate_labels(4, signed=True)
    alpha = torch.tensor([40.0, 40.0], dtype=torch.float64)
    both = stacked.loss(x, lam, y, alpha, "binary")
    alone = [s.loss(x[i:i + 1], lam[i:i + 1], y, alpha[:1], "binary") for i, s in enumerate(systems)]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-12, atol=1e-14)


def test_extraction_accepts_stationarity_systems_and_refuses_mixed_batches():
    base = [w.float() for w in small_net(9)]
    factors = {i: tuple(t.float() for t in ab) for i, ab in factors_for(base, 2, seed=10).items()}
    hyper = Hyperparameters.single(0.05, 0.05, 0.01, 0.2, 50.0)
    config = ExtractionConfig(steps=3, dtype="float64", log_every=1)
    labels = candidate_labels(4, signed=True)
    result = extract(LoRAFactors(base, factors, 1.0, ("B",)), labels, 2, hyper, config, progress=False)
    assert result.x.shape == (1, 4, 5) and torch.isfinite(result.final_kkt_loss).all()
    with pytest.raises(ValueError, match="networks\\['update'\\] is a WeightUpdate"):
        attack_networks({"coupled": LoRAFactors(base, factors), "update": WeightUpdate.from_factors(base, factors)},
                        labels, 2, hyper, config, progress=False)


def test_balancedness_and_residual_controls():
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(6, 3, generator=gen, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    assert balancedness({0: (0.2 * q.T, 0.2 * p)})[0] < 1e-12
    assert balancedness({0: (q.T, torch.zeros(5, 3, dtype=torch.float64))})[0] == pytest.approx(1.0)


def test_update_residual_of_a_gradient_combination_is_zero():
    base = small_net(12)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    from imprint.reconstruction.kkt import constraint_gradients

    rows = constraint_gradients(base, x, y, "binary")
    delta = rows.T @ torch.tensor([0.5, 1.0, 0.2, 2.0], dtype=torch.float64)
    sizes = [w.numel() for w in base]
    updates = {i: delta[sum(sizes[:i]):sum(sizes[:i + 1])].reshape(base[i].shape) for i in range(len(base))}
    assert update_kkt_residual(base, updates, x, y) < 1e-8
    other = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    assert update_kkt_residual(base, updates, other, y) > 0.05


def _peft_reference(base_mlp, x, y, rank, config, seed):
    model = lora_model(base_mlp, rank, config, initial_factors(
        {i: tuple(base_mlp.layers[i].weight.shape) for i in config.layers}, rank, config, seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr)
    for _ in range(config.steps):
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-y * model(x)[:, 0]).mean()
        loss.backward()
        opt.step()
    return peft_factors(model)[0]


@pytest.mark.parametrize("init", ["standard", "balanced"])
def test_batched_adapter_training_matches_peft(init):
    base_mlp = MLP(5, [6, 4], 1).double()
    base = [layer.weight.detach() for layer in base_mlp.layers]
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([[1.0, -1, 1, -1, 1, -1, 1], [-1.0, -1, 1, 1, 1, -1, -1]], dtype=torch.float64)
    config = LoRATrainConfig(layers=(0, 1), lr=0.3, steps=15, init=init, init_scale=0.1, lora_alpha=2.0,
                             dtype="float64", log_every=5)
    run = train_adapters(base, x, y, [2, 3], [21, 22], config, progress=False)
    for s, (rank, seed) in enumerate([(2, 21), (3, 22)]):
        want = _peft_reference(base_mlp, x[s], y[s], rank, config, seed)
        got = run.adapter(s)
        for i in config.layers:
            torch.testing.assert_close(got[i][0], want[i][0], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got[i][1], want[i][1], rtol=1e-9, atol=1e-12)
        padding = run.factors[0][0][s, rank:]
        assert padding.numel() == 0 or float(padding.abs().max()) == 0.0
    assert float(run.history["loss"][-1].max()) < float(run.history["loss"][0].max())


def test_adapter_training_resumes_to_the_same_factors(tmp_path):
    base = small_net(15)
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(1, 6, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([[1.0, -1, 1, -1, 1, -1]], dtype=torch.float64)
    config = LoRATrainConfig(lr=0.2, steps=10, dtype="float64", log_every=2, checkpoint_every=4)
    whole = train_adapters(base, x, y, [2], [3], config, progress=False)
    short = LoRATrainConfig(**{**config.__dict__, "steps": 6})
    train_adapters(base, x, y, [2], [3], short, checkpoint_dir=tmp_path, progress=False)
    resumed = train_adapters(base, x, y, [2], [3], config, checkpoint_dir=tmp_path, progress=False)
    torch.testing.assert_close(resumed.factors[1][1], whole.factors[1][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds another adapter run"):
        train_adapters(base, x, y, [3], [3], config, checkpoint_dir=tmp_path, progress=False)


def test_full_fine_tuning_starts_from_the_given_weights():
    base = small_net(17)
    x = torch.randn(1, 4, 5, dtype=torch.float64)
    y = torch.tensor([[1.0, -1, 1, -1]], dtype=torch.float64)
    config = TrainConfig(widths=(6, 4), lr=0.1, steps=0, dtype="float64", log_every=1)
    run = train_mlps(x, y, config, progress=False, initial_weights=[w.unsqueeze(0) for w in base])
    for got, want in zip(run.weights, base):
        torch.testing.assert_close(got[0], want)
    with pytest.raises(ValueError, match="initial_weights has layer shapes"):
        train_mlps(x, y, config, progress=False, initial_weights=[w.unsqueeze(0) for w in base[:2]])


def test_user_adapter_folder_round_trip_and_mismatches(tmp_path):
    base_mlp = MLP(5, [6, 4], 1).double()
    config = LoRATrainConfig(layers=(0, 1), lora_alpha=4.0)
    shapes = {i: tuple(base_mlp.layers[i].weight.shape) for i in (0, 1)}
    factors = {i: (a, b + 0.1) for i, (a, b) in initial_factors(shapes, 2, config, 5).items()}
    model = lora_model(base_mlp, 2, config, factors)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded, scaling = load_adapter(base_mlp, tmp_path / "adapter", rank=2, layers=[0, 1])
    assert scaling == pytest.approx(2.0)
    for i in (0, 1):
        torch.testing.assert_close(loaded[i][1], factors[i][1])
    with pytest.raises(ValueError, match="holds rank 2 adapters: expected rank=4"):
        load_adapter(base_mlp, tmp_path / "adapter", rank=4)
    with pytest.raises(ValueError, match=r"adapts layers \[0, 1\]: expected layers=\[0\]"):
        load_adapter(base_mlp, tmp_path / "adapter", layers=[0])
    with pytest.raises(ValueError, match="layers.0.lora_A has shape"):
        load_adapter(MLP(7, [6, 4], 1).double(), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        (tmp_path / "empty").mkdir()
        load_adapter(base_mlp, tmp_path / "empty")


def test_rank_and_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="ranks=0"):
        check_rank(0, {0: (6, 5)}, "ranks")
    with pytest.raises(ValueError, match="ranks=6: layer layers.0 is \\[6, 5\\]"):
        check_rank(6, {0: (6, 5)}, "ranks")
    with pytest.raises(ValueError, match="init"):
        LoRATrainConfig(init="orthogonal")
    with pytest.raises(ValueError, match="terms"):
        LoRAFactors(small_net(), factors_for(small_net(), 1), terms=("C",))
    with pytest.raises(ValueError, match="at='middle'"):
        WeightUpdate.from_update(small_net(), {0: torch.zeros(6, 5)}, "middle")


def test_statistics_against_brute_force():
    assert paired_sign_flip_p([3, 4, 5, 6, 7], [0, 0, 0, 0, 0]) == pytest.approx(1 / 32)
    assert paired_sign_flip_p([1, 1], [1, 1]) == 1.0
    a, b = [2, 0, 3, 1], [1, 1, 0, 0]
    d = np.subtract(a, b)
    brute = np.mean([np.mean(np.array(s) * d) >= d.mean() - 1e-12
                     for s in np.array(np.meshgrid(*[[1, -1]] * 4)).T.reshape(-1, 4)])
    assert paired_sign_flip_p(a, b) == pytest.approx(brute)
    from scipy import stats

    mean, low, high = mean_interval([1.0, 2.0, 4.0])
    ref = stats.t.interval(0.95, 2, loc=np.mean([1, 2, 4]), scale=stats.sem([1, 2, 4]))
    assert (low, high) == pytest.approx(ref) and mean == pytest.approx(7 / 3)


def test_cell_table_applies_the_rule_to_every_control():
    rows = []
    for s in range(5):
        for name, count in (("trained", 3 + s), ("disjoint", 1), ("init", 0), ("random", 0)):
            rows.append({"seed": s, "rank": 4, "attack": "coupled", "network": name, "count": count,
                         "count_loss_rule": count, "reached_residual": 0.5})
        rows.append({"seed": s, "rank": 8, "attack": "coupled", "network": "trained", "count": 1,
                     "count_loss_rule": 1, "reached_residual": 0.5})
        for name in ("disjoint", "init", "random"):
            rows.append({"seed": s, "rank": 8, "attack": "coupled", "network": name, "count": 1 if s else 2,
                         "count_loss_rule": 0, "reached_residual": 0.5})
    table = {r["rank"]: r for r in cell_table([CellResult(8, list(range(5)), [4, 8], rows)])}
    assert table[4]["works"] and table[4]["disjoint_p"] == pytest.approx(1 / 32)
    assert not table[8]["works"]


def test_chapter_metrics_follow_from_the_records_table():
    """The record's headline numbers are what chapter_metrics computes from the record's own table."""
    import json

    from imprint.lora.experiment import chapter_metrics
    from imprint.runtime.provenance import repo_root

    path = repo_root() / "book" / "metrics" / "05_lora_kkt.json"
    if not path.is_file():
        pytest.skip("no run of record of chapter 05")
    metrics = json.loads(path.read_text())["metrics"]
    got = chapter_metrics(metrics["table"], ["coupled", "update", "full"])
    assert got and all(got[k] == pytest.approx(metrics[k], rel=1e-12) if isinstance(got[k], float)
                       else got[k] == metrics[k] for k in got)
    assert got["coupled_cells_work"] == sum(r["works"] for r in metrics["table"] if r["attack"] == "coupled")


def test_a_users_adapter_folder_is_attacked_end_to_end(tmp_path):
    from imprint.lora.experiment import CellSettings, attack_user_adapter
    from imprint.models.mlp import save_mlp
    from imprint.reconstruction.extraction import random_search

    base_mlp = MLP(64, [8, 6], 1).double()
    save_mlp(tmp_path / "base.safetensors", base_mlp)
    config = LoRATrainConfig(layers=(0, 1))
    shapes = {i: tuple(base_mlp.layers[i].weight.shape) for i in (0, 1)}
    factors = {i: (a, b + 0.05) for i, (a, b) in initial_factors(shapes, 2, config, 3).items()}
    lora_model(base_mlp, 2, config, factors).save_pretrained(str(tmp_path / "adapter"))
    ranges = {"init_scale": 0.05, "lr_x": 0.01, "lr_lambda": 0.01, "lambda_min": 0.2, "alpha": 50.0}
    settings = CellSettings(ranks=(2,), lora=config, full=TrainConfig(widths=(8, 6)),
                            extraction=ExtractionConfig(steps=3, dtype="float64", log_every=1),
                            hyper=random_search(2, ranges, seed=0), n_heldout=10)
    mean = torch.full((64,), 0.3)
    pixels = attack_user_adapter(tmp_path / "base.safetensors", [8, 6], tmp_path / "adapter", 3, settings, mean,
                                 "cpu", tmp_path / "work")
    assert pixels.shape == (6, 64) and float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    with pytest.raises(ValueError, match="does not match the declared architecture"):
        attack_user_adapter(tmp_path / "base.safetensors", [9, 6], tmp_path / "adapter", 3, settings, mean, "cpu",
                            tmp_path / "work")
