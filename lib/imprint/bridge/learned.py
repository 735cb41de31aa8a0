"""A learned per-layer decoder from a LoRA update to the full-weight gradient (chapter 06).

The decoder of one layer maps the flattened low-rank update ``x`` (the ``out * r`` numbers of ``Delta B``,
optionally with ``Delta A``, or a flattened ``Delta W``) to the flattened gradient ``[out, in]``. It is
positively homogeneous of degree one, as the true map is (``Delta B = -lr s G A^T`` is linear in ``G``):

    g_hat(x) = ||x|| * c * (L u + MLP(u)),   u = x / ||x||,

a linear path ``L`` (no bias) plus an MLP, both on the unit direction ``u``, and ``c`` a scale fitted on
the training pairs (1 under the cosine loss, which ignores it). Training (:func:`fit_decoder`) is AdamW
on minibatches of a seeded train / validation split, the loss ``1 - cos`` (or a normalised MSE), with
early stopping on the mean validation cosine (the best parameters are kept); every epoch can be
checkpointed with :class:`~imprint.runtime.checkpoint.Checkpointer` and a restarted fit continues from the
last valid one, with the same result as an uninterrupted fit (shuffles are drawn per epoch from
``(seed, epoch)``). :func:`evaluate_decoder` scores it per pair against the closed-form baselines of
:mod:`imprint.bridge.decoders` on the same held-out pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from jaxtyping import Float
from torch import Tensor, nn

from imprint.bridge.decoders import decoded_cosine, fit_ridge_lift, min_norm_lift
from imprint.runtime.checkpoint import Checkpointer
from imprint.runtime.checks import require_choice, require_float, require_int, require_positive

LOSSES = ("cosine", "mse")
FEATURES = ("delta_b", "delta_b_a", "delta_w")


def pair_features(pairs, name: str, kind: str = "delta_b") -> Float[Tensor, "n n_features"]:
    """Flattened decoder inputs of layer ``name`` from a :class:`~imprint.bridge.pairs.ProxyPairs`:
    ``Delta B`` (``out * r``), ``Delta B`` and ``Delta A`` concatenated, or ``Delta W`` (``out * in``)."""
    require_choice("kind", kind, FEATURES)
    if name not in pairs.delta_b:
        raise ValueError(f"name={name!r}: expected one of the layers of the pairs {list(pairs.delta_b)}")
    if kind == "delta_b":
        return pairs.delta_b[name].flatten(1)
    if kind == "delta_b_a":
        return torch.cat([pairs.delta_b[name].flatten(1), pairs.delta_a[name].flatten(1)], dim=1)
    return pairs.delta_w(name).flatten(1)


@dataclass(frozen=True)
class DecoderOptions:
    """MLP widths ``hidden`` (empty: the linear path alone), loss, AdamW, split and early stopping."""

    hidden: tuple[int, ...] = (256,)
    loss: str = "cosine"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 200
    batch_size: int = 64
    val_fraction: float = 0.2
    patience: int = 20
    min_delta: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for h in self.hidden:
            require_int("hidden", h, minimum=1)
        require_choice("loss", self.loss, LOSSES)
        require_positive("lr", self.lr)
        require_float("weight_decay", self.weight_decay, minimum=0.0)
        require_int("epochs", self.epochs, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_float("val_fraction", self.val_fraction, minimum=0.0, strict_minimum=True)
        if self.val_fraction >= 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r}: expected a fraction in (0, 1)")
        require_int("patience", self.patience, minimum=1)
        require_float("min_delta", self.min_delta, minimum=0.0)
        require_int("seed", self.seed, minimum=0)


class LearnedDecoder(nn.Module):
    """``g_hat(x) = ||x|| c (L u + MLP(u))`` with ``u = x / ||x||``, output reshaped to ``target_shape``."""

    def __init__(self, n_features: int, target_shape: tuple[int, int], hidden: tuple[int, ...] = (256,)):
        super().__init__()
        self.n_features = require_int("n_features", n_features, minimum=1)
        if len(target_shape) != 2:
            raise ValueError(f"target_shape={target_shape!r}: expected (out, in)")
        self.target_shape = (int(target_shape[0]), int(target_shape[1]))
        n_out = self.target_shape[0] * self.target_shape[1]
        self.linear = nn.Linear(n_features, n_out, bias=False)
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, n_out)) if hidden else None
        self.register_buffer("scale", torch.ones(()))

    def forward(self, features: Float[Tensor, "*batch n_features"]) -> Float[Tensor, "*batch out d_in"]:
        if features.shape[-1] != self.n_features:
            raise ValueError(f"features has shape {tuple(features.shape)}: expected [..., {self.n_features}]")
        x = features.to(self.linear.weight.dtype)
        norm = x.norm(dim=-1, keepdim=True)
        u = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
        y = self.linear(u)
        if self.mlp is not None:
            y = y + self.mlp(u)
        return (norm * self.scale * y).unflatten(-1, self.target_shape)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


@dataclass
class FitResult:
    """The decoder with its best-validation parameters, and the fit's record."""

    decoder: LearnedDecoder
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_cosine
    best_epoch: int = 0
    best_val_cosine: float = float("-inf")
    stopped_early: bool = False
    train_rows: Tensor | None = None
    val_rows: Tensor | None = None


def _split(n: int, options: DecoderOptions) -> tuple[Tensor, Tensor]:
    n_val = int(round(n * options.val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"val_fraction={options.val_fraction}: with {n} pairs it leaves {n - n_val} for training "
                         f"and {n_val} for validation, expected at least one each")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(options.seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _flat_state(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v.detach().clone() for k, v in state.items()}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            out[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def fit_decoder(features: Float[Tensor, "n n_features"], targets: Float[Tensor, "n_t out d_in"],
                options: DecoderOptions = DecoderOptions(), checkpoint_dir: str | Path | None = None,
                callback: Callable[[int, dict], None] | None = None) -> FitResult:
    """Train a :class:`LearnedDecoder` from ``features`` to ``targets`` (one row per proxy pair). The pairs
    are split by ``options.seed`` into train and validation; training stops after ``patience`` epochs
    without a gain of ``min_delta`` in the mean validation cosine, and the best parameters are restored.
    With ``checkpoint_dir``, every epoch is checkpointed and a later call with the same arguments resumes
    (a folder of another configuration is refused). ``callback(epoch, record)`` runs after each epoch."""
    if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise ValueError(f"features has shape {tuple(features.shape)}: expected [n, n_features] with n >= 2")
    if targets.ndim != 3 or targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}: expected [{features.shape[0]}, out, in] "
                         "(one gradient per row of features)")
    if not (torch.isfinite(features).all() and torch.isfinite(targets).all()):
        raise ValueError("features and targets: expected finite values")
    train_rows, val_rows = _split(features.shape[0], options)
    device = features.device
    x = features.float()
    y = targets.to(device=device, dtype=torch.float32)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(options.seed)
        decoder = LearnedDecoder(x.shape[1], tuple(y.shape[1:]), options.hidden).to(device)
    target_rms = y[train_rows].flatten(1).norm(dim=-1).pow(2).mean().sqrt().clamp_min(1e-30)
    if options.loss == "mse":
        ratio = y[train_rows].flatten(1).norm(dim=-1) / x[train_rows].norm(dim=-1).clamp_min(1e-30)
        decoder.scale.fill_(float(ratio.mean()))
    opt = torch.optim.AdamW(decoder.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    result = FitResult(decoder, train_rows=train_rows, val_rows=val_rows)
    best_state = _flat_state("", decoder.state_dict())
    bad_epochs, start = 0, 0
    config = {"options": asdict(options), "n": int(x.shape[0]), "n_features": int(x.shape[1]),
              "target_shape": list(y.shape[1:])}
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    config["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config["options"].items()}
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        last = ckpt.latest(device=device)
        if last is not None:
            if last.meta.get("config") != config:
                raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} holds a fit of another configuration: "
                                 "expected an empty folder or one of the same options and data shapes")
            decoder.load_state_dict({k[6:]: v for k, v in last.tensors.items() if k.startswith("model.")})
            best_state = {k[5:]: v for k, v in last.tensors.items() if k.startswith("best.")}
            _load_optimizer(opt, last.tensors)
            result.history = last.meta["history"]
            result.best_epoch, result.best_val_cosine = last.meta["best_epoch"], last.meta["best_val_cosine"]
            bad_epochs, start = last.meta["bad_epochs"], last.unit
            result.stopped_early = last.meta["stopped_early"]
    for epoch in range(start, options.epochs):
        if result.stopped_early:
            break
        decoder.train()
        gen = torch.Generator().manual_seed(options.seed * 1_000_003 + epoch + 1)
        order = train_rows[torch.randperm(train_rows.numel(), generator=gen)].to(device)
        total = 0.0
        for i in range(0, order.numel(), options.batch_size):
            rows = order[i:i + options.batch_size]
            pred = decoder(x[rows])
            if options.loss == "cosine":
                loss = 1 - _cos(pred, y[rows]).mean()
            else:
                loss = ((pred - y[rows]) / target_rms).flatten(1).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * rows.numel()
        decoder.eval()
        with torch.no_grad():
            val = float(_cos(decoder(x[val_rows.to(device)]), y[val_rows.to(device)]).mean())
        record = {"epoch": epoch + 1, "train_loss": total / train_rows.numel(), "val_cosine": val}
        result.history.append(record)
        if val > result.best_val_cosine + options.min_delta:
            result.best_val_cosine, result.best_epoch, bad_epochs = val, epoch + 1, 0
            best_state = _flat_state("", decoder.state_dict())
        else:
            bad_epochs += 1
        result.stopped_early = bad_epochs >= options.patience
        if ckpt is not None:
            tensors = {**_flat_state("model.", decoder.state_dict()), **_flat_state("best.", best_state),
                       **_optimizer_tensors(opt)}
            ckpt.save(epoch + 1, tensors, {"config": config, "history": result.history, "bad_epochs": bad_epochs,
                                           "best_epoch": result.best_epoch,
                                           "best_val_cosine": result.best_val_cosine,
                                           "stopped_early": result.stopped_early})
        if callback is not None:
            callback(epoch + 1, record)
    decoder.load_state_dict(best_state)
    decoder.eval()
    return result


@dataclass(frozen=True)
class DecoderEvaluation:
    """Per held-out pair, the cosine of each decoder's gradient with the true one (``name -> [n]``)."""

    cosine: dict[str, Tensor]

    def mean(self) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in self.cosine.items()}


@torch.no_grad()
def evaluate_decoder(decoder: LearnedDecoder, features: Float[Tensor, "n n_features"],
                     targets: Float[Tensor, "n_t out d_in"], *, delta_w: Float[Tensor, "n_w out_w d_w"] | None = None,
                     lora_a: Float[Tensor, "r d_a"] | None = None, lr: float | None = None, scaling: float = 1.0,
                     ridge_features: Float[Tensor, "m n_rf"] | None = None,
                     ridge_targets: Float[Tensor, "m_t out_r d_r"] | None = None, ridge_alpha: float = 1e-6
                     ) -> DecoderEvaluation:
    """Cosines of decoded and true gradients on held-out pairs: ``"learned"`` always, ``"min_norm"`` when
    ``delta_w``, ``lora_a`` and ``lr`` are given (:func:`~imprint.bridge.decoders.min_norm_lift`), ``"ridge"``
    when training pairs ``ridge_features`` / ``ridge_targets`` are given (the ridge decoder fitted on them
    with ``ridge_alpha``, relative to the mean squared feature, then applied to ``features``)."""
    if features.ndim != 2 or features.shape[1] != decoder.n_features:
        raise ValueError(f"features has shape {tuple(features.shape)}: expected [n, {decoder.n_features}]")
    if targets.shape != (features.shape[0], *decoder.target_shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)}: expected "
                         f"[{features.shape[0]}, {decoder.target_shape[0]}, {decoder.target_shape[1]}]")
    y = targets.float()
    out = {"learned": decoded_cosine(decoder(features.float()).to(y.device), y)}
    if delta_w is not None or lora_a is not None or lr is not None:
        if delta_w is None or lora_a is None or lr is None:
            raise ValueError("delta_w, lora_a and lr: expected all three for the min-norm baseline, or none")
        if delta_w.shape != targets.shape:
            raise ValueError(f"delta_w has shape {tuple(delta_w.shape)}: expected {tuple(targets.shape)}")
        lifted = min_norm_lift(delta_w.double(), lora_a.double(), lr=lr, scaling=scaling)
        out["min_norm"] = decoded_cosine(lifted.float(), y)
    if ridge_features is not None or ridge_targets is not None:
        if ridge_features is None or ridge_targets is None:
            raise ValueError("ridge_features and ridge_targets: expected both for the ridge baseline, or neither")
        if ridge_features.ndim != 2 or ridge_features.shape[1] != features.shape[1]:
            raise ValueError(f"ridge_features has shape {tuple(ridge_features.shape)}: expected "
                             f"[m, {features.shape[1]}]")
        if ridge_targets.shape != (ridge_features.shape[0], *targets.shape[1:]):
            raise ValueError(f"ridge_targets has shape {tuple(ridge_targets.shape)}: expected "
                             f"[{ridge_features.shape[0]}, {targets.shape[1]}, {targets.shape[2]}]")
        xf = ridge_features.double()
        alpha = require_positive("ridge_alpha", ridge_alpha) * float(xf.pow(2).sum(1).mean())
        ridge = fit_ridge_lift(xf, ridge_targets.double().flatten(1), alpha=alpha)
        out["ridge"] = decoded_cosine(ridge(features.double()).unflatten(-1, tuple(targets.shape[1:])).float(), y)
    return DecoderEvaluation(out)
