"""The learned decoder of chapter 06: on synthetic pairs whose gradients lie in a known subspace it must
beat the min-norm lift (which only sees A's row space) and approach cosine 1; the cosine loss ignores the
scale of its targets; checkpoints resume to the uninterrupted fit; shapes and refusals."""

import pytest
import torch

from imprint.bridge.learned import (DecoderOptions, LearnedDecoder, evaluate_decoder, fit_decoder,
                                    pair_features)

OUT, IN, R, K = 8, 16, 2, 6
LR, S = 0.1, 1.0


def _synthetic(n, seed=0):
    """G = U z with U [OUT*IN, K] fixed and z random; Delta B = -lr s G A^T, the first LoRA step from B = 0."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(OUT * IN, K, generator=gen, dtype=torch.float64))[0]
    a = torch.randn(R, IN, generator=gen, dtype=torch.float64) / IN ** 0.5
    z = torch.randn(n, K, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    g = (z @ u.T).reshape(n, OUT, IN)
    delta_b = -LR * S * g @ a.T
    return delta_b.flatten(1).float(), g.float(), (S * delta_b @ a).float(), a.float()


FAST = DecoderOptions(hidden=(128,), lr=3e-3, epochs=150, batch_size=64, patience=15, seed=0)


def test_learned_decoder_beats_the_min_norm_lift_on_a_known_subspace():
    x, g, dw, a = _synthetic(640)
    fit = fit_decoder(x[:512], g[:512], FAST)
    ev = evaluate_decoder(fit.decoder, x[512:], g[512:], delta_w=dw[512:], lora_a=a, lr=LR, scaling=S,
                          ridge_features=x[:512], ridge_targets=g[:512])
    means = ev.mean()
    print("held-out mean cosines:", means, "best epoch", fit.best_epoch)
    assert ev.cosine["learned"].shape == (128,)
    # the lift recovers only the projection of G on A's row space, about sqrt(R / IN) of it
    assert means["min_norm"] < 0.6
    assert means["learned"] > 0.97 and means["learned"] > means["min_norm"] + 0.3
    assert ev.cosine["learned"].min() > 0.8
    assert means["ridge"] > 0.99  # the map is linear: the ridge decoder is the reference to match


def test_cosine_loss_ignores_the_scale_of_the_targets():
    x, g, _, _ = _synthetic(160)
    opts = DecoderOptions(hidden=(32,), epochs=15, patience=50, seed=1)
    base = fit_decoder(x, g, opts)
    cos = evaluate_decoder(base.decoder, x, g).cosine["learned"]
    for c in (2.0 ** 10, 1e-3):
        scaled = fit_decoder(x, c * g, opts)
        assert [h["val_cosine"] for h in scaled.history] == pytest.approx([h["val_cosine"] for h in base.history],
                                                                          abs=1e-5)
        torch.testing.assert_close(evaluate_decoder(scaled.decoder, x, c * g).cosine["learned"], cos,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(evaluate_decoder(scaled.decoder, x, g).cosine["learned"], cos, rtol=0, atol=1e-5)


def test_mse_loss_learns_the_magnitude():
    x, g, _, _ = _synthetic(400)
    fit = fit_decoder(x, g, DecoderOptions(hidden=(), loss="mse", lr=1e-2, epochs=150, patience=20))
    pred = fit.decoder(x[fit.val_rows])
    ratio = pred.flatten(1).norm(dim=1) / g[fit.val_rows].flatten(1).norm(dim=1)
    assert (ratio - 1).abs().median() < 0.1


def test_decoder_is_positively_homogeneous_and_shaped():
    dec = LearnedDecoder(OUT * R, (OUT, IN), hidden=(16,))
    x = torch.randn(5, OUT * R)
    y = dec(x)
    assert y.shape == (5, OUT, IN)
    torch.testing.assert_close(dec(3.0 * x), 3.0 * y)
    assert dec(torch.zeros(2, OUT * R)).abs().max() == 0
    with pytest.raises(ValueError, match="features"):
        dec(torch.randn(5, OUT * R + 1))


def test_a_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    x, g, _, _ = _synthetic(120)
    opts = DecoderOptions(hidden=(16,), epochs=8, patience=50, seed=2)
    whole = fit_decoder(x, g, opts, checkpoint_dir=tmp_path / "whole")

    def stop(epoch, record):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_decoder(x, g, opts, checkpoint_dir=tmp_path / "cut", callback=stop)
    resumed = fit_decoder(x, g, opts, checkpoint_dir=tmp_path / "cut")
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    for p, q in zip(resumed.decoder.state_dict().values(), whole.decoder.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit_decoder(x, g, DecoderOptions(hidden=(8,), epochs=8, seed=2), checkpoint_dir=tmp_path / "cut")


def test_early_stopping_keeps_the_best_epoch():
    x, g, _, _ = _synthetic(120)
    fit = fit_decoder(x, g, DecoderOptions(hidden=(16,), lr=0.3, epochs=60, patience=3, seed=0))
    vals = [h["val_cosine"] for h in fit.history]
    assert fit.stopped_early and len(vals) < 60
    assert fit.best_val_cosine == max(vals) or fit.best_val_cosine >= max(vals) - 1e-4
    assert len(vals) - fit.best_epoch == 3


def test_features_from_pairs_and_refusals(tmp_path):
    from imprint.bridge.pairs import PairOptions, generate_pairs, load_pairs
    from imprint.bridge.targets import TargetOptions, init_lora_factors, make_target

    model = make_target(TargetOptions(channels=(2, 4), hidden=8, n_classes=3), seed=0)
    x = torch.rand(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    lora_a = init_lora_factors(model, rank=2, seed=0)
    generate_pairs(tmp_path, model, x, labels, lora_a, PairOptions(n_pairs=5, shard_size=5, batch_sizes=(1, 2)))
    pairs = load_pairs(tmp_path)
    assert pair_features(pairs, "fc1.weight").shape == (5, 8 * 2)
    assert pair_features(pairs, "fc1.weight", "delta_b_a").shape == (5, 8 * 2 + 2 * 16)
    assert pair_features(pairs, "fc2.weight", "delta_w").shape == (5, 3 * 8)
    with pytest.raises(ValueError, match="kind"):
        pair_features(pairs, "fc1.weight", "delta_a")
    with pytest.raises(ValueError, match="name"):
        pair_features(pairs, "conv1.weight")
    f, t = _synthetic(10)[:2]
    with pytest.raises(ValueError, match="targets"):
        fit_decoder(f, t[:9])
    with pytest.raises(ValueError, match="val_fraction"):
        fit_decoder(f[:2], t[:2], DecoderOptions(val_fraction=0.1))
    with pytest.raises(ValueError, match="loss"):
        DecoderOptions(loss="l1")
    with pytest.raises(ValueError, match="val_fraction"):
        DecoderOptions(val_fraction=1.0)
    dec = LearnedDecoder(f.shape[1], (OUT, IN))
    with pytest.raises(ValueError, match="delta_w, lora_a and lr"):
        evaluate_decoder(dec, f, t, lr=0.1)
    with pytest.raises(ValueError, match="ridge_features and ridge_targets"):
        evaluate_decoder(dec, f, t, ridge_features=f)
    with pytest.raises(ValueError, match="targets"):
        evaluate_decoder(dec, f, t[:, :4])
