"""Proxy pairs of chapter 06: the T-step path against an autograd loop, the stored pairs against direct
gradients, and a killed generation resumed into the same tensors as an uninterrupted one."""

import json

import pytest
import torch
from torch import nn

from imprint.bridge.pairs import PairOptions, generate_pairs, load_pairs, lora_path_pairs
from imprint.bridge.per_example import lora_step_pairs
from imprint.bridge.targets import TargetOptions, init_lora_factors, make_target

D = torch.float64
OPTS = TargetOptions(channels=(2, 4), hidden=8, n_classes=3)


def _case(dtype=torch.float32, n=12):
    model = make_target(OPTS, seed=0).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return model, x, labels, init_lora_factors(model, rank=2, seed=2)


def _loop_path(model, x, labels, lora_a, lr, s, steps, train_a):
    base = {n: p.detach() for n, p in model.named_parameters()}
    b = {n: torch.zeros(base[n].shape[0], a.shape[0], dtype=D, requires_grad=True) for n, a in lora_a.items()}
    a = {n: v.clone().requires_grad_(train_a) for n, v in lora_a.items()}
    total = {n: torch.zeros_like(base[n]) for n in lora_a}
    for _ in range(steps):
        w = {n: (base[n] + s * b[n] @ a[n]).detach().requires_grad_(True) for n in lora_a}
        loss_w = nn.functional.cross_entropy(torch.func.functional_call(model, {**base, **w}, (x,)), labels)
        gw = torch.autograd.grad(loss_w, list(w.values()))
        for n, g in zip(w, gw):
            total[n] += g
        adapted = {n: base[n] + s * b[n] @ a[n] for n in lora_a}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, {**base, **adapted}, (x,)), labels)
        leaves = list(b.values()) + (list(a.values()) if train_a else [])
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for leaf, g in zip(leaves, grads):
                leaf -= lr * g
    return total, {n: v.detach() for n, v in b.items()}, {n: (a[n] - lora_a[n]).detach() for n in lora_a}


@pytest.mark.parametrize("train_a", [True, False])
def test_path_pairs_match_an_autograd_loop(train_a):
    model, x, labels, lora_a = _case(D)
    lr, s, steps = 0.5, 1.5, 3
    got = lora_path_pairs(model, x, labels, lora_a, lr=lr, steps=steps, scaling=s, batch_size=3, train_a=train_a)
    for k in range(4):
        sl = slice(3 * k, 3 * k + 3)
        full, db, da = _loop_path(model, x[sl], labels[sl], lora_a, lr, s, steps, train_a)
        for n in lora_a:
            torch.testing.assert_close(got.full[n][k], full[n], rtol=0, atol=1e-10)
            torch.testing.assert_close(got.delta_b[n][k], db[n], rtol=0, atol=1e-10)
            torch.testing.assert_close(got.delta_a[n][k], da[n], rtol=0, atol=1e-10)
            torch.testing.assert_close(got.delta_w[n][k], s * db[n] @ (lora_a[n] + da[n]), rtol=0, atol=1e-10)
            if not train_a:  # A frozen: Delta B = -lr s (sum_t G_t) A^T exactly
                torch.testing.assert_close(db[n], -lr * s * full[n] @ lora_a[n].T, rtol=0, atol=1e-10)
    assert got.delta_a["fc1.weight"].abs().max() > 0 if train_a else got.delta_a["fc1.weight"].abs().max() == 0


def test_one_step_path_is_the_step_pairs():
    model, x, labels, lora_a = _case(D)
    one = lora_path_pairs(model, x, labels, lora_a, lr=0.2, steps=1, scaling=2.0, batch_size=2)
    ref = lora_step_pairs(model, x, labels, lora_a, lr=0.2, scaling=2.0, batch_size=2)
    for n in lora_a:
        torch.testing.assert_close(one.full[n], ref.full[n], rtol=0, atol=1e-12)
        torch.testing.assert_close(one.delta_b[n], ref.delta_b[n], rtol=0, atol=1e-12)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pairs_are_stored_in_shards_and_match_direct_gradients(tmp_path):
    model, x, labels, lora_a = _case()
    opts = PairOptions(n_pairs=20, shard_size=8, batch_sizes=(1, 2, 3), steps=(1, 2), lr=0.1, seed=3)
    generate_pairs(tmp_path, model, x, labels, lora_a, opts)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == [f"shard-0000{k}.safetensors" for k in range(3)]
    assert [manifest["shards"][f"shard-0000{k}.safetensors"]["n"] for k in range(3)] == [8, 8, 4]
    pairs = load_pairs(tmp_path)
    assert pairs.n == 20 and torch.equal(pairs.index, torch.arange(20))
    assert set(pairs.batch_size.tolist()) <= {1, 2, 3} and set(pairs.steps.tolist()) == {1, 2}
    for i in range(20):
        b, t = int(pairs.batch_size[i]), int(pairs.steps[i])
        members = pairs.members[i, :b]
        assert (pairs.members[i, b:] == -1).all() and members.unique().numel() == b
        ref = lora_path_pairs(model, x[members], labels[members], lora_a, lr=0.1, steps=t, batch_size=b)
        for n in lora_a:
            torch.testing.assert_close(pairs.full[n][i], ref.full[n][0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(pairs.delta_w(n)[i], ref.delta_w[n][0], rtol=1e-5, atol=1e-8)
            if t == 1:  # the first step: Delta W = -lr s^2 G A^T A
                torch.testing.assert_close(pairs.delta_w(n)[i], -0.1 * pairs.full[n][i] @ lora_a[n].T @ lora_a[n],
                                           rtol=1e-4, atol=1e-8)
    one = load_pairs(tmp_path, layers=["fc2.weight"])
    assert list(one.full) == ["fc2.weight"] and one.full["fc2.weight"].shape == (20, 3, 8)


def test_a_killed_generation_resumes_to_the_same_tensors(tmp_path):
    model, x, labels, lora_a = _case()
    opts = PairOptions(n_pairs=24, shard_size=8, batch_sizes=(1, 2, 4), steps=(1, 2), seed=7)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    generate_pairs(whole, model, x, labels, lora_a, opts)
    generate_pairs(cut, model, x, labels, lora_a, opts)
    kept = {k: (cut / f"shard-0000{k}.safetensors").stat().st_mtime_ns for k in (0, 1)}
    third = cut / "shard-00002.safetensors"
    third.unlink()
    (cut / ".shard-00002.safetensors.abc123.tmp").write_bytes(b"half a shard")
    with pytest.raises(ValueError, match="shard-00002"):
        load_pairs(cut)
    generate_pairs(cut, model, x, labels, lora_a, opts)
    assert _files(cut) == _files(whole)
    assert {k: (cut / f"shard-0000{k}.safetensors").stat().st_mtime_ns for k in (0, 1)} == kept
    # a truncated shard (not matching its recorded sha256) is recomputed too
    (cut / "shard-00001.safetensors").write_bytes(b"\0" * 10)
    generate_pairs(cut, model, x, labels, lora_a, opts)
    assert _files(cut) == _files(whole)
    a, b = load_pairs(cut), load_pairs(whole)
    for n in lora_a:
        assert torch.equal(a.full[n], b.full[n]) and torch.equal(a.delta_b[n], b.delta_b[n])


def test_refusals(tmp_path):
    model, x, labels, lora_a = _case()
    opts = PairOptions(n_pairs=4, shard_size=2, batch_sizes=(1,), seed=0)
    generate_pairs(tmp_path, model, x, labels, lora_a, opts)
    with pytest.raises(ValueError, match="folder"):
        generate_pairs(tmp_path, model, x, labels, lora_a, PairOptions(n_pairs=4, shard_size=2, batch_sizes=(1,),
                                                                       seed=1))
    with pytest.raises(ValueError, match="batch_sizes"):
        generate_pairs(tmp_path / "b", model, x, labels, lora_a, PairOptions(batch_sizes=(13,)))
    with pytest.raises(ValueError, match="lora_a"):
        generate_pairs(tmp_path / "c", model, x, labels, {"fc1.weight": torch.zeros(2, 5)}, opts)
    with pytest.raises(ValueError, match="steps"):
        PairOptions(steps=(0,))
    with pytest.raises(ValueError, match="scaling"):
        PairOptions(scaling=0.0)
    with pytest.raises(ValueError, match="layers"):
        load_pairs(tmp_path, layers=["conv1.weight"])
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "none")
