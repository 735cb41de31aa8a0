"""Lanczos eigenvalues and singular values against dense eigh/svd and scipy; Hutchinson; spectral entropy."""

import math

import numpy as np
import pytest
import torch

from imprint.spectral.eigensolvers import (block_lanczos_eigsh, hutchinson_trace, lanczos_eigsh, lanczos_svd,
                                           negative_mass,
                                           participation_ratio, spectral_entropy, spectrum_statistics,
                                           symmetric_eigenvalues)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def symmetric_with_spectrum(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_matches_dense_eigh_on_a_random_symmetric_matrix(which):
    g = torch.Generator().manual_seed(3)
    b = torch.randn(150, 150, generator=g, dtype=torch.float64)
    a = (b + b.T) / 2
    res = lanczos_eigsh(lambda v: a @ v, 150, 8, which=which, tol=1e-10, max_iter=150)
    evals = torch.linalg.eigvalsh(a)
    key = {"largest": -evals, "smallest": evals, "magnitude": -evals.abs()}[which]
    expected = evals[torch.argsort(key)][:8]
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-8, atol=1e-8)
    # Ritz vectors are eigenvectors
    resid = a @ res.eigenvectors - res.eigenvectors * res.eigenvalues
    assert resid.norm(dim=0).max() < 1e-6


def test_lanczos_converges_early_on_a_decaying_spectrum_and_agrees_with_scipy():
    from scipy.sparse.linalg import LinearOperator, eigsh

    spectrum = 1.0 / (1.0 + np.arange(400)) ** 1.5
    a = symmetric_with_spectrum(spectrum, seed=1)
    res = lanczos_eigsh(lambda v: a @ v, 400, 20, tol=1e-9)
    assert res.converged and res.n_matvec < 400
    torch.testing.assert_close(res.eigenvalues, torch.tensor(spectrum[:20]), rtol=1e-7, atol=1e-10)
    op = LinearOperator((400, 400), matvec=lambda v: (a @ torch.as_tensor(v).reshape(-1)).numpy(), dtype=np.float64)
    ref = np.sort(eigsh(op, k=20, which="LA", return_eigenvectors=False))[::-1]
    np.testing.assert_allclose(res.eigenvalues.numpy(), ref, rtol=1e-7)


def test_lanczos_restarts_after_an_invariant_subspace_and_recovers_the_full_spectrum():
    spectrum = [5.0, 4.0, 3.0, 2.0, 1.0] + [0.0] * 25
    a = symmetric_with_spectrum(spectrum, seed=2)
    res = lanczos_eigsh(lambda v: a @ v, 30, 8, max_iter=30, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.tensor(spectrum[:8], dtype=torch.float64), atol=1e-9, rtol=0)


def test_lanczos_svd_matches_dense_svd_on_a_nonsymmetric_matrix():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    s = torch.linspace(3.0, 0.01, 120, dtype=torch.float64) ** 2
    j = u @ torch.diag(s) @ v.T
    res = lanczos_svd(lambda x: j @ x, lambda y: j.T @ y, 120, 10, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.svdvals(j)[:10], rtol=1e-8, atol=1e-10)


def test_lanczos_on_the_symmetric_part_of_a_nonsymmetric_operator():
    g = torch.Generator().manual_seed(5)
    j = torch.randn(80, 80, generator=g, dtype=torch.float64)
    res = lanczos_eigsh(lambda v: 0.5 * (j @ v + j.T @ v), 80, 5, max_iter=80, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, symmetric_eigenvalues(j)[:5], rtol=1e-8, atol=1e-8)


def test_lanczos_accepts_float32_operators_and_bad_arguments_are_refused():
    a = symmetric_with_spectrum(np.linspace(1, 0, 50)).float()
    res = lanczos_eigsh(lambda v: a @ v.float(), 50, 3, tol=1e-5, max_iter=50)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([1.0, 49 / 49 - 1 / 49, 1 - 2 / 49],
                                                             dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="k=60"):
        lanczos_eigsh(lambda v: v, 50, 60)
    with pytest.raises(ValueError, match="which"):
        lanczos_eigsh(lambda v: v, 50, 2, which="top")


def test_hutchinson_is_unbiased_within_its_exact_standard_error():
    g = torch.Generator().manual_seed(6)
    b = torch.randn(60, 60, generator=g, dtype=torch.float64)
    a = b + torch.eye(60, dtype=torch.float64) * 3
    n = 400
    est = hutchinson_trace(lambda v: a @ v, 60, n, seed=1)
    sym = (a + a.T) / 2
    exact_var = 2 * (sym.square().sum() - sym.diagonal().square().sum())  # Var(v^T A v), Rademacher v
    assert abs(est.estimate - float(a.trace())) < 5 * math.sqrt(float(exact_var) / n)
    assert est.standard_error == pytest.approx(math.sqrt(float(exact_var) / n), rel=0.25)
    batched = hutchinson_trace(None, 60, n, seed=1, matmat=lambda vs: vs @ a.T)
    assert batched.estimate == pytest.approx(est.estimate, rel=1e-12)
    diag = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    assert hutchinson_trace(lambda v: diag @ v, 10, 3).estimate == pytest.approx(55.0)  # exact for diagonal A


def test_spectral_entropy_effective_rank_and_participation_ratio():
    assert spectral_entropy(torch.ones(7)) == pytest.approx(math.log(7))
    assert spectral_entropy(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(0.0)
    assert spectral_entropy(torch.tensor([1.0, 1.0, -5.0])) == pytest.approx(math.log(2))
    p = np.array([3.0, 1.0]) / 4
    assert spectral_entropy(torch.tensor([3.0, 1.0])) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert participation_ratio(torch.ones(5)) == pytest.approx(5.0)
    assert participation_ratio(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_spectrum_statistics_of_a_known_jacobian():
    j = torch.diag(torch.tensor([0.9, 0.5, 0.1, 0.0], dtype=torch.float64))
    j[0, 1] = 0.2
    stats = spectrum_statistics(j)
    sym_eigs = torch.linalg.eigvalsh((j + j.T) / 2)
    assert stats["top_eigenvalue"] == pytest.approx(float(sym_eigs.max()))
    assert stats["trace"] == pytest.approx(1.5)
    assert stats["top_singular_value"] == pytest.approx(float(torch.linalg.svdvals(j)[0]))
    assert stats["asymmetry"] == pytest.approx(float(torch.linalg.norm(j - j.T) / torch.linalg.norm(j)))
    assert stats["effective_rank"] == pytest.approx(math.exp(stats["spectral_entropy"]))
    assert stats["negative_mass"] == pytest.approx(0.0, abs=1e-12)  # 0.9, 0.5, 0.1 and 0 with a small coupling


def test_negative_mass_and_the_trace_of_an_asymmetric_jacobian_against_numpy():
    rng = np.random.default_rng(3)
    j = rng.standard_normal((12, 12))
    stats = spectrum_statistics(torch.tensor(j))
    eig = np.linalg.eigvalsh((j + j.T) / 2)
    assert stats["negative_mass"] == pytest.approx(-eig[eig < 0].sum() / np.abs(eig).sum(), rel=1e-12)
    # the trace ignores the antisymmetric part: it is the divergence of the map, sum_i dD_i / dy_i
    assert stats["trace"] == pytest.approx(np.trace(j), rel=1e-12, abs=1e-12)
    assert negative_mass(torch.zeros(3)) == 0.0
    assert negative_mass(torch.tensor([1.0, -3.0])) == pytest.approx(0.75)


@pytest.mark.parametrize("block_size,which", [(1, "largest"), (4, "largest"), (8, "magnitude"), (5, "smallest")])
def test_block_lanczos_matches_dense_eigh(block_size, which):
    g = torch.Generator().manual_seed(7)
    b = torch.randn(120, 120, generator=g, dtype=torch.float64)
    a = (b + b.T) / 2
    res = block_lanczos_eigsh(lambda rows: rows @ a, 120, 8, block_size=block_size, which=which, tol=1e-10,
                              max_basis=120)
    evals = torch.linalg.eigvalsh(a)
    key = {"largest": -evals, "smallest": evals, "magnitude": -evals.abs()}[which]
    torch.testing.assert_close(res.eigenvalues, evals[torch.argsort(key)][:8], rtol=1e-8, atol=1e-8)
    resid = a @ res.eigenvectors - res.eigenvectors * res.eigenvalues
    assert resid.norm(dim=0).max() < 1e-6


def test_block_lanczos_on_a_decaying_spectrum_and_after_an_invariant_subspace():
    spectrum = 1.0 / (1.0 + np.arange(300)) ** 2
    a = symmetric_with_spectrum(spectrum, seed=8)
    res = block_lanczos_eigsh(lambda rows: rows @ a, 300, 10, block_size=5, tol=1e-9)
    assert res.converged and res.n_matvec < 300
    torch.testing.assert_close(res.eigenvalues, torch.tensor(spectrum[:10]), rtol=1e-7, atol=1e-11)
    low_rank = symmetric_with_spectrum([5.0, 4.0, 3.0, 2.0, 1.0] + [0.0] * 25, seed=9)
    res = block_lanczos_eigsh(lambda rows: rows @ low_rank, 30, 8, block_size=3, max_basis=30, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4, 3, 2, 1, 0, 0, 0], dtype=torch.float64),
                               atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        block_lanczos_eigsh(lambda rows: rows, 10, 2, block_size=0)


def clustered_spectrum(d):
    """A tight cluster of 30 eigenvalues at the top (spacings 1e-3, one pair 1e-6 apart), then a decay."""
    top = 1.0 - 1e-3 * np.arange(30)
    top[5] = top[4] - 1e-6
    return np.concatenate([top, 0.9 / (1.0 + np.arange(d - 30)) ** 0.5])


def assert_tolerance_honoured(a, res, tol):
    """Converged: every wanted Ritz pair has a true residual within tol * |largest Ritz value|; otherwise
    at least one residual bound exceeds it."""
    scale = float(res.eigenvalues.abs().max())
    true = (a @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
    torch.testing.assert_close(true, res.residuals, rtol=1e-3, atol=1e-12)
    if res.converged:
        assert float(true.max()) <= tol * scale * 1.001 + 1e-13
    else:
        assert float(res.residuals.max()) > tol * scale


@pytest.mark.parametrize("block_size,check_every", [(32, 1), (32, 3), (48, 2)])
def test_large_blocks_with_sparse_ritz_checks_on_a_clustered_spectrum(block_size, check_every):
    d, k, tol = 400, 20, 1e-6
    spectrum = clustered_spectrum(d)
    a = symmetric_with_spectrum(spectrum, seed=11)
    res = block_lanczos_eigsh(lambda rows: rows @ a, d, k, block_size=block_size, max_basis=d, tol=tol,
                              check_every=check_every)
    assert res.converged
    assert_tolerance_honoured(a, res, tol)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(a).flip(0)[:k], rtol=1e-9, atol=1e-11)
    every = block_lanczos_eigsh(lambda rows: rows @ a, d, k, block_size=block_size, max_basis=d, tol=tol)
    # checking every few blocks costs at most check_every - 1 surplus blocks
    assert every.n_matvec <= res.n_matvec <= every.n_matvec + (check_every - 1) * block_size


@pytest.mark.parametrize("max_basis", [64, 96, 160])
def test_block_lanczos_flags_unconverged_results_on_a_clustered_spectrum(max_basis):
    d, k, tol = 400, 20, 1e-8
    a = symmetric_with_spectrum(clustered_spectrum(d), seed=12)
    res = block_lanczos_eigsh(lambda rows: rows @ a, d, k, block_size=32, max_basis=max_basis, tol=tol,
                              check_every=2)
    assert res.n_matvec <= max_basis
    assert_tolerance_honoured(a, res, tol)
    if max_basis == 64:
        assert not res.converged


def test_block_lanczos_on_repeated_eigenvalues_and_a_float32_operator():
    d, k = 300, 12
    spectrum = np.concatenate([[2.0] * 4, [1.5] * 3, 1.0 / (1.0 + np.arange(d - 7))])
    a = symmetric_with_spectrum(spectrum, seed=13)
    res = block_lanczos_eigsh(lambda rows: rows @ a, d, k, block_size=16, max_basis=d, tol=1e-9, check_every=2)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor(np.sort(spectrum)[::-1][:k].copy()), rtol=1e-9,
                               atol=1e-10)
    assert_tolerance_honoured(a, res, 1e-9)
    a32 = a.float()
    res32 = block_lanczos_eigsh(lambda rows: rows.float() @ a32, d, k, block_size=16, max_basis=d, tol=1e-5,
                                check_every=2)
    assert res32.eigenvalues.dtype == torch.float64
    torch.testing.assert_close(res32.eigenvalues, res.eigenvalues, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="check_every"):
        block_lanczos_eigsh(lambda rows: rows, 10, 2, check_every=0)
