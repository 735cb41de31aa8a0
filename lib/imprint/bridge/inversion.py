"""Inverting Gradients (Geiping et al., 2020): images from a parameter gradient, for the gradient bridge
(chapter 06).

The attacker knows the model, the labels and a gradient ``g*`` of the mean cross-entropy on a private
batch (the true gradient, one decoded from a LoRA update, or a control). A candidate batch ``x`` is scored
by the matching loss of its own gradient ``g(x)``,

    1 - <g(x), g*>_w / (||g(x)||_w ||g*||_w)  +  tv_weight * TV(x),

one cosine over all layers at once (the weighted products and squared norms summed over layers before
the normalisation, as ``reconstruction_costs(cost_fn="sim")`` of ``inversefed`` and ``CosineSimilarity``
of ``breaching`` compute it, not an average of per-layer cosines), and ``TV`` the anisotropic total
variation, the mean absolute difference of horizontal neighbours plus that of vertical ones. The
candidate moves by Adam on the sign of the objective's gradient, is projected into the box after every
step, and its step size decays tenfold at 3/8, 5/8 and 7/8 of the iterations; several restarts run as one
batch along a leading axis (``torch.func.vmap`` of ``grad`` of a ``functional_call``) and the one with the
lowest final matching loss is returned. Adam acts element by element, so the batch is exactly the
restarts run one at a time. :func:`invert_gradients_batch` stacks several target gradients of one model
the same way (every target and restart one candidate along the leading axes, each target with its own
layer weights, prior weight, and optionally its own labels and seed), so several attacks, and several
private batches, cost one optimisation's kernel launches.

The anchors optimise in the mean/std-normalised space of their data set: their ``randn`` start is
``N(mean, std^2)`` in pixels, their step size ``lr`` moves a pixel by ``lr * std`` and their TV weight
``w`` is ``w / std`` here. The start is therefore ``init_mean + init_std * N(0, I)`` (default: the
standard normal of the pixel space, ``init_mean=0, init_std=1``), and the step size and the TV weight
are in pixel units. Written here rather than imported: ``inversefed`` and ``breaching`` are
research code bases, not maintained libraries, and run restarts one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from imprint.runtime.checks import require_choice, require_float, require_int

#: How the prior's gradient joins the matching gradient: added as it is, or both scaled to unit norm first.
PRIOR_BALANCES = ("absolute", "relative")
DECAY_FRACTIONS = (3 / 8, 5 / 8, 7 / 8)  # the step size is divided by ten at these fractions of the steps


def gradient_matching_loss(grads_a: Sequence[Tensor], grads_b: Sequence[Tensor],
                           weights: Sequence[float] | Tensor | None = None) -> Float[Tensor, ""]:
    """``1 - cos(g_a, g_b)`` of the gradients concatenated over layers, each layer's products weighted by
    ``weights[l]`` (default: all 1): 0 for equal directions, 1 for orthogonal, 2 for opposite. A zero
    gradient counts as orthogonal to everything."""
    if len(grads_a) != len(grads_b) or not grads_a:
        raise ValueError(f"grads_a has {len(grads_a)} layers and grads_b {len(grads_b)}: expected the same "
                         "number, at least one")
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        if a.shape != b.shape:
            raise ValueError(f"grads_a[{i}] has shape {tuple(a.shape)} and grads_b[{i}] {tuple(b.shape)}: expected "
                             "the same shape")
    if weights is None:
        weights = [1.0] * len(grads_a)
    if len(weights) != len(grads_a):
        raise ValueError(f"weights has {len(weights)} entries: expected one per layer ({len(grads_a)})")
    dot = norm_a = norm_b = 0.0
    for w, a, b in zip(weights, grads_a, grads_b):
        b = b.to(a.dtype)
        dot = dot + w * (a * b).sum()
        norm_a = norm_a + w * (a * a).sum()
        norm_b = norm_b + w * (b * b).sum()
    tiny = torch.finfo(grads_a[0].dtype).tiny
    return 1 - dot / (norm_a * norm_b).clamp_min(tiny).sqrt()


def total_variation(x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, ""]:
    """Anisotropic total variation: the mean absolute difference of horizontal neighbours plus the mean
    absolute difference of vertical neighbours, over the whole batch."""
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected images of at least 2x2 pixels")
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def _loss(model: nn.Module, params: dict[str, Tensor], x: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.cross_entropy(functional_call(model, params, (x,)), labels)


def _parameters(model: nn.Module, device: torch.device | None = None) -> dict[str, Tensor]:
    return {n: p.detach().to(device) for n, p in model.named_parameters()}


def model_gradients(model: nn.Module, x: Float[Tensor, "batch channels height width"],
                    labels: Int[Tensor, " batch"]) -> dict[str, Tensor]:
    """The gradient of the mean cross-entropy on ``(x, labels)`` with respect to every parameter of
    ``model`` (a ``functional_call``, the model itself untouched): what a client shares, and what
    :func:`invert_gradients` computes for its candidates."""
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}: expected ({x.shape[0]},), one per image of x")
    params = _parameters(model, x.device)
    return grad(lambda p: _loss(model, p, x, labels))(params)


@dataclass(frozen=True)
class InversionResult:
    """What :func:`invert_gradients` found: the best restart's images, every restart's final images and
    matching loss (without the TV term; ``inf`` for a restart that diverged), and which restart won."""

    images: Tensor       # [batch, channels, height, width]
    candidates: Tensor   # [restarts, batch, channels, height, width]
    losses: Tensor       # [restarts]
    best: int


def decay_milestones(steps: int) -> list[int]:
    """The iterations after which the step size is divided by ten: 3/8, 5/8 and 7/8 of ``steps``, rounded down."""
    return [int(steps * f) for f in DECAY_FRACTIONS]


def _ordered_target(target: Mapping[str, Tensor] | Sequence[Tensor], params: Mapping[str, Tensor],
                    name: str) -> list[Tensor]:
    """``target`` as a list in ``params`` order, its keys and shapes checked against ``params``."""
    names = list(params)
    if isinstance(target, Mapping):
        if set(target) != set(names):
            raise ValueError(f"{name} has keys {sorted(target)}: expected the parameters of model {sorted(names)}")
        target = [target[n] for n in names]
    else:
        target = list(target)
    if len(target) != len(names) or any(t.shape != params[n].shape for t, n in zip(target, names)):
        raise ValueError(f"{name} has shapes {[tuple(t.shape) for t in target]}: expected those of the "
                         f"parameters of model {[tuple(p.shape) for p in params.values()]}")
    return target


def _check_layer_weights(weights: Sequence[float] | None, n_layers: int, name: str) -> None:
    if weights is not None and len(weights) != n_layers:
        raise ValueError(f"{name} has {len(weights)} entries: expected one per parameter ({n_layers})")


def invert_gradients(model: nn.Module, target_grads: Mapping[str, Tensor] | Sequence[Tensor],
                     labels: Int[Tensor, " batch"], shape: Sequence[int], steps: int, lr: float = 0.1,
                     tv_weight: float = 1e-4, restarts: int = 1, seed: int = 0,
                     box: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                     weights: Sequence[float] | None = None, prior: Callable[[Tensor], Tensor] | None = None,
                     prior_weight: float = 0.0, init_mean: float = 0.0, init_std: float = 1.0,
                     prior_balance: str = "absolute") -> InversionResult:
    """Images ``[batch, *shape[1:]]`` whose gradient under ``model`` matches ``target_grads``.

    ``target_grads`` holds one tensor per parameter of ``model`` (a mapping by name, or a sequence in
    ``named_parameters`` order); ``labels`` are the private batch's labels (given, not recovered);
    ``shape`` is ``(batch, channels, height, width)``. Restart ``k`` starts from ``init_mean + init_std * z``
    with ``z`` a standard normal draw of a generator seeded with ``seed + k`` (``init="randn"`` of the
    anchor, in its normalised space when ``init_mean`` and ``init_std`` are the data's pixel mean and
    standard deviation), so restart ``k`` alone is ``restarts=1, seed=seed + k``. ``model`` should be in eval mode (its buffers are read, not updated).
    ``prior`` (e.g. :func:`imprint.bridge.prior.sds_prior`) maps the stack of candidates
    ``[restarts, *shape]`` to a gradient of the same shape, added times ``prior_weight`` to the
    objective's gradient before its sign is taken; the matching loss that ranks restarts leaves it out.
    With ``prior_balance="relative"`` both are first scaled to unit norm per candidate, so that
    ``prior_weight`` is the prior's share of the step's direction at every step (the signed step makes an
    absolute weight meaningless once the matching gradient shrinks: any prior then sets every sign).
    One target of :func:`invert_gradients_batch`.
    """
    prior_weight = require_float("prior_weight", prior_weight, minimum=0.0)
    if prior_weight > 0 and prior is None:
        raise ValueError(f"prior_weight={prior_weight}: expected a prior to weigh (prior is None)")
    params = _parameters(model)
    target = _ordered_target(target_grads, params, "target_grads")
    _check_layer_weights(weights, len(params), "weights")
    stacked = None if prior is None else (lambda x: prior(x[0]).unsqueeze(0))
    return invert_gradients_batch(model, [target], labels, shape, steps, lr=lr, tv_weight=tv_weight,
                                  restarts=restarts, seed=seed, box=box, device=device, weights=[weights],
                                  prior=stacked, prior_weights=[prior_weight], init_mean=init_mean,
                                  init_std=init_std, prior_balance=prior_balance)[0]


def _unit(x: Tensor, lead: int) -> Tensor:
    """``x`` scaled to unit norm over its last ``len(shape)`` axes (one candidate's images): ``x`` is
    ``[m, restarts, *shape]`` and ``lead`` is ``len(shape) + 1``, so the norm is per (target, restart)."""
    norm = x.flatten(x.dim() - lead + 1).norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
    return x / norm.view(*norm.shape, *[1] * (lead - 1))


def invert_gradients_batch(model: nn.Module, targets: Sequence[Mapping[str, Tensor] | Sequence[Tensor]],
                           labels: Int[Tensor, " batch"] | Int[Tensor, "targets batch"], shape: Sequence[int],
                           steps: int, lr: float = 0.1, tv_weight: float = 1e-4, restarts: int = 1,
                           seed: int | Sequence[int] = 0, box: tuple[float, float] = (0.0, 1.0),
                           device: str | torch.device = "cpu",
                           weights: Sequence[Sequence[float] | None] | None = None,
                           prior: Callable[[Tensor], Tensor] | None = None,
                           prior_weights: Sequence[float] | None = None, init_mean: float = 0.0,
                           init_std: float = 1.0, prior_balance: str = "absolute") -> list[InversionResult]:
    """:func:`invert_gradients` of several target gradients under one model, as one optimisation: one
    result per target, in order.

    Every (target, restart) pair is one candidate along the leading axes ``[targets, restarts]``; restart
    ``k`` of target ``i`` starts from ``init_mean + init_std * z`` with ``z`` the draw of a generator seeded
    with ``seed + k`` (``seed[i] + k`` when ``seed`` is a sequence, one per target), and Adam, the sign
    and the box act element by element, so target ``i`` comes out as ``invert_gradients`` of
    ``targets[i]`` with ``weights[i]``, ``prior_weights[i]``, its labels and its seed would give it.
    ``labels`` are ``[batch]`` (shared by every target) or ``[targets, batch]`` (row ``i`` the labels of
    target ``i``: several private batches inverted together). ``weights[i]`` are target
    ``i``'s layer weights (``None``: all 1; ``weights=None``: ``None`` for every target);
    ``prior_weights[i]`` its prior's weight (default: 0, no prior). ``prior`` maps the stack
    ``[m, restarts, *shape]`` of the candidates of the ``m`` targets with a positive prior weight, in
    order, to a gradient of the same shape (e.g. :func:`imprint.bridge.prior.sds_priors`, one stream per
    target); it never sees the other targets' candidates, so theirs do not depend on its draws.
    ``prior_balance`` as in :func:`invert_gradients`.
    """
    if len(targets) < 1:
        raise ValueError("targets is empty: expected at least one target gradient")
    n_targets = len(targets)
    if weights is None:
        weights = [None] * n_targets
    if prior_weights is None:
        prior_weights = [0.0] * n_targets
    for name, values in (("weights", weights), ("prior_weights", prior_weights)):
        if len(values) != n_targets:
            raise ValueError(f"{name} has {len(values)} entries: expected one per target ({n_targets})")
    prior_weights = [require_float(f"prior_weights[{i}]", w, minimum=0.0) for i, w in enumerate(prior_weights)]
    if prior is None and any(w > 0 for w in prior_weights):
        raise ValueError(f"prior_weights={prior_weights}: expected a prior to weigh (prior is None)")
    steps = require_int("steps", steps, minimum=1)
    lr = require_float("lr", lr, minimum=0.0, strict_minimum=True)
    tv_weight = require_float("tv_weight", tv_weight, minimum=0.0)
    restarts = require_int("restarts", restarts, minimum=1)
    require_choice("prior_balance", prior_balance, PRIOR_BALANCES)
    if isinstance(seed, (list, tuple)):
        seeds = [require_int(f"seed[{i}]", s) for i, s in enumerate(seed)]
        if len(seeds) != n_targets:
            raise ValueError(f"seed has {len(seeds)} entries: expected one per target ({n_targets}) or one int")
    else:
        seeds = [require_int("seed", seed)] * n_targets
    init_mean = require_float("init_mean", init_mean)
    init_std = require_float("init_std", init_std, minimum=0.0)
    if len(box) != 2 or not float(box[0]) < float(box[1]):
        raise ValueError(f"box={tuple(box)!r}: expected (lo, hi) with lo < hi")
    lo, hi = float(box[0]), float(box[1])
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape={shape!r}: expected (batch, channels, height, width), all >= 1")
    if labels.shape == shape[:1]:
        labels = labels.unsqueeze(0).expand(n_targets, -1)
    elif labels.shape != (n_targets, shape[0]):
        raise ValueError(f"labels has shape {tuple(labels.shape)}: expected ({shape[0]},), one per image, or "
                         f"({n_targets}, {shape[0]}), one row per target")
    device = torch.device(device)
    params = _parameters(model, device)
    names = list(params)
    ordered = [_ordered_target(t, params, f"targets[{i}]") for i, t in enumerate(targets)]
    for i, w in enumerate(weights):
        _check_layer_weights(w, len(names), f"weights[{i}]")
    dtype = next(iter(params.values())).dtype
    # one stack per layer, [targets, *parameter shape], and one row of layer weights per target
    target = [torch.stack([t[j].detach().to(device, dtype) for t in ordered]) for j in range(len(names))]
    layer_weights = torch.tensor([[1.0] * len(names) if w is None else [float(v) for v in w] for w in weights],
                                 dtype=dtype, device=device)
    labels = labels.to(device)

    def matching(x: Tensor, target: list[Tensor], w: Tensor, y: Tensor) -> Tensor:
        g = grad(lambda p: _loss(model, p, x, y))(params)
        return gradient_matching_loss([g[n] for n in names], target, w)

    def objective(x: Tensor, target: list[Tensor], w: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        match = matching(x, target, w, y)
        return match + tv_weight * total_variation(x), match

    def over_candidates(fn: Callable) -> Callable:
        """``fn`` over ``[targets, restarts]``: restarts share their target's gradient, weights and labels."""
        return vmap(vmap(fn, in_dims=(0, None, None, None)), in_dims=(0, 0, 0, 0))

    step_direction = over_candidates(grad(objective, has_aux=True))
    draws = {}
    for s in sorted(set(seeds)):
        starts = []
        for k in range(restarts):
            gen = torch.Generator(device).manual_seed(s + k)
            starts.append(torch.randn(shape, generator=gen, device=device, dtype=dtype))
        draws[s] = torch.stack(starts)
    x = init_mean + init_std * torch.stack([draws[s] for s in seeds])
    with_prior = [i for i, w in enumerate(prior_weights) if w > 0]
    prior_scale = torch.tensor([prior_weights[i] for i in with_prior], dtype=dtype,
                               device=device).view(-1, *[1] * (len(shape) + 1))
    optimizer = torch.optim.Adam([x], lr=lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=decay_milestones(steps), gamma=0.1)
    for _ in range(steps):
        direction, _ = step_direction(x, target, layer_weights, labels)
        if with_prior:
            pulled = prior(x.detach()[with_prior])
            if prior_balance == "relative":
                matched = direction[with_prior]
                direction[with_prior] = _unit(matched, len(shape) + 1) + prior_scale * _unit(pulled, len(shape) + 1)
            else:
                direction[with_prior] += prior_scale * pulled
        x.grad = direction.sign()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    with torch.no_grad():
        losses = over_candidates(matching)(x, target, layer_weights, labels)
    losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))
    candidates = x.detach()
    out = []
    for i in range(n_targets):
        best = int(torch.argmin(losses[i]))
        out.append(InversionResult(images=candidates[i, best].clone(), candidates=candidates[i].clone(),
                                   losses=losses[i].clone(), best=best))
    return out
