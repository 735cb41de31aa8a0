"""The class-conditional DDPM: schedule, batches, training determinism, guidance, sampling, checkpoints."""

import numpy as np
import pytest
import torch

from imprint.models.ddpm import (DDPMConfig, DDPMEnsemble, DDPMTrainOptions, balanced_labels, build_scheduler,
                                 build_unet, derive_seed, diffuse, draw_training_batch, guided_epsilon,
                                 load_ensemble, sample_ddpm, sample_ddpm_ensemble, save_ensemble,
                                 train_ddpm_ensemble)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = DDPMConfig(image_size=4, block_out_channels=(8, 8), norm_num_groups=4, n_classes=3, n_train_timesteps=20)


def tiny_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *TINY.image_shape), generator=g) * 2 - 1, torch.arange(n) % TINY.n_classes


def test_scheduler_is_the_linear_ddpm_schedule_with_500_steps():
    cfg = DDPMConfig.digits8()
    sched = build_scheduler(cfg)
    betas = np.linspace(1e-4, 0.02, 500)
    assert cfg.n_train_timesteps == 500 and len(sched.betas) == 500
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-5)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-4)


def test_unet_has_one_class_embedding_per_class_plus_the_null_label():
    unet = build_unet(DDPMConfig.digits8())
    assert unet.class_embedding.num_embeddings == 11
    assert DDPMConfig.digits8().null_label == 10


def test_config_rejects_inconsistent_architectures():
    with pytest.raises(ValueError, match="norm_num_groups"):
        DDPMConfig(block_out_channels=(30, 64), norm_num_groups=8)
    with pytest.raises(ValueError, match="image_size"):
        DDPMConfig(image_size=10, block_out_channels=(8, 8, 8), norm_num_groups=4)


def test_diffuse_matches_diffusers_add_noise():
    sched = build_scheduler(TINY)
    x0, _ = tiny_data(6)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 7, 11, 15, 19])
    expected = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(diffuse(x0, noise, t, sched.alphas_cumprod), expected)


@pytest.mark.parametrize("p", [0.0, 0.1, 1.0])
def test_label_dropout_replaces_labels_by_the_null_label_at_rate_p(p):
    x = torch.zeros(50, *TINY.image_shape)
    labels = torch.arange(50) % 3
    g = torch.Generator().manual_seed(0)
    batch = draw_training_batch(x, labels, 20000, TINY, p, g)
    dropped = (batch.labels == TINY.null_label).double().mean().item()
    assert abs(dropped - p) < 5 * np.sqrt(p * (1 - p) / 20000) + 1e-12
    kept = batch.labels[batch.labels != TINY.null_label]
    assert kept.numel() == 0 or kept.max() < TINY.n_classes


def test_training_is_deterministic_under_a_seed_and_depends_on_it():
    data = [tiny_data()]
    opts = DDPMTrainOptions(n_steps=4, batch_size=8)
    a, la = train_ddpm_ensemble(data, [1], TINY, opts)
    b, lb = train_ddpm_ensemble(data, [1], TINY, opts)
    c, _ = train_ddpm_ensemble(data, [2], TINY, opts)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    assert torch.equal(la, lb)
    assert any(not torch.equal(a.params[k], c.params[k]) for k in a.params)


def test_an_ensemble_member_equals_the_same_model_trained_alone():
    da, db = tiny_data(12, 0), tiny_data(9, 1)
    opts = DDPMTrainOptions(n_steps=5, batch_size=6)
    both, _ = train_ddpm_ensemble([da, db], [3, 4], TINY, opts, vectorize=False)
    alone, _ = train_ddpm_ensemble([db], [4], TINY, opts, vectorize=False)
    for k in both.params:
        torch.testing.assert_close(both.params[k][1], alone.params[k][0], rtol=1e-5, atol=1e-6)


def test_vmapped_training_equals_looped_training():
    data = [tiny_data(12, 0), tiny_data(10, 1)]
    opts = DDPMTrainOptions(n_steps=4, batch_size=6)
    looped, l_loss = train_ddpm_ensemble(data, [3, 4], TINY, opts, vectorize=False)
    vmapped, v_loss = train_ddpm_ensemble(data, [3, 4], TINY, opts, vectorize=True)
    torch.testing.assert_close(v_loss, l_loss, rtol=1e-4, atol=1e-6)
    # Adam divides by the gradient's running scale, so an entry whose gradient is near zero can move by a
    # few percent of lr when vmap sums in another order: the largest gap is bounded in units of lr, and
    # the typical entry must agree to float32 rounding (wrong batches or steps would move every entry).
    for k in looped.params:
        gap = (vmapped.params[k] - looped.params[k]).abs()
        assert gap.max() <= 0.05 * opts.lr, (k, gap.max())
        assert gap.median() <= 1e-6, (k, gap.median())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_equals_eager_training():
    """The replayed graph runs the same steps as the eager loop: same batches, same learning rates, same Adam."""
    data = [tiny_data(12, 0), tiny_data(10, 1), tiny_data(9, 2)]
    opts = DDPMTrainOptions(n_steps=12, batch_size=6)
    eager, e_loss = train_ddpm_ensemble(data, [3, 4, 5], TINY, opts, "cuda", vectorize=True, cuda_graph=False)
    graphed, g_loss = train_ddpm_ensemble(data, [3, 4, 5], TINY, opts, "cuda", vectorize=True, cuda_graph=True)
    torch.testing.assert_close(g_loss, e_loss, rtol=1e-4, atol=1e-6)
    for k in eager.params:
        torch.testing.assert_close(graphed.params[k], eager.params[k], rtol=1e-4, atol=1e-5)
    assert g_loss[:, 3:].abs().sum() > 0  # the replayed steps wrote their losses


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graph"):
        train_ddpm_ensemble([tiny_data()], [0], TINY, DDPMTrainOptions(n_steps=1, batch_size=2), "cpu",
                            cuda_graph=True)


def test_vmapped_and_looped_ensembles_compute_the_same_function():
    ens = DDPMEnsemble.initialise(TINY, [0, 1, 2])
    x = torch.randn(3, 5, *TINY.image_shape)
    t = torch.randint(0, 20, (3, 5))
    labels = torch.tensor([0, 1, 2, 3, 1])
    looped = DDPMEnsemble(TINY, ens.params, ens.buffers, vectorize=False).epsilon(x, t, labels)
    vmapped = DDPMEnsemble(TINY, ens.params, ens.buffers, vectorize=True).epsilon(x, t, labels)
    torch.testing.assert_close(looped, vmapped, rtol=1e-4, atol=1e-5)
    # and each member is the plain UNet2DModel with its weights
    torch.testing.assert_close(looped[1], ens.model(1)(x[1], t[1], class_labels=labels).sample, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_denoising_loss():
    data = [tiny_data(30)]
    _, losses = train_ddpm_ensemble(data, [0], TINY, DDPMTrainOptions(n_steps=150, batch_size=32, lr=3e-3))
    assert losses[0, -30:].mean() < 0.8 * losses[0, :30].mean()


def test_guidance_combines_conditional_and_unconditional_predictions():
    ec, eu = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(guided_epsilon(ec, eu, 0.0), ec)
    torch.testing.assert_close(guided_epsilon(ec, eu, 2.0), 3 * ec - 2 * eu)


def _reference_ancestral_sampler(model, cfg, labels, w, seed, n_steps):
    """DDPM ancestral sampling written from Ho et al. (2020), eqs. 6-7 and 11, with x0 clipped to [-1, 1]."""
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.n_train_timesteps, dtype=torch.float32)
    abar = torch.cumprod(1 - betas, 0)
    ratio = cfg.n_train_timesteps // n_steps
    ts = list(range(0, n_steps * ratio, ratio))[::-1]
    g = torch.Generator().manual_seed(derive_seed(seed, 2))
    n = len(labels)
    x = torch.randn((1, n, *cfg.image_shape), generator=g)[0]
    null = torch.full_like(labels, cfg.null_label)
    for t in ts:
        tt = torch.full((n,), t)
        with torch.no_grad():
            eps_c = model(x, tt, class_labels=labels).sample
            eps = eps_c if w == 0 else (1 + w) * eps_c - w * model(x, tt, class_labels=null).sample
        a_t = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else torch.tensor(1.0)
        beta_t = 1 - a_t / a_prev
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + ((1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            var = (1 - a_prev) / (1 - a_t) * beta_t
            x = mean + var.clamp_min(1e-20).sqrt() * torch.randn((1, n, *cfg.image_shape), generator=g)[0]
        else:
            x = mean
    return x.clamp(-1, 1)


@pytest.mark.parametrize("w,n_steps", [(0.0, 20), (1.5, 20), (0.5, 5)])
def test_sampler_matches_a_hand_written_ancestral_sampler(w, n_steps):
    ens = DDPMEnsemble.initialise(TINY, [7])
    labels = torch.tensor([0, 1, 2, 0])
    ours = sample_ddpm_ensemble(ens, labels, [w], [11], n_steps)[0]
    ref = _reference_ancestral_sampler(ens.model(0), TINY, labels, w, 11, n_steps)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_sampling_is_deterministic_under_a_seed_and_members_are_independent():
    ens = DDPMEnsemble.initialise(TINY, [0, 1])
    labels = balanced_labels(6, 3)
    a = sample_ddpm_ensemble(ens, labels, [0.5, 1.0], [5, 6], 10)
    b = sample_ddpm_ensemble(ens, labels, [0.5, 1.0], [5, 6], 10)
    assert torch.equal(a, b)
    alone = sample_ddpm_ensemble(ens.select([1]), labels, [1.0], [6], 10)
    torch.testing.assert_close(alone[0], a[1])
    other = sample_ddpm(ens.model(1), TINY, labels, 1.0, seed=7, n_steps=10)
    assert not torch.allclose(other, a[1])


def test_bad_sampling_arguments_fail_before_any_compute():
    ens = DDPMEnsemble.initialise(TINY, [0])
    with pytest.raises(ValueError, match="guidance_weight"):
        sample_ddpm_ensemble(ens, balanced_labels(3, 3), [-0.5], [0])
    with pytest.raises(ValueError, match="guidance_weight"):
        sample_ddpm(ens.model(0), TINY, balanced_labels(3, 3), -1.0, seed=0)
    with pytest.raises(ValueError, match="n_steps"):
        sample_ddpm_ensemble(ens, balanced_labels(3, 3), [0.0], [0], n_steps=21)
    with pytest.raises(ValueError, match="labels"):
        sample_ddpm_ensemble(ens, torch.tensor([0, 3]), [0.0], [0])
    with pytest.raises(ValueError, match="datasets"):
        train_ddpm_ensemble([(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))], [0], TINY,
                            DDPMTrainOptions(n_steps=1))


def test_checkpoint_round_trip_and_refusal_of_another_architecture(tmp_path):
    ens = DDPMEnsemble.initialise(TINY, [0, 1])
    path = save_ensemble(tmp_path / "ens.safetensors", ens)
    back = load_ensemble(path, TINY)
    for k in ens.params:
        assert torch.equal(back.params[k], ens.params[k])
    other = DDPMConfig(image_size=4, block_out_channels=(8, 16), norm_num_groups=4, n_classes=3, n_train_timesteps=20)
    with pytest.raises(ValueError, match="another architecture"):
        load_ensemble(path, other)
    with pytest.raises(FileNotFoundError, match="path="):
        load_ensemble(tmp_path / "missing.safetensors", TINY)
