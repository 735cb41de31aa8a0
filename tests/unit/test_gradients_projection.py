"""Random projections: blocked generation against the dense matrix, TRAK's BasicProjector formula, the
factored (Kronecker) projection against the materialised gradient, and the JL behaviour of cosines."""

import math

import pytest
import torch

from imprint.gradients.projection import (BlockedProjector, FactoredProjector, derive_seed, factor_dims,
                                          random_tile)


def trak_basic_projection(grads, proj_dim, seed, kind, block_size):
    """TRAK's BasicProjector (model_id 0), written from its definition: column block i of width b is drawn
    on a CPU generator seeded with seed + 1000 i as a (grad_dim, b) float32 tensor, Bernoulli(1/2) mapped
    to +-1 (rademacher) or N(0, 1) (normal); the sketch's columns [i b, (i+1) b) are grads @ block."""
    block_size = min(proj_dim, block_size)
    sketch = torch.zeros(grads.shape[0], proj_dim)
    for i in range(math.ceil(proj_dim / block_size)):
        gen = torch.Generator().manual_seed(seed + 1000 * i)
        block = torch.empty(grads.shape[1], block_size)
        if kind == "rademacher":
            block.bernoulli_(p=0.5, generator=gen)
            block *= 2.0
            block -= 1.0
        else:
            block.normal_(generator=gen)
        lo, hi = i * block_size, min((i + 1) * block_size, proj_dim)
        sketch[:, lo:hi] = grads @ block[:, : hi - lo]
    return sketch


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blocked_projection_equals_dense_matrix(kind):
    torch.manual_seed(0)
    x = torch.randn(5, 1000, dtype=torch.float64)
    proj = BlockedProjector(dim=1000, proj_dim=70, seed=3, kind=kind, row_block=300, col_block=32)
    assert proj.n_row_tiles == 4 and proj.n_col_tiles == 3  # partial tiles on both axes
    dense = proj.matrix(dtype=torch.float64)
    assert dense.shape == (1000, 70)
    torch.testing.assert_close(proj.project(x), x @ dense, rtol=1e-12, atol=1e-12)
    if kind == "rademacher":
        assert set((dense * math.sqrt(70)).unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blocked_projection_matches_trak_basic_projector(kind):
    torch.manual_seed(1)
    grads = torch.randn(4, 513)
    ours = BlockedProjector(dim=513, proj_dim=450, seed=17, kind=kind, row_block=10_000, col_block=200)
    reference = trak_basic_projection(grads, 450, 17, "rademacher" if kind == "rademacher" else "normal", 200)
    torch.testing.assert_close(ours.project(grads) * math.sqrt(450), reference, rtol=1e-5, atol=1e-4)


def test_projection_is_the_same_across_runs_and_partitions():
    torch.manual_seed(2)
    x = torch.randn(9, 777)
    a = BlockedProjector(777, 40, seed=5, row_block=100, col_block=16)
    b = BlockedProjector(777, 40, seed=5, row_block=100, col_block=16)
    whole = a.project(x)
    parts = torch.cat([b.project(x[:4]), b.project(x[4:])])
    assert torch.equal(whole, parts)
    other_seed = BlockedProjector(777, 40, seed=6, row_block=100, col_block=16).project(x)
    assert not torch.allclose(whole, other_seed)


def test_tiles_have_distinct_seeds():
    proj = BlockedProjector(dim=10_000, proj_dim=4000, seed=0, row_block=10, col_block=4)
    seeds = {proj.tile_seed(r, c) for r in range(proj.n_row_tiles) for c in range(proj.n_col_tiles)}
    assert len(seeds) == proj.n_row_tiles * proj.n_col_tiles


def test_random_tile_statistics():
    rad = random_tile(0, 400, 500, "rademacher")
    gau = random_tile(0, 400, 500, "gaussian")
    assert abs(rad.mean().item()) < 0.01 and rad.abs().eq(1).all()
    assert abs(gau.mean().item()) < 0.01 and abs(gau.var().item() - 1) < 0.02


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_cosines_track_exact_cosines_better_with_dimension(kind):
    torch.manual_seed(3)
    d, n = 4096, 24
    base = torch.randn(n, d, dtype=torch.float64)
    x = base + 0.8 * torch.randn(n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64) / d ** 0.5
    exact = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    errors = []
    for k in (16, 128, 1024):
        p = BlockedProjector(d, k, seed=11, kind=kind, col_block=256).project(x)
        approx = torch.nn.functional.normalize(p, dim=1) @ torch.nn.functional.normalize(p, dim=1).T
        errors.append((approx - exact).abs().mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2.0 / math.sqrt(1024)  # JL: error of order 1/sqrt(k)


def test_projected_dot_products_are_unbiased():
    torch.manual_seed(4)
    x, y = torch.randn(2, 300, dtype=torch.float64)
    estimates = [(BlockedProjector(300, 64, seed=s).project(x[None]) @ BlockedProjector(300, 64, seed=s)
                  .project(y[None]).T).item() for s in range(200)]
    mean = sum(estimates) / len(estimates)
    spread = torch.tensor(estimates).std().item() / math.sqrt(len(estimates))
    assert abs(mean - float(x @ y)) < 4 * spread


def test_factor_dims():
    assert factor_dims(64) == (8, 8)
    assert factor_dims(128) == (16, 8)
    assert factor_dims(7) == (7, 1)
    for k in range(1, 200):
        k_out, k_in = factor_dims(k)
        assert k_out * k_in == k and k_out >= k_in


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_factored_projection_equals_kronecker_projection_of_materialised_gradient(kind):
    torch.manual_seed(5)
    b, t, out, inp = 3, 7, 12, 10
    a = torch.randn(b, t, inp, dtype=torch.float64)
    g = torch.randn(b, t, out, dtype=torch.float64)
    grads = torch.einsum("bto,bti->boi", g, a)
    proj = FactoredProjector(out, inp, 24, seed=9, kind=kind)
    assert (proj.k_out, proj.k_in) == (6, 4)
    kron = torch.kron(proj.p_out.double(), proj.p_in.double())
    reference = grads.reshape(b, -1) @ kron.T
    torch.testing.assert_close(proj.project_factors(a, g), reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(proj.project_gradient(grads), reference, rtol=1e-10, atol=1e-10)


def test_factored_projection_of_an_embedding_table():
    torch.manual_seed(6)
    b, t, vocab, hidden = 2, 9, 20, 6
    ids = torch.randint(0, vocab, (b, t))
    g = torch.randn(b, t, hidden, dtype=torch.float64)
    table_grad = torch.zeros(b, vocab, hidden, dtype=torch.float64)
    for i in range(b):
        for s in range(t):
            table_grad[i, ids[i, s]] += g[i, s]
    proj = FactoredProjector(vocab, hidden, 16, seed=1)
    torch.testing.assert_close(proj.project_embedding(ids, g), proj.project_gradient(table_grad))


def test_factored_projection_preserves_inner_products_on_average():
    torch.manual_seed(7)
    ga, gb = torch.randn(2, 1, 30, 40, dtype=torch.float64)
    exact = float((ga * gb).sum())
    estimates = []
    for s in range(300):
        proj = FactoredProjector(30, 40, 16, seed=s)
        estimates.append(float(proj.project_gradient(ga) @ proj.project_gradient(gb).T))
    mean = sum(estimates) / len(estimates)
    spread = torch.tensor(estimates).std().item() / math.sqrt(len(estimates))
    assert abs(mean - exact) < 4 * spread


def test_derive_seed_is_stable_and_label_dependent():
    assert derive_seed(0, "layer", 64) == derive_seed(0, "layer", 64)
    assert derive_seed(0, "layer", 64) != derive_seed(0, "layer", 32)
    assert derive_seed(0, "layer", 64) != derive_seed(1, "layer", 64)
    assert 0 <= derive_seed(123, "x") < 2**62


@pytest.mark.parametrize("bad", [0, -4, True])
def test_projection_dimension_must_be_positive(bad):
    with pytest.raises(ValueError, match="proj_dim"):
        BlockedProjector(dim=10, proj_dim=bad, seed=0)
    with pytest.raises(ValueError, match="proj_dim"):
        FactoredProjector(4, 4, bad, seed=0)


def test_projector_rejects_wrong_width_and_kind():
    with pytest.raises(ValueError, match="expected \\(n, 10\\)"):
        BlockedProjector(dim=10, proj_dim=4, seed=0).project(torch.zeros(2, 11))
    with pytest.raises((ValueError, TypeError), match="kind"):  # a TypeError where beartype checks Literal
        BlockedProjector(dim=10, proj_dim=4, seed=0, kind="sparse")
