"""The self-consuming loop: regimes, resume after a kill, corrupted checkpoints, refused folders, detection."""

import warnings

import numpy as np
import pytest
import torch

import imprint.generative.self_consuming as sc
from imprint.generative.self_consuming import (Chain, LoopOptions, balanced_draw, first_departure,
                                               load_generation_weights, member_series, run_self_consuming_loop)
from imprint.models.ddpm import DDPMConfig, DDPMTrainOptions


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CFG = DDPMConfig(image_size=4, block_out_channels=(8,), norm_num_groups=4, n_classes=2, n_train_timesteps=10)


def pool():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, *CFG.image_shape, generator=g) * 2 - 1
    return x, torch.arange(40) % 2


def options(**kw):
    base = dict(chains=(Chain("fully_synthetic", 0.5, 3), Chain("synthetic_augmentation", 0.5, 2),
                        Chain("fresh_data", 0.5, 2), Chain("fully_synthetic", 2.0, 3)),
                seeds=(0, 1), n_real=6, n_synth=8,
                first_train=DDPMTrainOptions(n_steps=3, batch_size=4), next_train=DDPMTrainOptions(n_steps=2, batch_size=4),
                n_sampling_steps=5)
    base.update(kw)
    return LoopOptions(**base)


def mean_evaluate(calls):
    def evaluate(generation, members, samples, labels, ensemble, model_index):
        calls.append(generation)
        return [{"mean": float(samples[i].mean()), "model": int(model_index[i])} for i in range(len(members))]
    return evaluate


class Killed(Exception):
    pass


def test_a_killed_run_resumes_and_reproduces_the_same_numbers(tmp_path):
    x, y = pool()
    calls_a = []
    full = run_self_consuming_loop(x, y, CFG, options(), tmp_path / "a", evaluate=mean_evaluate(calls_a), progress=False)
    assert [r.generation for r in full] == [0, 1, 2] and calls_a == [0, 1, 2]
    assert len(full[0].members) == 8 and len(full[2].members) == 4  # only the 3-generation chains reach g = 2

    calls_b = []

    def killing(generation, *args):
        if generation == 2:
            raise Killed()
        return mean_evaluate(calls_b)(generation, *args)

    with pytest.raises(Killed):
        run_self_consuming_loop(x, y, CFG, options(), tmp_path / "b", evaluate=killing, progress=False)
    resumed_calls = []
    resumed = run_self_consuming_loop(x, y, CFG, options(), tmp_path / "b", evaluate=mean_evaluate(resumed_calls),
                                      progress=False)
    assert resumed_calls == [2]  # generations 0 and 1 came from their checkpoints
    for a, b in zip(full, resumed):
        assert a.members == b.members and a.evaluation == b.evaluation and a.train_loss == b.train_loss
        assert torch.equal(a.samples, b.samples)
        # the wall times of each stage come back from the checkpoint with the rest
        assert set(b.seconds) == {"train", "sample", "evaluate"} and all(v >= 0 for v in b.seconds.values())


def test_a_corrupted_generation_is_detected_and_recomputed(tmp_path):
    x, y = pool()
    first = run_self_consuming_loop(x, y, CFG, options(), tmp_path, evaluate=mean_evaluate([]), progress=False)
    path = tmp_path / "generations" / "unit-00000001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    calls = []
    with pytest.warns(RuntimeWarning, match="corrupted"):
        again = run_self_consuming_loop(x, y, CFG, options(), tmp_path, evaluate=mean_evaluate(calls), progress=False)
    assert calls == [1, 2]
    for a, b in zip(first, again):
        assert a.evaluation == b.evaluation and torch.equal(a.samples, b.samples)


def test_warm_start_resumes_from_kept_weights(tmp_path):
    x, y = pool()
    opts = options(warm_start=True, keep_weights=2)
    full = run_self_consuming_loop(x, y, CFG, opts, tmp_path / "a", progress=False)

    def killing(generation, members, *args):
        if generation == 2:
            raise Killed()
        return [{} for _ in members]

    with pytest.raises(Killed):
        run_self_consuming_loop(x, y, CFG, opts, tmp_path / "b", evaluate=killing, progress=False)
    resumed = run_self_consuming_loop(x, y, CFG, opts, tmp_path / "b", progress=False)
    assert torch.equal(full[-1].samples, resumed[-1].samples)
    ens, members, _ = load_generation_weights(tmp_path / "b", 2, CFG)
    assert ens.n_members == len(members) == 4


def test_regimes_train_on_what_the_paper_prescribes(tmp_path, monkeypatch):
    x, y = pool()
    seen = []
    real = train = sc.train_ddpm_ensemble

    def spy(datasets, seeds, config, opts, device, init=None, vectorize=None, cuda_graph=None, **checkpointing):
        seen.append([d[0] for d in datasets])
        return real(datasets, seeds, config, opts, device, init=init, vectorize=vectorize, **checkpointing)

    monkeypatch.setattr(sc, "train_ddpm_ensemble", spy)
    opts = options(seeds=(0,))
    records = run_self_consuming_loop(x, y, CFG, opts, tmp_path, progress=False)
    del train
    pool_rows = {tuple(r.flatten().tolist()) for r in x}
    g0, g1 = seen[0], seen[1]
    assert len(g0) == 1 and g0[0].shape[0] == 6 and all(tuple(r.flatten().tolist()) in pool_rows for r in g0[0])
    by_chain = {ci: g1[i] for i, (ci, _) in enumerate(records[1].members)}
    synth0 = records[0].samples
    # fully synthetic: exactly the previous generation's samples
    assert torch.equal(by_chain[0], synth0[records[0].member_index(0, 0)])
    # augmentation: generation 0's real set plus the samples
    assert torch.equal(by_chain[1][:6], g0[0]) and torch.equal(by_chain[1][6:], synth0[records[0].member_index(1, 0)])
    # fresh data: a new real draw, disjoint from generation 0's, plus the samples
    assert all(tuple(r.flatten().tolist()) in pool_rows for r in by_chain[2][:6])
    g0_rows = {tuple(r.flatten().tolist()) for r in g0[0]}
    assert not any(tuple(r.flatten().tolist()) in g0_rows for r in by_chain[2][:6])
    # generation 0 is shared: chains with one guidance weight drew identical samples from one model
    assert torch.equal(synth0[records[0].member_index(0, 0)], synth0[records[0].member_index(1, 0)])
    assert not torch.equal(synth0[records[0].member_index(0, 0)], synth0[records[0].member_index(3, 0)])


def test_folders_of_another_architecture_or_other_settings_are_refused_before_compute(tmp_path):
    x, y = pool()
    run_self_consuming_loop(x, y, CFG, options(), tmp_path, progress=False)
    other = DDPMConfig(image_size=4, block_out_channels=(4,), norm_num_groups=4, n_classes=2, n_train_timesteps=10)
    calls = []
    with pytest.raises(ValueError, match="another architecture"):
        run_self_consuming_loop(x, y, other, options(), tmp_path, evaluate=mean_evaluate(calls), progress=False)
    with pytest.raises(ValueError, match="n_synth"):
        run_self_consuming_loop(x, y, CFG, options(n_synth=10), tmp_path, evaluate=mean_evaluate(calls), progress=False)
    assert calls == []


def test_bad_loop_arguments_are_refused():
    with pytest.raises(ValueError, match="n_generations=0"):
        Chain("fully_synthetic", 1.0, 0)
    with pytest.raises(ValueError, match="guidance_weight=-0.5"):
        Chain("fully_synthetic", -0.5, 3)
    with pytest.raises(ValueError, match="regime"):
        Chain("fully_real", 1.0, 3)
    with pytest.raises(ValueError, match="seeds"):
        options(seeds=(1, 1))
    x, y = pool()
    with pytest.raises(ValueError, match="n_real=60"):
        run_self_consuming_loop(x, y, CFG, options(n_real=60), "/nonexistent/never-written", progress=False)


def test_balanced_draw_and_member_series():
    labels = torch.arange(30) % 3
    idx = balanced_draw(labels, 10, 3, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [4, 3, 3]
    assert torch.equal(idx, balanced_draw(labels, 10, 3, seed=0))
    rec = sc.GenerationRecord(0, [(0, 1), (1, 1)], torch.zeros(2, 1, 1, 4, 4), torch.zeros(1, dtype=torch.long),
                              [0.0, 0.0], [{"a": 1}, {"a": 2}])
    assert member_series([rec], 1, 1, "a") == [2]


def test_first_departure_uses_the_generation_zero_band():
    values = np.array([[10.0, 10.5, 13.0, 20.0],
                       [11.0, 14.0, 15.0, 25.0],
                       [12.0, 11.0, 12.5, np.nan]])
    det = first_departure(values, band_sigmas=2.0, band_min_relative=0.05)
    # mean 11, sd 1 -> band [9, 13]
    assert det.band_low == pytest.approx(9.0) and det.band_high == pytest.approx(13.0)
    assert det.first_flagged == [3, 1, None]
    s = det.summary()
    assert s["n_seeds_flagged"] == 2 and s["mean_first_flagged"] == pytest.approx(2.0)
    tight = first_departure(np.array([[1.0, 1.04, 0.9], [1.0, 1.0, 1.0]]), 3.0, 0.05)
    assert tight.first_flagged == [2, None]  # floor: +-5% of the mean when the seeds agree exactly
    with pytest.raises(ValueError, match="band_sigmas"):
        first_departure(values, 0.0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first_departure(values[:1], 3.0, 0.1)


def test_disjoint_draws_never_repeat_and_start_with_the_balanced_draw():
    labels = torch.arange(60) % 3
    draws = sc.disjoint_real_draws(labels, 6, 9, 5, 3, seed=4)
    assert torch.equal(draws[0], balanced_draw(labels, 6, 3, seed=4))
    flat = torch.cat(draws)
    assert flat.unique().numel() == flat.numel() == 6 + 4 * 9
    assert all(torch.bincount(labels[d], minlength=3).tolist() == [3, 3, 3] for d in draws[1:])
    with pytest.raises(ValueError, match="n_fresh=9 .* class 0, but the pool has 20"):
        sc.disjoint_real_draws(labels, 6, 9, 8, 3, seed=4)


def test_real_shares_set_the_composition_of_later_generations(tmp_path, monkeypatch):
    x, y = pool()
    seen = []
    real = sc.train_ddpm_ensemble

    def spy(datasets, seeds, config, opts, device, init=None, vectorize=None, cuda_graph=None, **checkpointing):
        seen.append(datasets)
        return real(datasets, seeds, config, opts, device, init=init, vectorize=vectorize, **checkpointing)

    monkeypatch.setattr(sc, "train_ddpm_ensemble", spy)
    chains = (Chain("fresh_data", 0.5, 3, real_share=0.5), Chain("synthetic_augmentation", 0.5, 2, real_share=0.75))
    opts = options(chains=chains, seeds=(0,), n_real=6, n_fresh=4, n_synth=8)
    assert opts.synthetic_count(chains[0]) == 4 and opts.synthetic_count(chains[1]) == 2
    records = run_self_consuming_loop(x, y, CFG, opts, tmp_path, progress=False)
    g1 = {ci: seen[1][i] for i, (ci, _) in enumerate(records[1].members)}
    fx, fy = g1[0]
    assert fx.shape[0] == 8 and torch.bincount(fy[4:], minlength=2).tolist() == [2, 2]
    ax_, _ = g1[1]
    assert ax_.shape[0] == 8 and torch.equal(ax_[:6], seen[0][0][0])
    # every real image of the fresh chain is new: generation 0's six, then four and four more
    rows = [tuple(r.flatten().tolist()) for r in torch.cat([seen[0][0][0], fx[:4], seen[2][0][0][:4]])]
    assert len(set(rows)) == 14


def test_bad_shares_and_small_pools_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match="real_share=1.5"):
        Chain("fresh_data", 0.5, 3, real_share=1.5)
    with pytest.raises(ValueError, match="real_share=-0.1"):
        Chain("synthetic_augmentation", 0.5, 3, real_share=-0.1)
    with pytest.raises(ValueError, match="fully synthetic"):
        Chain("fully_synthetic", 0.5, 3, real_share=0.5)
    with pytest.raises(ValueError, match="n_synth=8"):
        options(chains=(Chain("fresh_data", 0.5, 2, real_share=0.25),), n_fresh=6)
    x, y = pool()  # 20 images per class: 3 + 4 * 5 > 20
    calls = []
    with pytest.raises(ValueError, match="n_fresh=10"):
        run_self_consuming_loop(x, y, CFG, options(chains=(Chain("fresh_data", 0.5, 5),), n_fresh=10),
                                "/nonexistent/never-written", evaluate=mean_evaluate(calls), progress=False)
    assert calls == []
