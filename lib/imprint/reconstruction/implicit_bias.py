"""How close are trained weights to a KKT point of the max-margin problem? (chapter 00)

For a network Phi(theta; x) homogeneous in theta, gradient descent on the logistic loss converges in
direction to a KKT point of  min ||theta||^2 / 2  s.t.  y_i Phi(theta; x_i) >= 1  (Lyu & Li 2019), whose
stationarity condition reads  theta = sum_i lam_i y_i grad_theta Phi(theta; x_i)  with lam >= 0 and
lam_i = 0 off the margin. Given the training set, the best multipliers are a non-negative least-squares
problem; its residual relative to ||theta|| measures how far training is from that point.

The Jacobian J (n x P) is formed with torch.func (vmap of grad); the NNLS problem is solved in its
n x n Gram form, which is exact: ||theta - A lam||^2 = lam^T G lam - 2 b^T lam + ||theta||^2 with
A = J^T diag(y), G = A^T A and b = A^T theta.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def output_jacobian(model: nn.Module, x: Float[Tensor, "n d"], chunk_size: int | None = 64,
                    dtype: torch.dtype = torch.float64) -> Float[Tensor, "n p"]:
    """Rows grad_theta Phi(theta; x_i) for a scalar-output model, parameters flattened in order."""
    params = {k: v.detach().to(dtype) for k, v in model.named_parameters()}

    def phi(p, xi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        if out.numel() != 1:
            raise ValueError(f"model output has {out.numel()} entries per example: expected a scalar output")
        return out.reshape(())

    grads = vmap(grad(phi), in_dims=(None, 0), chunk_size=chunk_size)(params, x.to(dtype))
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


def flat_params(model: nn.Module, dtype: torch.dtype = torch.float64) -> Float[Tensor, " p"]:
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in model.parameters()])


def nnls_gram(gram: Float[Tensor, "n n"], rhs: Float[Tensor, " n"], rel_eig_tol: float = 1e-12,
              rel_ridge: float = 1e-12) -> np.ndarray:
    """argmin_{lam >= 0} lam^T G lam - 2 rhs^T lam, via scipy's NNLS on a square root of G.

    When G is singular the minimisers form a set (any null vector of G can be added); a ridge of
    ``rel_ridge * max eigenvalue`` picks the smallest one, so the multipliers stay bounded.
    """
    evals, evecs = np.linalg.eigh(gram.double().cpu().numpy())
    top = max(float(evals.max()), 0.0)
    keep = evals > rel_eig_tol * top
    if not keep.any():
        return np.zeros(gram.shape[0])
    root = np.sqrt(evals[keep])
    a = root[:, None] * evecs[:, keep].T  # G = a^T a on the kept subspace
    c = (evecs[:, keep].T @ rhs.double().cpu().numpy()) / root
    n = gram.shape[0]
    a = np.vstack([a, np.sqrt(rel_ridge * top) * np.eye(n)])
    c = np.concatenate([c, np.zeros(n)])
    lam, _ = scipy.optimize.nnls(a, c, maxiter=50 * n)
    return lam


@dataclass(frozen=True)
class KKTFit:
    """NNLS multipliers and the stationarity residual ||theta - sum_i lam_i y_i grad Phi(x_i)|| / ||theta||."""

    lam: np.ndarray
    rel_residual: float
    margins: np.ndarray  # y_i Phi(theta; x_i)
    layer_residuals: dict[str, float]  # the same residual restricted to each parameter tensor

    @property
    def support(self) -> np.ndarray:
        """Indices with lam_i > 0 (relative to the largest multiplier), the support vectors."""
        return np.flatnonzero(self.lam > 1e-6 * max(self.lam.max(), 1e-300))


def save_fit(path, fit: KKTFit) -> None:
    """Store a fit (safetensors + JSON metadata), so that a resumed notebook need not refit."""
    from imprint.runtime.io import atomic_save_tensors

    atomic_save_tensors(path, {"lam": torch.as_tensor(fit.lam), "margins": torch.as_tensor(fit.margins)},
                        {"rel_residual": fit.rel_residual, "layer_residuals": fit.layer_residuals})


def load_fit(path) -> KKTFit:
    from imprint.runtime.io import load_tensor_metadata, load_tensors

    tensors, meta = load_tensors(path), load_tensor_metadata(path)
    return KKTFit(tensors["lam"].numpy(), float(meta["rel_residual"]), tensors["margins"].numpy(),
                  dict(meta["layer_residuals"]))


def fit_kkt_multipliers(jac: Float[Tensor, "n p"], theta: Float[Tensor, " p"],
                        y: Float[Tensor, " n"]) -> tuple[np.ndarray, Float[Tensor, " p"]]:
    """Best lam >= 0 for theta ~ J^T (y * lam), and the residual vector theta - J^T (y * lam)."""
    a_t = jac.double() * y.double().to(jac.device)[:, None]  # rows y_i grad Phi(x_i)
    theta = theta.double().to(jac.device)
    lam = nnls_gram(a_t @ a_t.T, a_t @ theta)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=jac.device)
    return lam, theta - a_t.T @ lam_t


def kkt_fit(model: nn.Module, x: Float[Tensor, "n d"], y: Float[Tensor, " n"], chunk_size: int | None = 64) -> KKTFit:
    """Multipliers, residual and margins of a scalar-output model on its training set (float64)."""
    jac = output_jacobian(model, x, chunk_size=chunk_size)
    theta = flat_params(model).to(jac.device)
    lam, residual = fit_kkt_multipliers(jac, theta, y)
    names = [name for name, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    layers = {name: float(r.norm() / t.norm()) for name, r, t in
              zip(names, residual.split(sizes), theta.split(sizes))}
    with torch.no_grad():
        model64 = {k: v.detach().double() for k, v in model.named_parameters()}
        out = functional_call(model, model64, (x.double(),)).reshape(-1)
    return KKTFit(lam, float(residual.norm() / theta.norm()), (y.double().to(out.device) * out).cpu().numpy(),
                  layers)
