"""Matrix-free spectra: Lanczos eigenvalues and singular values, Hutchinson traces, spectral entropy.

Used by the self-consuming diffusion chapter (04) to summarise the Jacobian of a denoiser, an operator
available only through Jacobian-vector and vector-Jacobian products. The symmetric Lanczos iteration
(with full reorthogonalisation against every earlier Lanczos vector, applied twice, so the basis stays
orthonormal to machine precision) builds a tridiagonal matrix whose extreme eigenvalues (Ritz values)
converge to those of the operator; it stops when the Ritz residuals ``beta_m |s_{m,i}|`` of the wanted
ones fall below ``tol`` times the largest Ritz value. Block Lanczos does the same with blocks of vectors,
so that a GPU applies the operator to many vectors in one vmapped call. Singular values are the square
roots of the eigenvalues of J^T J, run through the same iteration. The Hutchinson estimator
tr(A) ~ mean_i v_i^T A v_i uses Rademacher probes. This is written by hand because the operators live on
the GPU as torch functions; dense ``eigh`` / ``svd`` and ``scipy.sparse.linalg.eigsh`` are the references
in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from imprint.runtime.checks import require_choice, require_float, require_int

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LanczosResult:
    """Wanted eigenvalues (descending by the chosen order), their Ritz vectors and residual bounds."""

    eigenvalues: Float[Tensor, " k"]
    eigenvectors: Float[Tensor, "d k"]
    residuals: Float[Tensor, " k"]
    n_matvec: int
    converged: bool


def _order(values: Tensor, which: str) -> Tensor:
    key = values if which == "largest" else (-values if which == "smallest" else values.abs())
    return torch.argsort(key, descending=True)


def lanczos_eigsh(matvec: MatVec, dim: int, k: int, *, which: str = "largest",
                  max_iter: int | None = None, tol: float = 1e-8, check_every: int = 5, seed: int = 0,
                  dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                  start: Tensor | None = None) -> LanczosResult:
    """The ``k`` extreme eigenvalues of a symmetric operator ``v -> A v`` on R^dim.

    ``which``: ``largest`` (algebraic), ``smallest`` or ``magnitude``. ``max_iter`` (default
    ``min(dim, max(4 k + 40, 100))``) bounds the Krylov dimension; the result says whether every wanted
    residual met ``tol`` (relative to the largest Ritz value in magnitude). An invariant subspace found
    early is extended with a fresh random direction, so ``max_iter = dim`` recovers the whole spectrum.
    """
    dim = require_int("dim", dim, minimum=1)
    k = require_int("k", k, minimum=1, maximum=dim)
    require_choice("which", which, ["largest", "smallest", "magnitude"])
    require_float("tol", tol, minimum=0.0)
    check_every = require_int("check_every", check_every, minimum=1)
    max_iter = min(dim, max(4 * k + 40, 100)) if max_iter is None else require_int("max_iter", max_iter, minimum=k,
                                                                                   maximum=dim)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def fresh_direction() -> Tensor:
        return torch.randn(dim, generator=gen, dtype=dtype).to(device)

    basis = torch.zeros(max_iter, dim, dtype=dtype, device=device)
    alphas = torch.zeros(max_iter, dtype=dtype, device=device)
    betas = torch.zeros(max_iter, dtype=dtype, device=device)  # betas[j] couples q_j and q_{j+1}
    q = (start.to(device=device, dtype=dtype).reshape(dim) if start is not None else fresh_direction())
    q = q / q.norm()
    basis[0] = q
    n_matvec = 0
    result = None
    for j in range(max_iter):
        w = matvec(basis[j]).to(dtype).reshape(dim)
        n_matvec += 1
        alphas[j] = basis[j] @ w
        w = w - alphas[j] * basis[j] - (betas[j - 1] * basis[j - 1] if j > 0 else 0)
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = w.norm()
        last = j + 1 == max_iter
        if j + 1 >= k and (last or (j + 1) % check_every == 0 or beta <= 1e-12 * alphas[: j + 1].abs().max()):
            result = _ritz(alphas[: j + 1], betas[: j], basis[: j + 1], beta, k, which, n_matvec, tol)
            if result.converged:
                return result
        if last:
            break
        if beta <= 1e-12 * max(1.0, float(alphas[: j + 1].abs().max())):
            # invariant subspace: restart in the orthogonal complement, uncoupled (beta = 0)
            w = fresh_direction()
            for _ in range(2):
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            betas[j] = 0.0
            basis[j + 1] = w / w.norm()
        else:
            betas[j] = beta
            basis[j + 1] = w / beta
    assert result is not None
    return result


def _ritz(alphas: Tensor, betas: Tensor, basis: Tensor, beta_last: Tensor, k: int, which: str, n_matvec: int,
          tol: float) -> LanczosResult:
    m = alphas.numel()
    tri = torch.diag(alphas)
    if m > 1:
        tri = tri + torch.diag(betas, 1) + torch.diag(betas, -1)
    theta, s = torch.linalg.eigh(tri)
    order = _order(theta, which)[:k]
    theta, s = theta[order], s[:, order]
    residuals = (beta_last * s[-1].abs())
    scale = theta.abs().max().clamp_min(torch.finfo(theta.dtype).tiny)
    converged = bool((residuals <= tol * scale).all()) or m == basis.shape[1]
    return LanczosResult(theta, basis.T @ s, residuals, n_matvec, converged)


def block_lanczos_eigsh(matmat: Callable[[Tensor], Tensor], dim: int, k: int, *, block_size: int | None = None,
                        which: str = "largest", max_basis: int | None = None, tol: float = 1e-8, seed: int = 0,
                        check_every: int = 1, dtype: torch.dtype = torch.float64,
                        device: torch.device | str = "cpu") -> LanczosResult:
    """Block Lanczos: the ``k`` extreme eigenvalues of a symmetric operator applied to blocks of vectors.

    ``matmat`` maps rows ``[b, dim]`` to rows ``[b, dim]`` (A applied to each row). Each step applies the
    operator to ``block_size`` vectors at once (default ``k``), so the number of *sequential* operator
    calls is about the number of Lanczos vectors divided by the block size: what matters on a GPU, where
    a vmapped batch of products costs little more than one. The basis is kept orthonormal by full block
    reorthogonalisation (twice) and QR; ``T`` is block tridiagonal and the Ritz residual of a pair is
    ``||B_m s_m||`` with ``s_m`` the last block of its Ritz vector. ``max_basis`` (default
    ``min(dim, max(10 k, 6 block_size + 40, 100))``) bounds the basis size: a block basis needs more
    vectors than a single-vector one for the same accuracy. The Ritz pairs (an ``eigh`` of ``T``, whose cost
    grows as the cube of the basis size) are computed every ``check_every`` blocks and at the last one: with
    large blocks and a basis of a thousand vectors they can cost more than a block of products, and checking
    less often trades them for at most ``check_every - 1`` surplus blocks. ``n_matvec`` counts vectors.
    """
    dim = require_int("dim", dim, minimum=1)
    k = require_int("k", k, minimum=1, maximum=dim)
    require_choice("which", which, ["largest", "smallest", "magnitude"])
    require_float("tol", tol, minimum=0.0)
    b = k if block_size is None else require_int("block_size", block_size, minimum=1)
    check_every = require_int("check_every", check_every, minimum=1)
    b = min(b, dim)
    max_basis = (min(dim, max(10 * k, 6 * b + 40, 100)) if max_basis is None
                 else require_int("max_basis", max_basis, minimum=k, maximum=dim))
    max_basis = max(max_basis, min(dim, b))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def orthonormal_block(basis: Tensor, n: int) -> Tensor:
        """``n`` random columns orthonormal to ``basis`` (columns) and to each other."""
        w = torch.randn(dim, n, generator=gen, dtype=dtype).to(device)
        for _ in range(2):
            if basis.shape[1]:
                w = w - basis @ (basis.T @ w)
        q, _ = torch.linalg.qr(w)
        return q

    empty = torch.zeros(dim, 0, dtype=dtype, device=device)
    q = orthonormal_block(empty, b)
    blocks = [q]
    diag_blocks, off_blocks = [], []  # A_j (b_j x b_j) and B_j (b_{j+1} x b_j)
    prev_q, prev_b = None, None
    n_matvec, scale = 0, 1.0
    while True:
        basis = torch.cat(blocks, 1)
        w = matmat(q.T.contiguous()).to(dtype).T  # columns A q_i
        n_matvec += q.shape[1]
        a = q.T @ w
        a = (a + a.T) / 2
        w = w - q @ a
        if prev_q is not None:
            w = w - prev_q @ prev_b.T
        for _ in range(2):  # full reorthogonalisation
            w = w - basis @ (basis.T @ w)
        diag_blocks.append(a)
        size = basis.shape[1]
        room = min(b, max_basis - size)
        q_next, r = torch.linalg.qr(w)
        scale = max(scale, float(a.abs().max()))
        small = r.diagonal().abs() <= 1e-10 * scale
        if bool(small.any()) and room > 0:
            # (near) invariant subspace: replace the dependent directions by fresh orthogonal ones, uncoupled
            fresh = orthonormal_block(torch.cat([basis, q_next[:, ~small]], 1), int(small.sum()))
            q_next = q_next.clone()
            q_next[:, small] = fresh
            r = r.clone()
            r[small, :] = 0.0
        if room <= 0 or size >= dim or (size >= k and len(diag_blocks) % check_every == 0):
            result = _block_ritz(diag_blocks, off_blocks, r, basis, k, which, n_matvec, tol, done=size >= dim)
            if result.converged or room <= 0:
                return result
        q_next, r = q_next[:, :room], r[:room]
        off_blocks.append(r)
        prev_q, prev_b = q, r
        q = q_next
        blocks.append(q)


def _block_ritz(diag_blocks, off_blocks, r_last, basis, k, which, n_matvec, tol, done) -> LanczosResult:
    sizes = [d.shape[0] for d in diag_blocks]
    n = sum(sizes)
    t = torch.zeros(n, n, dtype=basis.dtype, device=basis.device)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    for j, d in enumerate(diag_blocks):
        t[offsets[j]:offsets[j + 1], offsets[j]:offsets[j + 1]] = d
    for j, bj in enumerate(off_blocks):  # bj couples block j (columns) to block j + 1 (rows)
        t[offsets[j + 1]:offsets[j + 2], offsets[j]:offsets[j + 1]] = bj
        t[offsets[j]:offsets[j + 1], offsets[j + 1]:offsets[j + 2]] = bj.T
    theta, s = torch.linalg.eigh(t)
    order = _order(theta, which)[:k]
    theta, s = theta[order], s[:, order]
    residuals = (r_last @ s[offsets[-2]:offsets[-1]]).norm(dim=0)
    scale = theta.abs().max().clamp_min(torch.finfo(theta.dtype).tiny)
    converged = bool((residuals <= tol * scale).all()) or done
    return LanczosResult(theta, basis @ s, residuals, n_matvec, converged)


def lanczos_svd(matvec: MatVec, rmatvec: MatVec, dim: int, k: int, **kwargs) -> LanczosResult:
    """The ``k`` largest singular values of J (``matvec``: J v, ``rmatvec``: J^T u; J square, dim x dim).

    Lanczos on J^T J; ``eigenvalues`` holds the singular values, ``eigenvectors`` the right singular vectors.
    """
    res = lanczos_eigsh(lambda v: rmatvec(matvec(v)), dim, k, which="largest", **kwargs)
    return LanczosResult(res.eigenvalues.clamp_min(0).sqrt(), res.eigenvectors, res.residuals, 2 * res.n_matvec,
                         res.converged)


@dataclass(frozen=True)
class TraceEstimate:
    estimate: float
    standard_error: float
    n_samples: int


def hutchinson_trace(matvec: MatVec | None, dim: int, n_samples: int, seed: int = 0, dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu", matmat: Callable[[Tensor], Tensor] | None = None
                     ) -> TraceEstimate:
    """tr(A) ~ (1/n) sum_i v_i^T A v_i with Rademacher v_i, and the standard error of that mean.

    ``matmat`` (rows in, rows out) evaluates all probes at once when given (then ``matvec`` may be None).
    """
    if matvec is None and matmat is None:
        raise ValueError("matvec and matmat are both None: expected at least one of them")
    dim = require_int("dim", dim, minimum=1)
    n_samples = require_int("n_samples", n_samples, minimum=2)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    probes = (torch.randint(0, 2, (n_samples, dim), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
    if matmat is not None:
        images = matmat(probes).to(dtype)
    else:
        images = torch.stack([matvec(v).to(dtype).reshape(dim) for v in probes])
    quad = (probes * images).sum(1)
    return TraceEstimate(float(quad.mean()), float(quad.std(unbiased=True) / math.sqrt(n_samples)), n_samples)


def symmetric_eigenvalues(matrix: Float[Tensor, "d d"]) -> Float[Tensor, " d"]:
    """Eigenvalues of (J + J^T) / 2, descending (float64)."""
    a = matrix.to(torch.float64)
    return torch.linalg.eigvalsh((a + a.T) / 2).flip(0)


def spectral_entropy(values: Float[Tensor, " n"]) -> float:
    """Shannon entropy (nats) of the spectrum normalised to a distribution, p_i = max(v_i, 0) / sum_j max(v_j, 0).

    exp(entropy) is the effective rank of Roy & Vetterli (2007): r for r equal positive values.
    """
    v = values.to(torch.float64).clamp_min(0)
    total = v.sum()
    if total <= 0:
        return 0.0
    p = v / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def participation_ratio(values: Float[Tensor, " n"]) -> float:
    """(sum v)^2 / sum v^2 of the non-negative part: another count of the directions that matter."""
    v = values.to(torch.float64).clamp_min(0)
    denom = v.square().sum()
    return float(v.sum().square() / denom) if denom > 0 else 0.0


def negative_mass(values: Float[Tensor, " n"]) -> float:
    """sum_i max(-v_i, 0) / sum_i |v_i|: the share of a spectrum's absolute mass on negative eigenvalues
    (0 for a positive semi-definite matrix, which the Jacobian of an exact MMSE denoiser is)."""
    v = values.to(torch.float64)
    total = v.abs().sum()
    return float((-v).clamp_min(0).sum() / total) if total > 0 else 0.0


def spectrum_statistics(jacobian: Float[Tensor, "d d"]) -> dict[str, float]:
    """Scalar summaries of a dense Jacobian J: of the eigenvalues of its symmetric part (top eigenvalue,
    trace = effective dimension, spectral entropy and effective rank, participation ratio, negative mass),
    its top singular value, and its relative asymmetry ||J - J^T||_F / ||J||_F.

    The trace is the one summary that does not depend on J being symmetric: tr J = tr (J + J^T) / 2 is the
    divergence of the denoiser, which for any weakly differentiable denoiser D of y = x + sigma z equals
    sum_i Cov(D_i(y), y_i) / sigma^2 (Stein's lemma): the degrees of freedom of Stein's unbiased risk
    estimate, the MMSE denoiser's effective dimension being the special case."""
    j = jacobian.to(torch.float64)
    eig = symmetric_eigenvalues(j)
    entropy = spectral_entropy(eig)
    return {
        "top_eigenvalue": float(eig[0]),
        "trace": float(eig.sum()),
        "spectral_entropy": entropy,
        "effective_rank": math.exp(entropy),
        "participation_ratio": participation_ratio(eig),
        "top_singular_value": float(torch.linalg.matrix_norm(j, ord=2)),
        "asymmetry": float(torch.linalg.matrix_norm(j - j.T) / torch.linalg.matrix_norm(j).clamp_min(1e-300)),
        "negative_mass": negative_mass(eig),
    }
