"""Per-example full gradients and one-step LoRA-update pairs of a small model, the proxy pairs of the
gradient bridge (chapter 06).

For a classifier with mean cross-entropy loss and chosen weight matrices ``W`` (``[out, in]``), each
example (or each consecutive batch of ``batch_size`` examples) gives the full gradient ``G = grad_W L`` at
the pretrained weights and, for LoRA factors ``A`` (``[r, in]``) with ``B = 0``, the one SGD step of a
LoRA fine-tuning ``W = W0 + s B A`` taken on it: ``Delta B = -lr grad_B L`` (``A`` does not move, its
gradient ``s B^T G`` vanishes at ``B = 0``) and the change of the effective weight
``Delta W = s Delta B A = -lr s^2 G A^T A``. ``Delta B`` is differentiated through the adapted weight
itself, not formed from ``G``, so the identity above is something the tests check. Everything is
``torch.func``: ``vmap`` over examples of ``grad`` of a ``functional_call``, the model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from imprint.runtime.checks import require_float, require_int, require_positive


def _batches(x: Tensor, labels: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """``x`` and ``labels`` as ``[n_batches, batch_size, ...]``, consecutive examples together."""
    n = x.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels has shape {tuple(labels.shape)}: expected ({n},), one per example of x")
    batch_size = require_int("batch_size", batch_size, minimum=1)
    if batch_size > n or n % batch_size:
        raise ValueError(f"batch_size={batch_size}: expected a divisor of the number of examples ({n})")
    return x.reshape(n // batch_size, batch_size, *x.shape[1:]), labels.reshape(n // batch_size, batch_size)


def _weights(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    missing = [n for n in names if n not in params]
    if missing or not names:
        raise ValueError(f"names={list(names)}: expected a non-empty list of parameters of the model "
                         f"({list(params)})")
    return params


def per_example_full_gradients(model: nn.Module, x: Float[Tensor, "n *features"], labels: Int[Tensor, " n"],
                               names: Sequence[str] | None = None, batch_size: int = 1
                               ) -> dict[str, Float[Tensor, "n_batches ..."]]:
    """``grad_p L`` of the mean cross-entropy of each consecutive batch of ``batch_size`` examples (one per
    example by default), for the parameters ``names`` (default: all), each with a leading batch axis."""
    names = [n for n, _ in model.named_parameters()] if names is None else list(names)
    params = _weights(model, names)
    xb, yb = _batches(x, labels, batch_size)
    chosen = {n: params[n] for n in names}

    def loss(p: dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, {**params, **p}, (xs,)), ys)

    return vmap(grad(loss), in_dims=(None, 0, 0))(chosen, xb, yb)


@dataclass(frozen=True)
class LoRAStepPairs:
    """Per batch and adapted weight: the full gradient at the base, and the first LoRA step from ``B = 0``."""

    full: dict[str, Tensor]      # G, [n_batches, out, in]
    delta_b: dict[str, Tensor]   # -lr grad_B L, [n_batches, out, r]
    delta_w: dict[str, Tensor]   # scaling * delta_b @ A, [n_batches, out, in]
    lora_a: dict[str, Tensor]    # A, [r, in]
    lr: float
    scaling: float


def check_lora_factors(params: Mapping[str, Tensor], lora_a: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each ``lora_a[name]`` as an ``[r, in]`` factor of the weight matrix ``params[name]``, detached, on its
    device and in its dtype; anything else is refused by name."""
    factors = {}
    for name, a in lora_a.items():
        w = params[name]
        if w.ndim != 2:
            raise ValueError(f"lora_a[{name!r}]: the parameter {name!r} has shape {tuple(w.shape)}, expected a "
                             "weight matrix [out, in]")
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != w.shape[1]:
            raise ValueError(f"lora_a[{name!r}] has shape {tuple(a.shape)}: expected [r, {w.shape[1]}] with rank "
                             "r >= 1 (the input width of the weight)")
        factors[name] = a.detach().to(device=w.device, dtype=w.dtype)
    return factors


def lora_setup(model: nn.Module, x: Tensor, labels: Tensor, lora_a: Mapping[str, Tensor], lr: float,
               scaling: float, batch_size: int):
    """The checked arguments of a LoRA-update computation: ``lr``, ``scaling`` (nonzero), the adapted
    weight names, the model's detached weights, the A factors and the batched examples."""
    lr = require_positive("lr", lr)
    scaling = require_float("scaling", scaling)
    if scaling == 0.0:
        raise ValueError("scaling=0.0: expected a nonzero LoRA scaling (the update would not depend on G)")
    names = list(lora_a)
    params = _weights(model, names)
    factors = check_lora_factors(params, lora_a)
    xb, yb = _batches(x, labels, batch_size)
    return lr, scaling, names, params, factors, xb, yb


def lora_step_pairs(model: nn.Module, x: Float[Tensor, "n *features"], labels: Int[Tensor, " n"],
                    lora_a: Mapping[str, Tensor], lr: float, scaling: float = 1.0, batch_size: int = 1
                    ) -> LoRAStepPairs:
    """Proxy pairs ``(Delta B, G)`` for the weight matrices named by ``lora_a`` (``name -> A [r, in]``), one
    per consecutive batch of ``batch_size`` examples: one SGD step of size ``lr`` of ``W0 + scaling B A``
    from ``B = 0`` on that batch, and the full gradient at ``W0`` it was taken from."""
    lr, scaling, names, params, factors, xb, yb = lora_setup(model, x, labels, lora_a, lr, scaling, batch_size)
    zeros = {n: params[n].new_zeros(params[n].shape[0], factors[n].shape[0]) for n in names}

    def adapted_loss(b: dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        adapted = {n: params[n] + scaling * b[n] @ factors[n] for n in names}
        return nn.functional.cross_entropy(functional_call(model, {**params, **adapted}, (xs,)), ys)

    grad_b = vmap(grad(adapted_loss), in_dims=(None, 0, 0))(zeros, xb, yb)
    full = per_example_full_gradients(model, x, labels, names, batch_size)
    delta_b = {n: -lr * grad_b[n] for n in names}
    delta_w = {n: scaling * delta_b[n] @ factors[n] for n in names}
    return LoRAStepPairs(full=full, delta_b=delta_b, delta_w=delta_w, lora_a=factors, lr=lr, scaling=scaling)
