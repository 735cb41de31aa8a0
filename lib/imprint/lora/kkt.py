"""Stationarity conditions of LoRA fine-tuning, and the reconstruction losses that invert them (chapter 05).

A bias-free MLP with pretrained weights ``W0_l`` is fine-tuned at some layers through a low-rank update,
``W_l = W0_l + s B_l A_l`` (``A_l`` is ``[r, in]``, ``B_l`` is ``[out, r]``, ``s`` peft's scaling
``lora_alpha / r``). With ``M_l = sum_i lam_i y_i grad_{W_l} f(x_i)`` the full-weight gradient of the
weighted margins at the fine-tuned point, the max-margin problem over ``(A, B)`` has the coupled
stationarity conditions

    A_l = s B_l^T M_l,        B_l = s M_l A_l^T,        lam_i >= 0,

because ``grad_{A_l} f = s B_l^T grad_{W_l} f`` and ``grad_{B_l} f = s grad_{W_l} f A_l^T``. Gradient
descent from peft's initialisation (``B = 0``, ``A`` random) leaves the second one behind approximately
in the lazy regime (``B`` is the accumulated ``-eta grad_B L``, and ``A`` barely moves while ``B`` is
small); from a balanced start both hold at the max-margin limit. :class:`LoRAFactors` holds an
attacker's view ``(W0, A, B)`` and computes the residual of either or both conditions for K sets of
candidates with ONE backward pass, as :func:`imprint.reconstruction.kkt.kkt_stationarity_loss` does
for full weights. :class:`WeightUpdate` is the view of an attacker who holds only the product
``Delta W_l = s B_l A_l`` (or a full fine-tuning's ``theta - theta_0``): the update is inverted as
``Delta W_l = (1/m) sum_j lam_j y_j grad_{W_l} f(x_j)``, the condition that gradient descent in the
linearised (NTK) regime satisfies. Both plug into the batched extraction of chapter 01.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from imprint.reconstruction.extraction import FullWeights, StationaritySystem
from imprint.reconstruction.kkt import (KKTForm, check_weights, kkt_stationarity_loss, modified_relu,
                                        surrogate_forward, weighted_outputs)

COUPLED_TERMS = ("A", "B")


def _stacked(t: Tensor, k: int) -> Tensor:
    """``t`` with a leading configuration axis of ``k`` (a view when ``t`` is shared)."""
    return t.unsqueeze(0).expand(k, *t.shape) if t.ndim == 2 else t


LINEARISATION_POINTS = ("tuned", "base", "mid")
# where the gradients of the conditions are taken: the fine-tuned weights, the base, or halfway between


def coupled_kkt_loss(base: Sequence[Tensor], factors: Mapping[int, tuple[Tensor, Tensor]],
                     scaling: Float[Tensor, " k"], x: Float[Tensor, "k m d"], lam: Float[Tensor, "k m *c"],
                     y: Tensor, alpha: Float[Tensor, " k"], form: KKTForm = "binary",
                     terms: Sequence[str] = COUPLED_TERMS, at: str = "tuned") -> Float[Tensor, " k"]:
    """Per configuration ``sum_l ||A_l - s B_l^T M_l||^2 + ||B_l - s M_l A_l^T||^2`` (the ``terms`` asked for),
    with ``M_l = (1/m) grad_{W_l} sum_j w_j(x_j, lam_j)`` taken in one backward pass at the fine-tuned
    weights ``W0 + s B A`` (``at="tuned"``: the max-margin condition), at the base ``W0`` (``at="base"``:
    the lazy-regime condition, gradients at the point fine-tuning started from), or halfway,
    ``W0 + s B A / 2`` (``at="mid"``: the trapezoidal estimate of the gradients along the path).

    ``M_l`` is the gradient with respect to a zero perturbation of each adapted layer's weights, so one
    backward gives all K configurations' ``M``. Differentiable with respect to ``x`` and ``lam``; the
    adapters and the base are constants. Zero-padded ranks (zero rows of ``A``, zero columns of ``B``)
    contribute nothing.
    """
    bad = sorted(set(terms) - set(COUPLED_TERMS))
    if not terms or bad:
        raise ValueError(f"terms={list(terms)}: expected a non-empty subset of {list(COUPLED_TERMS)}")
    if at not in LINEARISATION_POINTS:
        raise ValueError(f"at={at!r}: expected one of {list(LINEARISATION_POINTS)}")
    k, m, _ = x.shape
    s = scaling.reshape(-1, 1, 1).to(x.dtype)
    pairs = {i: tuple(_stacked(t.detach().to(x.dtype), k) for t in ab) for i, ab in factors.items()}
    weights = []
    perturb = {}
    for i, w in enumerate(base):
        w = _stacked(w.detach().to(x.dtype), k)
        if i in pairs:
            if at != "base":
                w = w + (1.0 if at == "tuned" else 0.5) * s * pairs[i][1] @ pairs[i][0]
            perturb[i] = torch.zeros_like(w, requires_grad=True)
            w = w + perturb[i]
        weights.append(w)
    out = surrogate_forward(weights, x, alpha)
    total = weighted_outputs(out, lam, y, form).sum() / m
    layers = sorted(perturb)
    grads = torch.autograd.grad(total, [perturb[i] for i in layers], create_graph=True)
    loss = x.new_zeros(k)
    for i, full in zip(layers, grads):
        lora_a, lora_b = pairs[i]
        if "A" in terms:
            loss = loss + ((lora_a - s * lora_b.transpose(-1, -2) @ full) ** 2).sum((1, 2))
        if "B" in terms:
            loss = loss + ((lora_b - s * full @ lora_a.transpose(-1, -2)) ** 2).sum((1, 2))
    return loss


def reference_coupled_residuals(base: Sequence[Tensor], factors: Mapping[int, tuple[Tensor, Tensor]],
                                scaling: float, x: Float[Tensor, "m d"], lam: Float[Tensor, " m"], y: Tensor,
                                alpha: float, form: KKTForm = "binary", at: str = "tuned"
                                ) -> dict[int, tuple[Tensor, Tensor]]:
    """``(A_l - G_A,l, B_l - G_B,l)`` per adapted layer, one candidate at a time (the slow reference of the
    tests): ``G_A = (1/m) sum_j s B^T grad_W w_j`` and ``G_B = (1/m) sum_j s grad_W w_j A^T``, with the
    full-weight gradients ``grad_W w_j`` formed explicitly for each candidate."""
    m = x.shape[0]
    share = {"tuned": 1.0, "base": 0.0, "mid": 0.5}[at]
    weights = [(w.detach() + (share * scaling * factors[i][1] @ factors[i][0] if i in factors else 0)).to(x.dtype)
               .requires_grad_(True) for i, w in enumerate(base)]
    a = torch.tensor([float(alpha)], dtype=x.dtype, device=x.device)
    sums = {i: torch.zeros_like(weights[i]) for i in factors}
    for j in range(m):
        h = x[j].reshape(1, 1, -1)
        for i, w in enumerate(weights):
            h = h @ w.T
            if i < len(weights) - 1:
                h = modified_relu(h, a.reshape(1, 1, 1))
        term = weighted_outputs(h, lam[j].reshape(1, 1), y[j:j + 1], form).sum()
        grads = torch.autograd.grad(term, [weights[i] for i in sorted(factors)], create_graph=True)
        for i, g in zip(sorted(factors), grads):
            sums[i] = sums[i] + g
    out = {}
    for i, (lora_a, lora_b) in factors.items():
        full = sums[i] / m
        out[i] = (lora_a - scaling * lora_b.T @ full, lora_b - scaling * full @ lora_a.T)
    return out


def _check_factors(base: Sequence[Tensor], factors: Mapping[int, tuple[Tensor, Tensor]], what: str = "factors"
                   ) -> None:
    if not factors:
        raise ValueError(f"{what} is empty: expected at least one adapted layer")
    for i, (lora_a, lora_b) in factors.items():
        if not 0 <= i < len(base):
            raise ValueError(f"{what} adapts layer {i}: the base network has layers 0..{len(base) - 1}")
        out_, in_ = base[i].shape[-2:]
        if lora_a.ndim != lora_b.ndim or lora_a.ndim not in (2, 3):
            raise ValueError(f"{what}[{i}]: A has shape {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}: "
                             "expected [r, in] and [out, r] (or stacks [K, r, in] and [K, out, r])")
        if lora_a.shape[-1] != in_ or lora_b.shape[-2] != out_ or lora_a.shape[-2] != lora_b.shape[-1]:
            raise ValueError(f"{what}[{i}]: A has shape {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}, "
                             f"the base layer is [{out_}, {in_}]: expected A [r, {in_}] and B [{out_}, r] "
                             "with the same rank r")


class LoRAFactors(StationaritySystem):
    """An attacker's view of a LoRA fine-tune: the base weights, every adapted layer's ``(A, B)`` and the
    scaling; the residual is that of the coupled conditions named in ``terms``, linearised ``at`` the
    fine-tuned or the base weights (:func:`coupled_kkt_loss`)."""

    def __init__(self, base: Sequence[Tensor], factors: Mapping[int, tuple[Tensor, Tensor]],
                 scaling: float | Tensor = 1.0, terms: Sequence[str] = COUPLED_TERMS, at: str = "tuned"):
        if at not in LINEARISATION_POINTS:
            raise ValueError(f"at={at!r}: expected one of {list(LINEARISATION_POINTS)}")
        self.at = at
        self.base = list(base)
        self.factors = {int(i): (ab[0], ab[1]) for i, ab in factors.items()}
        self.scaling = torch.as_tensor(scaling, dtype=torch.float64).reshape(-1)
        self.terms = tuple(terms)
        bad = sorted(set(self.terms) - set(COUPLED_TERMS))
        if not self.terms or bad:
            raise ValueError(f"terms={list(self.terms)}: expected a non-empty subset of {list(COUPLED_TERMS)}")

    @property
    def d_in(self) -> int:
        return self.base[0].shape[-1]

    @property
    def d_out(self) -> int:
        return self.base[-1].shape[-2]

    def check(self, n_configs: int | None = None) -> None:
        check_weights(self.base)
        _check_factors(self.base, self.factors)
        stacks = {t.shape[0] for ab in self.factors.values() for t in ab if t.ndim == 3}
        stacks |= {w.shape[0] for w in self.base if w.ndim == 3}
        stacks |= {len(self.scaling)} - {1}
        if len(stacks) > 1 or (n_configs is not None and stacks and stacks != {n_configs}):
            raise ValueError(f"LoRAFactors stacks {sorted(stacks)} networks: expected one per configuration "
                             f"({n_configs}) or a single network")

    def signature(self) -> list:
        """Base shapes and adapted layers; ranks may differ (:meth:`stack` zero-pads them)."""
        return [tuple(w.shape[-2:]) for w in self.base] + sorted(self.factors)

    def digest_tensors(self) -> list[Tensor]:
        ab = [t for _, pair in sorted(self.factors.items()) for t in pair]
        return [*self.base, *ab, self.scaling.reshape(1, -1)]

    def target_norm(self) -> float:
        """The norm of the entries the residual compares (A, B or both) of a single network."""
        picked = [ab[j] for ab in self.factors.values() for j, name in enumerate(COUPLED_TERMS) if name in self.terms]
        return float(sum(t.double().norm() ** 2 for t in picked) ** 0.5)

    def to(self, device, dtype) -> "LoRAFactors":
        return LoRAFactors([w.detach().to(device, dtype) for w in self.base],
                           {i: tuple(t.detach().to(device, dtype) for t in ab) for i, ab in self.factors.items()},
                           self.scaling.to(device), self.terms, self.at)

    def loss(self, x, lam, y, alpha, form):
        scaling = self.scaling.to(x.device).expand(x.shape[0]) if len(self.scaling) == 1 else self.scaling
        return coupled_kkt_loss(self.base, self.factors, scaling.to(x.device), x, lam, y, alpha, form, self.terms,
                                self.at)

    @classmethod
    def stack(cls, systems, repeats, device, dtype) -> "LoRAFactors":
        def rep(t: Tensor) -> Tensor:
            return t.detach().to(device, dtype).unsqueeze(0).expand(repeats, *t.shape)

        def padded(pair: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
            lora_a, lora_b = pair  # zero rows of A and columns of B leave the loss unchanged
            return (torch.cat([lora_a, lora_a.new_zeros(rank - lora_a.shape[-2], lora_a.shape[-1])]),
                    torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[-2], rank - lora_b.shape[-1])], dim=1))

        first = systems[0]
        if any(t.ndim != 2 for s in systems for ab in s.factors.values() for t in ab):
            raise ValueError("stack takes single networks: expected 2-D factors [r, in] and [out, r]")
        r_max = {i: max(s.factors[i][0].shape[0] for s in systems) for i in first.factors}
        shared_base = all(all(torch.equal(a, b) for a, b in zip(s.base, first.base)) for s in systems)
        base = first.base if shared_base else [torch.cat([rep(s.base[i]) for s in systems])
                                                for i in range(len(first.base))]
        factors = {i: tuple(torch.cat([rep(padded(s.factors[i], r_max[i])[j]) for s in systems]) for j in range(2))
                   for i in first.factors}
        scaling = torch.cat([s.scaling.expand(1).repeat(repeats) for s in systems])
        if any((s.terms, s.at) != (first.terms, first.at) for s in systems):
            raise ValueError("networks use different coupled terms or linearisation points: expected one of each "
                             "for the batch")
        return cls([w.detach().to(device, dtype) for w in base], factors, scaling, first.terms, first.at)


class WeightUpdate(FullWeights):
    """An attacker's view of a fine-tune as a full-weight update: the weights the gradients are taken at
    (the fine-tuned ``theta`` or the base ``theta_0``) and the updates ``Delta_l`` of the layers that
    changed; the residual is ``sum_l ||Delta_l - (1/m) grad_{W_l} sum_j w_j||^2`` at those weights."""

    def __init__(self, weights: Sequence[Tensor], updates: Mapping[int, Tensor]):
        super().__init__(weights)
        self.updates = {int(i): u for i, u in updates.items()}

    @classmethod
    def from_factors(cls, base: Sequence[Tensor], factors: Mapping[int, tuple[Tensor, Tensor]],
                     scaling: float = 1.0, at: str = "tuned") -> "WeightUpdate":
        """The product ``s B A`` of a LoRA fine-tune (2-D factors), its gradients taken at the fine-tuned
        weights (``at="tuned"``) or at the base (``at="base"``)."""
        _check_factors(base, factors)
        return cls.from_update(base, {i: float(scaling) * b @ a for i, (a, b) in factors.items()}, at)

    @classmethod
    def from_update(cls, base: Sequence[Tensor], updates: Mapping[int, Tensor], at: str = "tuned") -> "WeightUpdate":
        """``base + updates``, with gradients at the fine-tuned weights, the base or halfway (``at``)."""
        if at not in LINEARISATION_POINTS:
            raise ValueError(f"at={at!r}: expected one of {list(LINEARISATION_POINTS)}")
        share = {"tuned": 1.0, "base": 0.0, "mid": 0.5}[at]
        return cls([w + share * updates[i] if i in updates else w for i, w in enumerate(base)], updates)

    def check(self, n_configs: int | None = None) -> None:
        super().check(n_configs)
        if not self.updates:
            raise ValueError("updates is empty: expected the update of at least one layer")
        for i, u in self.updates.items():
            if not 0 <= i < len(self.weights) or u.shape[-2:] != self.weights[i].shape[-2:]:
                raise ValueError(f"updates[{i}] has shape {tuple(u.shape)}: expected the shape of layer {i} of "
                                 f"the network ({len(self.weights)} layers)")

    def signature(self) -> list:
        return super().signature() + sorted(self.updates)

    def digest_tensors(self) -> list[Tensor]:
        return [*self.weights, *(self.updates[i] for i in sorted(self.updates))]

    def target_norm(self) -> float:
        """The norm of the update of a single network."""
        return float(sum(u.double().norm() ** 2 for u in self.updates.values()) ** 0.5)

    def to(self, device, dtype) -> "WeightUpdate":
        return WeightUpdate([w.detach().to(device, dtype) for w in self.weights],
                            {i: u.detach().to(device, dtype) for i, u in self.updates.items()})

    def loss(self, x, lam, y, alpha, form):
        return kkt_stationarity_loss(self.weights, x, lam, y, alpha, form, targets=self.updates)

    @classmethod
    def stack(cls, systems, repeats, device, dtype) -> "WeightUpdate":
        def cat(tensors):
            return torch.cat([t.detach().to(device, dtype).unsqueeze(0).expand(repeats, *t.shape) for t in tensors])

        first = systems[0]
        weights = [cat([s.weights[i] for s in systems]) for i in range(len(first.weights))]
        return cls(weights, {i: cat([s.updates[i] for s in systems]) for i in first.updates})


def balancedness(factors: Mapping[int, tuple[Tensor, Tensor]]) -> dict[int, float]:
    """Per layer ``||A A^T - B^T B||_F / (||A A^T||_F + ||B^T B||_F)``: 0 for a balanced pair (which
    gradient flow keeps balanced), 1 when one side dominates."""
    out = {}
    for i, (lora_a, lora_b) in factors.items():
        a, b = lora_a.double(), lora_b.double()
        gram_a, gram_b = a @ a.T, b.T @ b
        den = float(gram_a.norm() + gram_b.norm())
        out[i] = float((gram_a - gram_b).norm()) / den if den > 0 else 0.0
    return out


def _layer_gradients(weights: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """Per layer ``[n, out, in]``: the gradients of the margins ``y_i f(x_i)`` at ``weights`` (exact ReLU)."""
    from imprint.reconstruction.kkt import constraint_gradients

    rows = constraint_gradients([w.double() for w in weights], x, y, "binary")
    out, start = [], 0
    for w in weights:
        out.append(rows[:, start:start + w.numel()].reshape(len(x), *w.shape[-2:]))
        start += w.numel()
    return out


def coupled_kkt_residual(base: Sequence[Tensor], factors: Mapping[int, tuple[Tensor, Tensor]], scaling: float,
                         x: Float[Tensor, "n d"], y: Tensor, terms: Sequence[str] = COUPLED_TERMS,
                         at: str = "tuned") -> float:
    """``min_{lam >= 0} ||v - sum_i lam_i g_i|| / ||v||``, ``v`` the adapters' entries of the ``terms`` asked
    for and ``g_i = (s B^T G_i, s G_i A^T)`` with ``G_i`` the margin gradient of ``x_i`` at the fine-tuned
    or base weights (``at``): how exactly the adapters satisfy the coupled condition on the inputs ``x``
    (the private set, or a control). NNLS in the Gram form (chapter 00's solver)."""
    from imprint.reconstruction.implicit_bias import nnls_gram

    point = WeightUpdate.from_factors([w.double() for w in base],
                                      {i: tuple(t.double() for t in ab) for i, ab in factors.items()}, scaling, at)
    grads = _layer_gradients(point.weights, x, y)
    rows, target = [], []
    for i in sorted(factors):
        lora_a, lora_b = (t.detach().double() for t in factors[i])
        if "A" in terms:
            rows.append((scaling * lora_b.T @ grads[i]).reshape(len(x), -1))
            target.append(lora_a.reshape(-1))
        if "B" in terms:
            rows.append((scaling * grads[i] @ lora_a.T).reshape(len(x), -1))
            target.append(lora_b.reshape(-1))
    return _nnls_relative(torch.cat(rows, 1), torch.cat(target), nnls_gram)


def update_kkt_residual(weights: Sequence[Tensor], updates: Mapping[int, Tensor], x: Float[Tensor, "n d"],
                        y: Tensor) -> float:
    """``min_{lam >= 0} ||Delta - sum_i lam_i grad_W y_i f(x_i)|| / ||Delta||`` over the updated layers,
    with gradients at ``weights`` (fine-tuned or base): how exactly an update is a non-negative
    combination of the margin gradients of ``x``."""
    from imprint.reconstruction.implicit_bias import nnls_gram

    grads = _layer_gradients(weights, x, y)
    rows = torch.cat([grads[i].reshape(len(x), -1) for i in sorted(updates)], 1)
    target = torch.cat([updates[i].detach().double().reshape(-1) for i in sorted(updates)])
    return _nnls_relative(rows, target, nnls_gram)


def _nnls_relative(rows: Tensor, target: Tensor, solver) -> float:
    norm = float(target.norm())
    if norm == 0:
        return float("nan")
    lam = torch.as_tensor(solver(rows @ rows.T, rows @ target), dtype=torch.float64)
    return float((target - rows.T @ lam).norm()) / norm
