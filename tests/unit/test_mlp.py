import pytest
import torch

from imprint.models.mlp import (MLP, TrainConfig, batched_forward, batched_grads, batched_loss, init_weights,
                                load_mlp, margins, save_mlp, train_mlps)


def _data(s=2, n=7, d=5, loss="logistic", k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s, n, d, generator=gen, dtype=torch.float64)
    if loss == "logistic":
        y = torch.where(torch.rand(s, n, generator=gen) > 0.5, 1.0, -1.0).double()
    else:
        y = torch.randint(0, k, (s, n), generator=gen)
    return x, y


@pytest.mark.parametrize("loss,d_out,wd", [("logistic", 1, 0.0), ("cross_entropy", 3, 0.0), ("logistic", 1, 0.1)])
def test_batched_grads_match_autograd(loss, d_out, wd):
    x, y = _data(loss=loss)
    cfg = TrainConfig(widths=(6, 4), first_layer_std=0.5, loss=loss)
    ws = [w.requires_grad_() for w in init_weights(5, d_out, cfg, [1, 2])]
    total = batched_loss(batched_forward(ws, x)[0], y, loss).sum()
    total = total + wd / 2 * sum((w**2).sum() for w in ws)
    ref = torch.autograd.grad(total, ws)
    ours = batched_grads([w.detach() for w in ws], x, y, loss, wd)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batched_forward_matches_mlp_module():
    x, y = _data()
    cfg = TrainConfig(widths=(6, 4), first_layer_std=0.5)
    ws = init_weights(5, 1, cfg, [3, 4])
    out, _ = batched_forward(ws, x)
    result_like = MLP(5, (6, 4), 1).double()
    for k in range(2):
        for layer, w in zip(result_like.layers, ws):
            layer.weight.data = w[k].clone()
        torch.testing.assert_close(result_like(x[k]), out[k])


def test_multiclass_margin_is_true_minus_best_other():
    out = torch.tensor([[[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]]])
    q = margins(out, torch.tensor([[0, 2]]), "cross_entropy")
    torch.testing.assert_close(q, torch.tensor([[1.0, -4.0]]))


def test_training_decreases_loss_and_separates():
    x, y = _data(s=2, n=10, d=4)
    cfg = TrainConfig(widths=(16, 16), lr=0.5, steps=400, first_layer_std=0.1, dtype="float64", log_every=50)
    result = train_mlps(x, y, cfg, progress=False)
    loss = result.history["loss"]
    assert loss.shape == (9, 2)
    assert bool((loss[-1] < 0.2 * loss[0]).all())
    assert bool((result.history["train_error"][-1] == 0).all())
    # the returned modules compute what the batched trainer trained
    net = result.model(1)
    torch.testing.assert_close(net(x[1])[:, 0], batched_forward(result.weights, x)[0][1, :, 0])


def test_resume_reproduces_uninterrupted_run(tmp_path):
    x, y = _data(s=2, n=8, d=4)
    kw = dict(widths=(8, 8), lr=0.3, first_layer_std=0.1, dtype="float64", log_every=10, checkpoint_every=20)
    straight = train_mlps(x, y, TrainConfig(steps=60, **kw), progress=False)
    train_mlps(x, y, TrainConfig(steps=40, **kw), checkpoint_dir=tmp_path, progress=False)
    resumed = train_mlps(x, y, TrainConfig(steps=60, **kw), checkpoint_dir=tmp_path, progress=False)
    for a, b in zip(straight.weights, resumed.weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(straight.history["loss"], resumed.history["loss"], rtol=0, atol=0)


def test_resume_refuses_another_configuration(tmp_path):
    x, y = _data(s=1, n=8, d=4)
    train_mlps(x, y, TrainConfig(widths=(8,), steps=10, log_every=10), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train_mlps(x, y, TrainConfig(widths=(8,), steps=20, lr=0.1, log_every=10), checkpoint_dir=tmp_path,
                   progress=False)


def test_save_and_load_roundtrip_and_shape_check(tmp_path):
    net = MLP(5, (6, 4), 1)
    path = save_mlp(tmp_path / "m.safetensors", net, {"note": "x"})
    back = load_mlp(path, 5, (6, 4), 1)
    for a, b in zip(net.parameters(), back.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="does not match the declared architecture"):
        load_mlp(path, 5, (6, 5), 1)
    with pytest.raises(FileNotFoundError):
        load_mlp(tmp_path / "missing.safetensors", 5, (6, 4), 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr="), (dict(widths=()), "widths="), (dict(loss="hinge"), "loss="),
    (dict(first_layer_std=-1.0), "first_layer_std="), (dict(dtype="float16"), "dtype="),
    (dict(log_every=10, checkpoint_every=15), "checkpoint_every="),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_rejects_bad_targets():
    x, _ = _data(s=1, n=4, d=3)
    with pytest.raises(ValueError, match=r"\{\+1, -1\}"):
        train_mlps(x, torch.zeros(1, 4), TrainConfig(widths=(4,), steps=1), progress=False)
    with pytest.raises(ValueError, match="targets has shape"):
        train_mlps(x, torch.ones(1, 5), TrainConfig(widths=(4,), steps=1), progress=False)
