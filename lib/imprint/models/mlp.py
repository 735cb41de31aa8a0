"""Bias-free (homogeneous) ReLU MLPs and a batched full-batch gradient-descent trainer.

Used by the implicit-bias chapter (00) and the reconstruction chapters (01, 02). Without biases a ReLU
MLP of depth L is positively homogeneous of degree L in its parameters, which is what the max-margin
analysis of Lyu & Li (2019) and the reconstruction attack of Haim et al. (2022) need.

The trainer runs S independent networks in one set of batched matrix products, with the backward pass
written out by hand (three lines per layer) so that the whole step is a fixed sequence of in-place
kernels: on a GPU, ``graph_steps`` steps are captured once as a CUDA graph and replayed, with no host
synchronisation between logs. Plain autograd is the reference in the tests.

``schedule="normalised"`` is Lyu & Li (2020)'s loss-based learning rate (their Appendix K.1; Nacson et al.
2019 for linear models): once a network's mean logistic loss is below ``ln 2 / n`` (the summed loss below
``ln 2``, their separability assumption (A4), which puts every margin above zero with room to spare), its
step is ``alpha / L(theta)`` along ``grad L``, i.e. ``alpha`` along ``grad L / L``, which is computed in
log space (a softmax-like weighting of the margins' gradients) and stays finite after ``L`` itself underflows. ``alpha`` is per
network; a step that does not lower the loss is undone and ``alpha`` divided by ``lr_shrink``, an accepted
one multiplies it by ``lr_grow``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from imprint.runtime.checks import require_choice, require_float, require_int
from imprint.runtime.io import atomic_save_tensors, load_tensor_metadata, load_tensors


class MLP(nn.Module):
    """``d_in -> widths... -> d_out`` with bias-free linear layers and ``activation`` between them."""

    def __init__(self, d_in: int, widths: Sequence[int], d_out: int = 1, activation: nn.Module | None = None):
        super().__init__()
        dims = [d_in, *widths, d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = activation if activation is not None else nn.ReLU()
        self.d_in, self.widths, self.d_out = d_in, tuple(widths), d_out

    def forward(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)

    @property
    def depth(self) -> int:
        return len(self.layers)


def save_mlp(path: str | Path, model: MLP, metadata: dict | None = None) -> Path:
    """Weights as safetensors (``layers.i.weight``), with the architecture in the metadata."""
    arch = {"d_in": model.d_in, "widths": list(model.widths), "d_out": model.d_out}
    return atomic_save_tensors(path, model.state_dict(), {"architecture": arch, **(metadata or {})})


def load_mlp(path: str | Path, d_in: int, widths: Sequence[int], d_out: int = 1,
             activation: nn.Module | None = None) -> MLP:
    """Load weights saved by :func:`save_mlp` into the declared architecture, checking every shape."""
    tensors = load_tensors(path)
    model = MLP(d_in, widths, d_out, activation)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        declared = f"d_in={d_in}, widths={list(widths)}, d_out={d_out}"
        stored = load_tensor_metadata(path).get("architecture", found)
        raise ValueError(f"weights file {str(path)!r} does not match the declared architecture "
                         f"({declared}): it holds {stored}")
    model.load_state_dict(tensors)
    return model


@dataclass(frozen=True)
class TrainConfig:
    """Full-batch gradient descent on a bias-free ReLU MLP.

    ``first_layer_std`` scales the first layer's N(0, 1) initialisation (small initialisation puts the
    network in the rich regime whose limit is the max-margin KKT point); later layers use PyTorch's
    default ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), unless ``hidden_std`` sets
    their N(0, 1) scale too.
    """

    widths: tuple[int, ...] = (1000, 1000)
    lr: float = 0.01
    steps: int = 10_000
    first_layer_std: float = 1e-4
    hidden_std: float | None = None
    loss: str = "logistic"  # "logistic" (targets +-1) or "cross_entropy" (class indices)
    weight_decay: float = 0.0
    dtype: str = "float32"  # "float32" or "float64"
    log_every: int = 100
    checkpoint_every: int = 0  # steps; 0 = only at the end
    graph_steps: int = 100  # steps per captured CUDA graph (GPU only); must divide log_every
    # "constant": theta -= lr * grad L.  "normalised": the same until the network's mean loss is below
    # ln 2 / n (Lyu & Li's separability assumption; every margin > 0 by chance is not enough: a network
    # at its small initialisation's saddle can have that with margins of 1e-7, where no step changes the
    # float32 loss, every proposal is undone and alpha shrinks to zero), then theta -= alpha * grad L / L
    # with alpha adapted per network: a step that does not lower the loss is undone and alpha /= lr_shrink,
    # an accepted one does alpha *= lr_grow (Lyu & Li 2020, Appendix K.1, whose r_u = 2^(1/5) and
    # r_d = 2^(1/10) are the defaults). Every attempted step, undone or not, counts as one of ``steps``.
    # Logistic loss only, no weight decay.
    schedule: str = "constant"
    normalised_lr: float | None = None  # alpha at the switch; None: lr * L there (the same step as before)
    lr_grow: float = 2 ** 0.2
    lr_shrink: float = 2 ** 0.1

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths={list(self.widths)}: expected one or more positive layer widths")
        require_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        require_int("steps", self.steps, minimum=0)
        require_float("first_layer_std", self.first_layer_std, minimum=0.0, strict_minimum=True)
        if self.hidden_std is not None:
            require_float("hidden_std", self.hidden_std, minimum=0.0, strict_minimum=True)
        require_choice("loss", self.loss, ["logistic", "cross_entropy"])
        require_float("weight_decay", self.weight_decay, minimum=0.0)
        require_choice("dtype", self.dtype, ["float32", "float64"])
        require_int("log_every", self.log_every, minimum=1)
        require_int("checkpoint_every", self.checkpoint_every, minimum=0)
        require_int("graph_steps", self.graph_steps, minimum=1)
        if self.log_every % self.graph_steps and self.log_every > self.graph_steps:
            raise ValueError(f"graph_steps={self.graph_steps} must divide log_every={self.log_every}")
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"log_every={self.log_every}")
        require_choice("schedule", self.schedule, ["constant", "normalised"])
        if self.normalised_lr is not None:
            require_float("normalised_lr", self.normalised_lr, minimum=0.0, strict_minimum=True)
        require_float("lr_grow", self.lr_grow, minimum=1.0)
        require_float("lr_shrink", self.lr_shrink, minimum=1.0, strict_minimum=True)
        if self.schedule == "constant":
            for name in _SCHEDULE_OPTIONS:
                if getattr(self, name) != getattr(TrainConfig, name):
                    raise ValueError(f"{name}={getattr(self, name)!r} applies only to schedule='normalised'")
                # Out of __dict__ (the class attribute answers instead): the configuration of a
                # constant-step run, hence its checkpoint key and keyed_dir digest, is what it was before
                # the schedule existed, so earlier runs still resume.
                object.__delattr__(self, name)
        else:
            if self.loss != "logistic":
                raise ValueError(f"schedule='normalised' needs loss='logistic', not {self.loss!r}")
            if self.weight_decay:
                raise ValueError(f"schedule='normalised' needs weight_decay=0, not {self.weight_decay}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


_SCHEDULE_OPTIONS = ("schedule", "normalised_lr", "lr_grow", "lr_shrink")


def init_weights(d_in: int, d_out: int, config: TrainConfig, seeds: Sequence[int],
                 dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Per-layer stacked weights ``[S, out, in]``, one independent initialisation per seed."""
    dims = [d_in, *config.widths, d_out]
    layers: list[list[Tensor]] = [[] for _ in dims[:-1]]
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i == 0 or config.hidden_std is not None:
                std = config.first_layer_std if i == 0 else config.hidden_std
                w = torch.randn(b, a, generator=gen, dtype=torch.float64) * std
            else:
                bound = 1.0 / math.sqrt(a)
                w = (torch.rand(b, a, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            layers[i].append(w)
    return [torch.stack(ws).to(dtype) for ws in layers]


def batched_forward(weights: Sequence[Tensor], x: Float[Tensor, "s n d"]) -> tuple[Tensor, list[Tensor]]:
    """Outputs ``[S, n, d_out]`` and the pre-activations of every hidden layer."""
    pre = []
    h = x
    for w in weights[:-1]:
        z = torch.bmm(h, w.transpose(1, 2))
        pre.append(z)
        h = torch.relu(z)
    return torch.bmm(h, weights[-1].transpose(1, 2)), pre


def output_grad(out: Tensor, targets: Tensor, loss: str) -> Tensor:
    """d(mean loss)/d(outputs): logistic on {+1, -1} targets, or cross-entropy on class indices."""
    n = out.shape[1]
    if loss == "logistic":
        f = out[..., 0]
        return (-targets * torch.sigmoid(-targets * f) / n).unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(targets, out.shape[-1]).to(out.dtype)
    return (torch.softmax(out, dim=-1) - onehot) / n


def batched_loss(out: Tensor, targets: Tensor, loss: str) -> Float[Tensor, " s"]:
    if loss == "logistic":
        return torch.nn.functional.softplus(-targets * out[..., 0]).mean(1)
    return -torch.log_softmax(out, -1).gather(-1, targets.unsqueeze(-1))[..., 0].mean(1)


def margins(out: Tensor, targets: Tensor, loss: str) -> Float[Tensor, "s n"]:
    """y_i f(x_i) for binary outputs; f_{y_i}(x_i) - max_{j != y_i} f_j(x_i) for multiclass."""
    if loss == "logistic":
        return targets * out[..., 0]
    true = out.gather(-1, targets.unsqueeze(-1))[..., 0]
    others = out.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    return true - others.max(-1).values


def batched_grads(weights: Sequence[Tensor], x: Tensor, targets: Tensor, loss: str,
                  weight_decay: float = 0.0) -> list[Tensor]:
    """Gradients of the mean loss (+ weight_decay/2 ||W||^2) with respect to every stacked weight."""
    out, pre = batched_forward(weights, x)
    g = output_grad(out, targets, loss)  # [S, n, d_out]
    return _backward(weights, x, pre, g, weight_decay)


def _backward(weights: Sequence[Tensor], x: Tensor, pre: Sequence[Tensor], g: Tensor,
              weight_decay: float = 0.0) -> list[Tensor]:
    """Weight gradients from d(objective)/d(outputs) ``g``, given the forward pass's pre-activations."""
    acts = [x] + [torch.relu(z) for z in pre]
    grads: list[Tensor] = [torch.empty(0)] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        grads[i] = torch.bmm(g.transpose(1, 2), acts[i])
        if weight_decay:
            grads[i] = grads[i] + weight_decay * weights[i]
        if i:
            g = torch.bmm(g, weights[i]) * (pre[i - 1] > 0)
    return grads


def log_softplus_neg(q: Tensor) -> Tensor:
    """log(log(1 + exp(-q))), elementwise and finite for every finite q (no underflow for large q).

    For q > 0 it is -q + log(log1p(u) / u) with u = exp(-q) in (0, 1), and log1p(u) / u -> 1 as u -> 0. Below
    the smallest normal number (q past 87 in float32, 708 in float64) the ratio is 1 to working precision
    and is taken as such: torch's log1p returns 0 for the smallest subnormals, which made the term -inf and
    dropped the hardest example from the loss (and inflated every normalised gradient by e^(its margin's
    gap to the next one)). ``u`` is replaced before the division, so autograd sees no NaN either.
    """
    u = torch.exp(-q.clamp(min=0))
    normal = u >= torch.finfo(u.dtype).tiny
    u_safe = torch.where(normal, u, torch.ones_like(u))
    ratio = torch.where(normal, torch.log1p(u_safe) / u_safe, torch.ones_like(u))
    small = torch.log(torch.nn.functional.softplus(-q.clamp(max=0)))
    return torch.where(q > 0, torch.log(ratio) - q, small)


def log_logistic_loss(out: Tensor, targets: Tensor) -> Float[Tensor, " s"]:
    """log of the mean logistic loss, log((1/n) sum_i log(1 + exp(-y_i f_i))), without underflow."""
    q = targets * out[..., 0]
    return torch.logsumexp(log_softplus_neg(q), 1) - math.log(q.shape[1])


def normalised_output_grad(out: Tensor, targets: Tensor) -> tuple[Tensor, Float[Tensor, " s"]]:
    """(dL/d outputs) / L for the mean logistic loss L, and log L, both computed in log space.

    dL/df_i = -y_i sigmoid(-q_i) / n with q_i = y_i f_i, so (dL/df_i) / L = -y_i exp(log sigmoid(-q_i) - log
    sum_j log(1 + exp(-q_j))): finite and exact when L underflows (for large margins it tends to the
    softmax of -q, the exponential loss's normalised gradient).
    """
    q = targets * out[..., 0]
    log_sum = torch.logsumexp(log_softplus_neg(q), 1, keepdim=True)
    g = -targets * torch.exp(torch.nn.functional.logsigmoid(-q) - log_sum)
    return g.unsqueeze(-1), log_sum[:, 0] - math.log(q.shape[1])


def normalised_grads(weights: Sequence[Tensor], x: Tensor, targets: Tensor) -> tuple[list[Tensor], Tensor]:
    """grad L / L with respect to every stacked weight (logistic loss), and log L per network."""
    out, pre = batched_forward(weights, x)
    g, log_loss = normalised_output_grad(out, targets)
    return _backward(weights, x, pre, g), log_loss


@dataclass
class TrainResult:
    """Trained stacked weights and the logged history (``step``, ``loss``, ``normalized_margin`` ...)."""

    weights: list[Tensor]
    history: dict[str, Tensor]
    config: TrainConfig
    d_in: int
    d_out: int
    seeds: list[int] = field(default_factory=list)
    step_scale: Tensor | None = None  # schedule="normalised": each network's final alpha (0: never switched)

    @property
    def n_models(self) -> int:
        return self.weights[0].shape[0]

    def model(self, i: int, activation: nn.Module | None = None, dtype: torch.dtype | None = None) -> MLP:
        """Model ``i`` as an :class:`MLP` on the CPU (in the training dtype unless ``dtype`` is given)."""
        net = MLP(self.d_in, self.config.widths, self.d_out, activation)
        with torch.no_grad():
            for layer, w in zip(net.layers, self.weights):
                layer.weight = nn.Parameter(w[i].detach().cpu().to(dtype or w.dtype).clone())
        return net


def _log_stats(weights: Sequence[Tensor], x: Tensor, targets: Tensor, loss: str) -> Tensor:
    """[S, 5]: loss, min margin, normalised margin min_i q_i / ||theta||^L, train error, ||theta||."""
    out, _ = batched_forward(weights, x)
    q = margins(out, targets, loss)
    norm = torch.sqrt(sum((w**2).sum((1, 2)) for w in weights))
    qmin = q.min(1).values
    return torch.stack([batched_loss(out, targets, loss), qmin, qmin / norm ** len(weights),
                        (q <= 0).to(out.dtype).mean(1), norm], dim=1)


_STAT_NAMES = ("loss", "min_margin", "normalized_margin", "train_error", "param_norm")
_NORMALISED_STAT_NAMES = ("log_loss", "step_scale")  # appended under schedule="normalised"


def _stats(weights: Sequence[Tensor], x: Tensor, targets: Tensor, config: TrainConfig,
           step_scale: Tensor | None) -> Tensor:
    stats = _log_stats(weights, x, targets, config.loss)
    if step_scale is None:
        return stats
    log_loss = log_logistic_loss(batched_forward(weights, x)[0], targets)
    return torch.cat([stats, log_loss[:, None], step_scale[:, None].to(stats.dtype)], 1)


def _validate_data(x: Tensor, targets: Tensor, loss: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [n_models, n_train, d_in]")
    if targets.shape != x.shape[:2]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}: expected {tuple(x.shape[:2])} "
                         "(one target per training example and model)")
    if loss == "logistic" and not bool(((targets == 1) | (targets == -1)).all()):
        raise ValueError("targets: the logistic loss expects labels in {+1, -1}")
    if loss == "cross_entropy" and (targets.is_floating_point() or int(targets.min()) < 0):
        raise ValueError("targets: the cross-entropy loss expects non-negative integer class indices")


def train_mlps(x: Float[Tensor, "s n d"], targets: Tensor, config: TrainConfig,
               device: torch.device | str = "cpu", seeds: Sequence[int] | None = None,
               checkpoint_dir: str | Path | None = None, n_classes: int | None = None,
               progress: bool = True, initial_weights: Sequence[Tensor] | None = None) -> TrainResult:
    """Train ``S = x.shape[0]`` bias-free MLPs by full-batch GD, one per row of ``x`` / ``targets``.

    ``initial_weights`` (stacked ``[S, out, in]`` per layer) starts every network from given weights
    instead of :func:`init_weights` of its seed: fine-tuning a pretrained network (chapter 05).

    With ``checkpoint_dir`` the weights and history are saved every ``checkpoint_every`` steps, and a
    restarted call continues from the last valid checkpoint at or before ``config.steps``, producing the
    same weights (gradient descent is deterministic, so a later checkpoint is never needed).
    """
    from imprint.runtime.checkpoint import Checkpointer

    _validate_data(x, targets, config.loss)
    device = torch.device(device)
    n_models, _, d_in = x.shape
    d_out = 1 if config.loss == "logistic" else int(n_classes or int(targets.max()) + 1)
    seeds = list(range(n_models)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n_models:
        raise ValueError(f"seeds has {len(seeds)} entries: expected one per model ({n_models})")
    dtype = config.torch_dtype
    x = x.to(device, dtype)
    targets = targets.to(device, dtype if config.loss == "logistic" else torch.int64)

    run_key = _config_key(config, seeds, tuple(x.shape))
    if initial_weights is not None:
        expected = [(n_models, b, a) for a, b in zip([d_in, *config.widths], [*config.widths, d_out])]
        found = [tuple(w.shape) for w in initial_weights]
        if found != expected:
            raise ValueError(f"initial_weights has layer shapes {found}: expected {expected} (one stack of "
                             f"[out, in] per layer, one network per row of x)")
        from imprint.reconstruction.extraction import _weights_digest

        run_key["initial_weights"] = _weights_digest(initial_weights)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    state = ckpt.latest(max_unit=config.steps) if ckpt else None
    if state is not None and state.meta.get("config") != run_key:
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} holds a run with another configuration "
                         f"({state.meta.get('config')}); use a fresh folder")
    normalised = config.schedule == "normalised"
    step_scale = torch.zeros(n_models, device=device, dtype=dtype) if normalised else None
    if state is not None:
        weights = [state.tensors[f"w{i}"].to(device, dtype) for i in range(len(config.widths) + 1)]
        if normalised:
            step_scale.copy_(state.tensors["step_scale"].to(device, dtype))
        start = state.unit
        logged = [state.tensors["history"].to(device, dtype)] if "history" in state.tensors else []
        steps_logged = state.tensors["history_step"].tolist() if "history_step" in state.tensors else []
    else:
        weights = ([w.detach().to(device, dtype).clone() for w in initial_weights] if initial_weights is not None
                   else [w.to(device) for w in init_weights(d_in, d_out, config, seeds, dtype)])
        start, logged, steps_logged = 0, [], []
        logged.append(_stats(weights, x, targets, config, step_scale).unsqueeze(0))
        steps_logged.append(0)

    step_fn = _make_stepper(weights, x, targets, config, device, step_scale)
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="GD", unit="step")
    step = start
    while step < config.steps:
        chunk = min(config.log_every, config.steps - step)
        step_fn(chunk)
        step += chunk
        bar.update(chunk)
        logged.append(_stats(weights, x, targets, config, step_scale).unsqueeze(0))
        steps_logged.append(step)
        if ckpt and (step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            history = torch.cat(logged)
            tensors = {f"w{i}": w for i, w in enumerate(weights)}
            if normalised:
                tensors["step_scale"] = step_scale
            tensors.update(history=history, history_step=torch.tensor(steps_logged))
            ckpt.save(step, tensors, {"config": run_key})
            logged = [history]
    bar.close()
    history = torch.cat(logged).detach().cpu()  # one host synchronisation, at the end
    hist = {"step": torch.tensor(steps_logged)}
    names = _STAT_NAMES + (_NORMALISED_STAT_NAMES if normalised else ())
    hist.update({name: history[:, :, i] for i, name in enumerate(names)})
    return TrainResult([w.detach() for w in weights], hist, config, d_in, d_out, seeds,
                       step_scale.detach().cpu() if normalised else None)


def _config_key(config: TrainConfig, seeds: list[int], shape: tuple) -> dict:
    key = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()}
    for transient in ("steps", "checkpoint_every", "log_every", "graph_steps"):
        key.pop(transient)  # a resumed run may train longer or log differently
    return {**key, "seeds": seeds, "data_shape": list(shape)}


def _normalised_step(weights: list[Tensor], x: Tensor, targets: Tensor, config: TrainConfig,
                     step_scale: Tensor):
    """One in-place step of the normalised schedule, and the tensors it updates (for the graph warm-up).

    Per network: until its mean loss is below ln 2 / n, theta -= lr * grad L, always kept; from then on, the
    proposal theta - alpha * grad L / L is kept only if it lowers log L (alpha *= lr_grow), otherwise theta
    stays and alpha /= lr_shrink. The forward pass at the kept weights is cached for the next step, so a
    step costs one forward and one backward pass, as a constant step does. No host synchronisation.
    """
    out, pre = batched_forward(weights, x)
    cache = [out, *pre]
    tiny = torch.finfo(step_scale.dtype).tiny
    switch_below = math.log(math.log(2) / targets.shape[1])  # log of the mean loss at which alpha takes over

    def one_step():
        out, pre = cache[0], cache[1:]
        g_norm, log_loss = normalised_output_grad(out, targets)
        switched = log_loss < switch_below  # an accepted step lowers the loss: once true, it stays true
        first = config.lr * torch.exp(log_loss) if config.normalised_lr is None else \
            torch.full_like(log_loss, config.normalised_lr)
        step_scale.copy_(torch.where(switched & (step_scale == 0), first.clamp(min=tiny), step_scale))
        g = torch.where(switched[:, None, None], g_norm, output_grad(out, targets, "logistic"))
        rate = torch.where(switched, step_scale, torch.full_like(step_scale, config.lr))[:, None, None]
        proposal = [w - rate * d for w, d in zip(weights, _backward(weights, x, pre, g))]
        new_out, new_pre = batched_forward(proposal, x)
        keep = ~switched | (log_logistic_loss(new_out, targets) < log_loss)  # NaN: undone
        step_scale.copy_(torch.where(switched, torch.where(keep, step_scale * config.lr_grow,
                                                            step_scale / config.lr_shrink), step_scale))
        keep = keep[:, None, None]
        for w, p in zip(weights, proposal):
            w.copy_(torch.where(keep, p, w))
        for c, new in zip(cache, [new_out, *new_pre]):
            c.copy_(torch.where(keep, new, c))

    return one_step, [*weights, step_scale, *cache]


def _make_stepper(weights: list[Tensor], x: Tensor, targets: Tensor, config: TrainConfig, device: torch.device,
                  step_scale: Tensor | None = None):
    """A function ``advance(k)`` doing k in-place GD steps; CUDA-graph replays on a GPU."""

    def one_step():
        grads = batched_grads(weights, x, targets, config.loss, config.weight_decay)
        for w, g in zip(weights, grads):
            w.sub_(config.lr * g)

    state = weights
    if config.schedule == "normalised":
        one_step, state = _normalised_step(weights, x, targets, config, step_scale)

    if device.type != "cuda":
        def advance(k: int) -> None:
            for _ in range(k):
                one_step()
        return advance

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    snapshot = [w.clone() for w in state]
    with torch.cuda.stream(stream):  # warm-up allocations outside the capture, then undo them
        for _ in range(2):
            one_step()
    torch.cuda.current_stream().wait_stream(stream)
    for w, s in zip(state, snapshot):
        w.copy_(s)
    del snapshot
    graph = torch.cuda.CUDAGraph()
    per_graph = min(config.graph_steps, config.log_every)
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            one_step()

    def advance(k: int) -> None:
        full, rest = divmod(k, per_graph)
        for _ in range(full):
            graph.replay()
        for _ in range(rest):
            one_step()

    return advance
