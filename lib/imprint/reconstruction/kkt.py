"""The KKT stationarity loss that reconstructs training data from trained weights (chapters 01 and 02).

A bias-free ReLU network trained to convergence on the logistic loss approaches a KKT point of
``min ||theta||^2 / 2  s.t.  y_i Phi(theta; x_i) >= 1``, so its parameters satisfy
``theta = sum_i lam_i y_i grad_theta Phi(theta; x_i)`` with ``lam_i >= 0`` (Lyu & Li 2019). Haim et al.
(2022) turn this around: with theta known, they search for candidates ``x_j`` and multipliers ``lam_j``
that make the right-hand side equal theta. This module computes that residual,

    L(x, lam) = sum_layers || theta - (1/m) sum_j lam_j y_j grad_theta Phi(theta; x_j) ||^2,

with ONE backward pass of ``sum_j lam_j y_j Phi(x_j)`` taken with ``create_graph=True`` (no loop over
candidates), for K independent hyperparameter configurations at once: the weights are expanded to a
leading configuration axis, so the gradient of the summed outputs with respect to the expanded copy is
the K per-configuration sums in a single backward. It also holds the variants of Buzaglo et al. (2023):
the multiclass margin ``lam_j (Phi_{y_j} - max_{k != y_j} Phi_k)(x_j)`` and the weight-decay / general
loss form ``theta = sum_j lam_j grad_theta l(x_j)`` with free-sign ``lam``; and the priors (a pixel box,
a hinge keeping ``lam`` above ``lambda_min``). A fourth form, ``multiclass_all``, keeps one multiplier per
competing class, ``sum_{k != y_j} lam_jk (Phi_{y_j} - Phi_k)(x_j)``: the stationarity condition of the
multiclass max-margin problem (one constraint per competing class) and, exactly, that of cross-entropy
with weight decay at convergence, where ``lam_jk`` is proportional to the softmax probability of class k. The ReLU's derivative is replaced by ``sigmoid(alpha z)``
(ModifiedReLU): a step function has no useful derivative with respect to the input, and the loss needs
one because it is itself a function of a gradient.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

KKTForm = Literal["binary", "multiclass", "multiclass_all", "general"]
KKT_FORMS = ("binary", "multiclass", "multiclass_all", "general")


class ModifiedReLUFunction(torch.autograd.Function):
    """ReLU forward; backward ``grad * sigmoid(alpha * x)``, written in differentiable operations.

    Because the backward is itself made of autograd operations on the saved input, a backward taken with
    ``create_graph=True`` can be differentiated again: its derivative with respect to the input is
    ``grad * alpha * s (1 - s)`` with ``s = sigmoid(alpha x)``. ``alpha`` is a float or a tensor that
    broadcasts against ``x`` (one sharpness per configuration); it receives no gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, alpha: Tensor) -> Tensor:
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, alpha = inputs
        ctx.save_for_backward(x, alpha)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, alpha = ctx.saved_tensors
        return grad_output * torch.sigmoid(alpha * x), None


def modified_relu(x: Tensor, alpha: float | Tensor) -> Tensor:
    """Apply :class:`ModifiedReLUFunction`; ``alpha`` > 0, a float or a tensor broadcasting against ``x``."""
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    return ModifiedReLUFunction.apply(x, alpha)


class ModifiedReLU(nn.Module):
    """``nn.Module`` wrapper of :func:`modified_relu`, usable as the activation of ``imprint.models.mlp.MLP``."""

    def __init__(self, alpha: float):
        super().__init__()
        if not float(alpha) > 0:
            raise ValueError(f"alpha={alpha!r}: expected a positive sharpness of the surrogate derivative")
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return modified_relu(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def extraction_model(model: nn.Module, alpha: float) -> nn.Module:
    """A copy of a trained ``MLP`` whose activation is ModifiedReLU(alpha); the weights are unchanged."""
    from imprint.models.mlp import MLP

    if not isinstance(model, MLP):
        raise ValueError(f"model is a {type(model).__name__}: expected imprint.models.mlp.MLP")
    copy = MLP(model.d_in, model.widths, model.d_out, ModifiedReLU(alpha))
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device, next(model.parameters()).dtype)


def model_weights(model: nn.Module) -> list[Tensor]:
    """The weight matrices ``[out, in]`` of a bias-free MLP, input layer first, detached."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"model is a {type(model).__name__}: expected an MLP with a .layers list")
    for i, layer in enumerate(layers):
        if getattr(layer, "bias", None) is not None:
            raise ValueError(f"model.layers[{i}] has a bias: the KKT conditions here assume a "
                             "bias-free (homogeneous) network")
    return [layer.weight.detach() for layer in layers]


def check_weights(weights: Sequence[Tensor], d_in: int | None = None, n_configs: int | None = None) -> None:
    """Consecutive layers must chain: ``weights[i]`` is ``[out_i, in_i]`` with ``in_i = out_{i-1}``, or, for one
    network per configuration, ``[K, out_i, in_i]`` with the same ``K`` in every layer."""
    if len(weights) < 1:
        raise ValueError("weights is empty: expected one [out, in] matrix per layer")
    ndim = weights[0].ndim
    for i, w in enumerate(weights):
        if w.ndim not in (2, 3) or w.ndim != ndim:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)}: expected every layer to be a matrix "
                             "[out, in], or every layer a stack [K, out, in]")
        if ndim == 3 and w.shape[0] != weights[0].shape[0]:
            raise ValueError(f"weights[{i}] stacks {w.shape[0]} networks, weights[0] stacks {weights[0].shape[0]}")
        if i and w.shape[-1] != weights[i - 1].shape[-2]:
            raise ValueError(f"weights[{i}] has shape {tuple(w.shape)}: its input size {w.shape[-1]} does not "
                             f"match the output size {weights[i - 1].shape[-2]} of weights[{i - 1}]")
    if d_in is not None and weights[0].shape[-1] != d_in:
        raise ValueError(f"weights[0] has shape {tuple(weights[0].shape)}: expected input size d_in={d_in} "
                         "(the candidates' dimension)")
    if n_configs is not None and ndim == 3 and weights[0].shape[0] != n_configs:
        raise ValueError(f"weights stack {weights[0].shape[0]} networks: expected one per configuration "
                         f"({n_configs}) or a single network")


def surrogate_forward(weights: Sequence[Tensor], x: Float[Tensor, "k m d"],
                      alpha: Float[Tensor, " k"]) -> Float[Tensor, "k m c"]:
    """Outputs of the MLP with ModifiedReLU(alpha_k) on candidates ``x[k]``.

    ``weights[i]`` is ``[out, in]`` (shared by all configurations) or ``[K, out, in]`` (one network each).
    """
    a = alpha.reshape(-1, 1, 1).to(x.dtype)
    h = x
    for w in weights[:-1]:
        h = modified_relu(h @ w.transpose(-1, -2), a)
    return h @ weights[-1].transpose(-1, -2)


def weighted_outputs(out: Float[Tensor, "k m c"], lam: Float[Tensor, "k m *c"], y: Tensor,
                     form: KKTForm) -> Float[Tensor, "k m"]:
    """The per-candidate terms whose parameter gradient, summed, should equal theta.

    binary:         lam_j y_j Phi(x_j)                                   (y in {+1, -1}, one output)
    multiclass:     lam_j (Phi_{y_j}(x_j) - max_{k != y_j} Phi_k(x_j))    (y a class index)
    multiclass_all: sum_{k != y_j} lam_jk (Phi_{y_j}(x_j) - Phi_k(x_j))   (lam [K, m, C]; its y_j entry unused)
    general:        lam_j Phi(x_j) for one output, lam_j * CE(Phi(x_j), y_j) for several (lam of free sign)
    """
    if form == "binary":
        return lam * y.to(out.dtype) * out[..., 0]
    if form in ("multiclass", "multiclass_all"):
        idx = y.reshape(1, -1, 1).expand(out.shape[0], -1, 1)
        true = out.gather(-1, idx)
        if form == "multiclass_all":
            competitors = torch.ones_like(out, dtype=torch.bool).scatter(-1, idx, False)
            return (lam * (true - out) * competitors).sum(-1)
        others = out.scatter(-1, idx, float("-inf")).max(-1).values
        return lam * (true[..., 0] - others)
    if form == "general":
        if out.shape[-1] == 1:
            return lam * out[..., 0]
        idx = y.reshape(1, -1, 1).expand(out.shape[0], -1, 1)
        ce = -torch.log_softmax(out, -1).gather(-1, idx)[..., 0]
        return lam * ce
    raise ValueError(f"form={form!r}: expected one of {list(KKT_FORMS)}")


def check_labels(y: Tensor, m: int, d_out: int, form: KKTForm) -> None:
    if form not in KKT_FORMS:
        raise ValueError(f"form={form!r}: expected one of {list(KKT_FORMS)}")
    if y.shape != (m,):
        raise ValueError(f"y has shape {tuple(y.shape)}: expected one label per candidate ({m},)")
    if form == "binary":
        if d_out != 1:
            raise ValueError(f"form='binary' needs a network with one output, got d_out={d_out}")
        if not bool(((y == 1) | (y == -1)).all()):
            raise ValueError("y: form='binary' expects candidate labels in {+1, -1}")
    if form in ("multiclass", "multiclass_all") or (form == "general" and d_out > 1):
        if d_out < 2:
            raise ValueError(f"form={form!r} with class labels needs d_out >= 2, got d_out={d_out}")
        if y.is_floating_point() or int(y.min()) < 0 or int(y.max()) >= d_out:
            raise ValueError(f"y: form={form!r} expects class indices in [0, {d_out})")


def kkt_stationarity_loss(weights: Sequence[Tensor], x: Float[Tensor, "k m d"], lam: Float[Tensor, "k m *c"],
                          y: Tensor, alpha: Float[Tensor, " k"], form: KKTForm = "binary",
                          targets: Mapping[int, Tensor] | None = None) -> Float[Tensor, " k"]:
    """Per-configuration ``sum_layers ||theta - (1/m) grad_theta sum_j w_j(x_j, lam_j)||^2``.

    ``weights`` are the trained matrices ``[out, in]`` shared by all configurations, or ``[K, out, in]``, one
    network per configuration (e.g. the attacked network and its controls in one batch); ``x`` the K
    candidate sets, ``lam`` their multipliers, ``y`` the labels shared by the K sets, ``alpha`` the K
    ModifiedReLU sharpnesses. The result is differentiable with respect to ``x`` and ``lam`` (second order
    through the network); the weights are treated as constants.

    ``targets`` (layer index -> ``[out, in]`` or ``[K, out, in]``) replaces theta on the left-hand side and
    restricts the sum to those layers: ``sum_{l in targets} ||T_l - (1/m) grad_{theta_l} sum_j w_j||^2``, the
    gradients still taken at ``weights``. With ``T_l`` the change that fine-tuning made to layer ``l``,
    this is the condition that gradient descent from a pretrained point leaves behind (chapter 05).
    """
    k, m, _ = x.shape
    theta = [w.detach().to(x.dtype) for w in weights]
    # One leaf copy of theta per configuration: the gradient of the summed outputs with respect to the
    # copies is the K per-configuration sums, computed in one backward. expand() shares the storage.
    copies = [(t.unsqueeze(0).expand(k, *t.shape) if t.ndim == 2 else t.detach()).requires_grad_(True)
              for t in theta]
    out = surrogate_forward(copies, x, alpha)
    total = weighted_outputs(out, lam, y, form).sum() / m
    if targets is None:
        grads = torch.autograd.grad(total, copies, create_graph=True)
        return sum(((c.detach() - g) ** 2).sum((1, 2)) for c, g in zip(copies, grads))
    layers = sorted(targets)
    if not layers or layers[0] < 0 or layers[-1] >= len(copies):
        raise ValueError(f"targets has layers {layers}: expected indices of the network's {len(copies)} layers")
    grads = torch.autograd.grad(total, [copies[i] for i in layers], create_graph=True)
    return sum(((targets[i].to(x.dtype) - g) ** 2).sum((-2, -1)).expand(k) for i, g in zip(layers, grads))


def box_prior(x: Float[Tensor, "k m d"], low: float | Tensor = -1.0, high: float | Tensor = 1.0
              ) -> Float[Tensor, " k"]:
    """``sum (x - high)_+^2 + (low - x)_+^2`` per configuration: candidates stay in the pixel range."""
    return ((x - high).relu() ** 2 + (low - x).relu() ** 2).sum((1, 2))


def lambda_prior(lam: Float[Tensor, "k m *c"], lambda_min: Float[Tensor, " k"], weight: float = 5.0,
                 y: Tensor | None = None) -> Float[Tensor, " k"]:
    """``weight * sum (lambda_min - lam)_+^2`` per configuration: keeps every candidate on the margin.

    For per-class multipliers ``[K, m, C]`` (form ``multiclass_all``) the hinge applies to each candidate's
    total over its competing classes (``y`` gives the class to leave out), and each multiplier is kept
    non-negative: a candidate must be on the margin of *some* competitor, not of all of them.
    """
    floor = lambda_min.reshape(-1, *[1] * (lam.ndim - 1)).to(lam.dtype)
    if lam.ndim == 2:
        return weight * (floor - lam).relu().pow(2).sum(1)
    if y is None:
        raise ValueError("y is needed to leave out each candidate's own class from its multipliers")
    competitors = torch.ones_like(lam, dtype=torch.bool).scatter(-1, y.reshape(1, -1, 1).expand(lam.shape[0], -1, 1),
                                                                  False)
    total = (lam * competitors).sum(-1)
    return weight * ((floor[..., 0] - total).relu().pow(2).sum(1) + ((-lam).relu() * competitors).pow(2).sum((1, 2)))


def reference_kkt_residuals(weights: Sequence[Tensor], x: Float[Tensor, "m d"], lam: Float[Tensor, "m *c"],
                            y: Tensor, alpha: float, form: KKTForm = "binary") -> list[Tensor]:
    """``theta - (1/m) sum_j grad_theta w_j``, one candidate at a time (the per-candidate loop).

    The slow reference the tests and the benchmark compare :func:`kkt_stationarity_loss` against;
    differentiable with respect to ``x`` and ``lam`` as well.
    """
    m = x.shape[0]
    theta = [w.detach().to(x.dtype).requires_grad_(True) for w in weights]
    a = torch.tensor([float(alpha)], dtype=x.dtype, device=x.device)
    acc = [torch.zeros_like(t) for t in theta]
    for j in range(m):
        out = surrogate_forward(theta, x[j].reshape(1, 1, -1), a)
        term = weighted_outputs(out, lam[j].reshape(1, 1, *lam.shape[1:]), y[j:j + 1], form).sum()
        grads = torch.autograd.grad(term, theta, create_graph=True)
        acc = [s + g for s, g in zip(acc, grads)]
    return [t.detach() - s / m for t, s in zip(theta, acc)]


def candidate_labels(n_candidates: int, n_classes: int = 2, signed: bool = False) -> Int[Tensor, " m"]:
    """Labels of the candidates, an equal share per class in blocks (the first blocks take any remainder):
    class indices ``0..n_classes-1``, or with ``signed`` (a one-output binary network) ``-1`` then ``+1``."""
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes}: expected at least 2 classes")
    if signed and n_classes != 2:
        raise ValueError(f"signed=True labels a binary task: expected n_classes=2, got {n_classes}")
    if n_candidates < n_classes:
        raise ValueError(f"n_candidates={n_candidates}: expected at least one candidate per class ({n_classes})")
    per = [n_candidates // n_classes + (1 if i < n_candidates % n_classes else 0) for i in range(n_classes)]
    classes = torch.repeat_interleave(torch.arange(n_classes), torch.tensor(per))
    return torch.where(classes == 0, -1, 1) if signed else classes


def constraint_gradients(weights: Sequence[Tensor], x: Float[Tensor, "n d"], y: Tensor, form: KKTForm,
                         alpha: float | None = None) -> Float[Tensor, "r p"]:
    """Rows ``grad_theta`` of every margin constraint of the max-margin problem behind ``form``, flattened
    over the layers in order: ``y_i Phi(x_i)`` (binary), ``Phi_{y_i} - max_{k != y_i} Phi_k`` (multiclass),
    ``Phi_{y_i} - Phi_k`` for every ``k != y_i`` (multiclass_all). ReLU derivatives are exact, or
    ``sigmoid(alpha z)`` when ``alpha`` is given. Formed with ``torch.func`` (vmap of grad)."""
    if form not in ("binary", "multiclass", "multiclass_all"):
        raise ValueError(f"form={form!r}: expected 'binary', 'multiclass' or 'multiclass_all'")
    theta = [w.detach() for w in weights]
    d_out = theta[-1].shape[0]
    x, y = x.to(theta[0].device, theta[0].dtype), y.to(theta[0].device)

    def net(params, xi):
        h = xi
        for w in params[:-1]:
            z = w @ h
            h = torch.relu(z) if alpha is None else modified_relu(z, alpha)
        return params[-1] @ h

    def margin(params, xi, yi, k):
        out = net(params, xi)
        if form == "binary":
            return yi.to(out.dtype) * out[0]
        classes = torch.arange(d_out, device=out.device)
        return (out * ((classes == yi).to(out.dtype) - (classes == k).to(out.dtype))).sum()

    grad_fn = torch.func.vmap(torch.func.grad(margin), in_dims=(None, 0, 0, 0))
    if form == "binary":
        pairs = [(torch.arange(len(x)), torch.zeros(len(x), dtype=torch.long))]
    elif form == "multiclass":
        with torch.no_grad():
            out = torch.stack([net(theta, xi) for xi in x])
        rival = out.scatter(1, y.reshape(-1, 1), float("-inf")).argmax(1)
        pairs = [(torch.arange(len(x)), rival)]
    else:
        pairs = []
        for k in range(d_out):
            rows = torch.nonzero(y != k)[:, 0]
            pairs.append((rows, torch.full_like(rows, k)))
    blocks = []
    for rows, rivals in pairs:
        grads = grad_fn(theta, x[rows], y[rows], rivals)
        blocks.append(torch.cat([g.reshape(len(rows), -1) for g in grads], dim=1))
    return torch.cat(blocks)


def fit_kkt_multipliers(weights: Sequence[Tensor], x: Float[Tensor, "n d"], y: Tensor, form: KKTForm,
                        alpha: float | None = None) -> tuple[Float[Tensor, " r"], float]:
    """``lam = argmin_{lam >= 0} ||theta - sum_r lam_r grad c_r||`` over the constraints ``c_r`` of
    :func:`constraint_gradients` (one per example, or per example and competing class for
    ``multiclass_all``, in that function's order), and the relative residual at ``lam`` (float64): how
    exactly the weights satisfy the stationarity condition that the attack inverts, on a given set of
    inputs (the training set, or a held-out control). Solved in the Gram form with chapter 00's solver."""
    from imprint.reconstruction.implicit_bias import nnls_gram

    theta = torch.cat([w.detach().double().reshape(-1) for w in weights])
    rows = constraint_gradients([w.double() for w in weights], x, y, form, alpha)
    lam = torch.as_tensor(nnls_gram(rows @ rows.T, rows @ theta), dtype=torch.float64, device=theta.device)
    return lam.cpu(), float((theta - rows.T @ lam).norm() / theta.norm())


def kkt_residual(weights: Sequence[Tensor], x: Float[Tensor, "n d"], y: Tensor, form: KKTForm,
                 alpha: float | None = None) -> float:
    """The relative residual of :func:`fit_kkt_multipliers`."""
    return fit_kkt_multipliers(weights, x, y, form, alpha)[1]
