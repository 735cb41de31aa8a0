"""Closed-form lifts from a LoRA update to a full-weight gradient, for the gradient bridge (chapter 06).

A linear layer fine-tuned as ``W = W0 + s B A`` (``A`` is ``[r, in]``, ``B`` is ``[out, r]``, ``s`` peft's
scaling) from the standard start ``B = 0`` changes only ``B`` in its first SGD step:
``grad_B L = s G A^T`` with ``G = grad_W L``, so ``Delta B = -eta s G A^T`` and the effective weight moves by

    Delta W = s Delta B A = -eta s^2 G A^T A,

a rank-r projection of ``G`` onto ``A``'s row space. :func:`min_norm_lift` inverts it with the
pseudo-inverse, ``G_hat = -Delta W (A^T A)^+ / (eta s^2)``: the least-norm solution of
``G_hat A^T A = -Delta W / (eta s^2)``, which is ``G`` itself when ``G``'s rows lie in ``A``'s row space.
:func:`fit_ridge_lift` fits the linear (ridge / Wiener) decoder from flattened low-rank features (``Delta B``
or ``A x``) to flattened full gradients on proxy pairs, in closed form; :func:`decoded_cosine` scores a
decoded gradient against the true one, layer by layer. Any learned decoder must beat these baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from imprint.runtime.checks import require_choice, require_float, require_positive

LIFT_METHODS = ("pinv", "svd")  # the pseudo-inverse of the Gram matrix, or the SVD of A


def _check_factor(delta_w: Tensor, lora_a: Tensor) -> None:
    if lora_a.ndim != 2 or lora_a.shape[0] < 1:
        raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}: expected [r, in] with rank r >= 1")
    if delta_w.ndim < 2 or delta_w.shape[-1] != lora_a.shape[1]:
        raise ValueError(f"delta_w has shape {tuple(delta_w.shape)}: expected [..., out, {lora_a.shape[1]}] "
                         f"(the input width of lora_a {tuple(lora_a.shape)})")


def gram_pinv(lora_a: Float[Tensor, "r d_in"], method: str = "svd", rtol: float | None = None
              ) -> Float[Tensor, "d_in d_in"]:
    """``(A^T A)^+``, either from ``torch.linalg.pinv`` of the Gram matrix (``"pinv"``) or from the thin SVD
    ``A = U S V^T`` as ``V S^-2 V^T`` (``"svd"``, better conditioned: it never squares ``A``). Singular values
    of ``A`` below ``rtol * max`` (default: ``max(r, in)`` times the dtype's epsilon) count as zero."""
    require_choice("method", method, LIFT_METHODS)
    if lora_a.ndim != 2 or lora_a.shape[0] < 1:
        raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}: expected [r, in] with rank r >= 1")
    eps = torch.finfo(lora_a.dtype).eps * max(lora_a.shape)
    rtol = eps if rtol is None else require_float("rtol", rtol, minimum=0.0)
    if method == "pinv":
        # the Gram matrix squares the singular values, so its tolerance squares too
        return torch.linalg.pinv(lora_a.T @ lora_a, rtol=max(rtol ** 2, eps), hermitian=True)
    _, s, vh = torch.linalg.svd(lora_a, full_matrices=False)
    keep = s > rtol * s.max()
    v = vh[keep].T
    return (v / s[keep] ** 2) @ v.T


def min_norm_lift(delta_w: Float[Tensor, "*batch out d_in"], lora_a: Float[Tensor, "r d_a"], lr: float,
                  scaling: float = 1.0, method: str = "svd", rtol: float | None = None
                  ) -> Float[Tensor, "*batch out d_in"]:
    """The minimum-norm full gradient behind one SGD step of a LoRA layer from ``B = 0``:
    ``G_hat = -Delta W (A^T A)^+ / (lr * scaling^2)``.

    ``delta_w`` is the change of the effective weight (its input width ``d_in`` that of ``lora_a``, checked
    with a sentence rather than by the annotation), ``scaling * Delta B @ A`` (a leading batch of updates
    shares ``lora_a``); ``lr`` the step size. Exact when the true gradient's rows lie in ``A``'s row space;
    otherwise its projection onto that space, the least-norm solution of the linear system.
    """
    _check_factor(delta_w, lora_a)
    lr = require_positive("lr", lr)
    scaling = require_float("scaling", scaling)
    if scaling == 0.0:
        raise ValueError("scaling=0.0: expected a nonzero LoRA scaling (the update would not depend on G)")
    return -(delta_w @ gram_pinv(lora_a, method, rtol)) / (lr * scaling ** 2)


@dataclass(frozen=True)
class RidgeLift:
    """A linear decoder ``g = features @ weight`` from flattened low-rank features to flattened full
    gradients, without intercept; ``alpha`` is the ridge penalty it was fitted with."""

    weight: Tensor  # [n_features, n_targets]
    alpha: float

    def __call__(self, features: Float[Tensor, "*batch n_features"]) -> Float[Tensor, "*batch n_targets"]:
        if features.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"features has shape {tuple(features.shape)}: expected [..., {self.weight.shape[0]}] "
                             "(the width the decoder was fitted on)")
        return features.to(self.weight.dtype) @ self.weight


def fit_ridge_lift(features: Float[Tensor, "n n_features"], targets: Float[Tensor, "n_t n_targets"], alpha: float
                   ) -> RidgeLift:
    """The ridge (Wiener) decoder fitted on ``n`` proxy pairs, in closed form:
    ``argmin_W ||features W - targets||^2 + alpha ||W||^2``, scikit-learn's ``Ridge(alpha,
    fit_intercept=False)``. Solved in the primal, ``(X^T X + alpha I)^-1 X^T Y``, when there are at least
    as many pairs as features, else in the dual, ``X^T (X X^T + alpha I)^-1 Y`` (the same solution, the
    smaller system). Features are e.g. the flattened ``Delta B`` (``out * r`` numbers) of a layer and
    targets its flattened gradient (``out * in``).
    """
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features has shape {tuple(features.shape)}: expected [n, n_features] with n >= 1 "
                         "and rank n_features >= 1")
    if targets.ndim != 2 or targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}: expected [{features.shape[0]}, n_targets] "
                         "(one row per row of features)")
    alpha = require_positive("alpha", alpha)
    x, y = features, targets.to(features.dtype)
    n, p = x.shape
    if n >= p:
        gram = x.T @ x + alpha * torch.eye(p, dtype=x.dtype, device=x.device)
        weight = torch.linalg.solve(gram, x.T @ y)
    else:
        gram = x @ x.T + alpha * torch.eye(n, dtype=x.dtype, device=x.device)
        weight = x.T @ torch.linalg.solve(gram, y)
    return RidgeLift(weight, alpha)


def _cosine(a: Tensor, b: Tensor, name: str, eps: float) -> Tensor:
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"g_hat[{name!r}] has shape {tuple(a.shape)} and g[{name!r}] {tuple(b.shape)}: expected "
                         "the same shape [..., out, in]")
    a, b = a.flatten(-2), b.flatten(-2).to(a.dtype)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


def decoded_cosine(g_hat: Mapping[str, Tensor] | Tensor, g: Mapping[str, Tensor] | Tensor, eps: float = 1e-12
                   ) -> dict[str, Tensor] | Tensor:
    """Cosine between decoded and true gradients of each layer, over its last two axes ``[out, in]``
    (leading axes, a batch of pairs, are kept). Mappings from layer name to gradient give a mapping of
    cosines; two tensors give one. A zero gradient has cosine 0 with anything."""
    if isinstance(g_hat, Tensor) and isinstance(g, Tensor):
        return _cosine(g_hat, g, "", eps)
    if isinstance(g_hat, Tensor) or isinstance(g, Tensor):
        raise ValueError("g_hat and g: expected two tensors or two mappings from layer name to tensor")
    if set(g_hat) != set(g):
        raise ValueError(f"g_hat has layers {sorted(g_hat)} and g {sorted(g)}: expected the same layer names")
    return {name: _cosine(g_hat[name], g[name], name, eps) for name in g}
