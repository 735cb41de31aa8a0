"""The extraction loop of the KKT reconstruction attack, K hyperparameter configurations at a time.

Used by chapters 01 and 02. Given only the weights of a trained bias-free MLP, it optimises m candidate
inputs ``x`` (initialised ``N(0, 1) * init_scale``) and their multipliers ``lam`` (``U(0, 1)``, or
``N(0, 1)`` for the free-sign general form) so that they satisfy the network's KKT stationarity
condition (:mod:`imprint.reconstruction.kkt`) inside a pixel box, with ``lam >= lambda_min``. The
optimiser is SGD with momentum and separate learning rates for ``x`` and ``lam``, the procedure of
Haim et al. (2022). The attack needs a hyperparameter search (initial scale, learning rates,
``lambda_min``, the ModifiedReLU sharpness ``alpha``), so the K configurations of a search are one
optimisation: candidate tensors carry a leading configuration axis, the per-configuration losses are
summed (they share no variables, so each configuration's gradient is its own), and the momentum update
uses per-configuration learning rates. A configuration whose loss stops being finite is frozen and
flagged; the others carry on. The loop checkpoints its whole state and resumes to the same numbers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from imprint.reconstruction.kkt import (KKT_FORMS, KKTForm, box_prior, check_labels, check_weights,
                                        kkt_stationarity_loss, lambda_prior)
from imprint.runtime.checks import require_choice, require_float, require_int

HYPERPARAMETERS = ("init_scale", "lr_x", "lr_lambda", "lambda_min", "alpha")


class StationaritySystem:
    """The equations an extraction inverts: what the attacker holds, and the residual that candidates
    ``x`` and multipliers ``lam`` leave in them (one value per configuration).

    Subclasses hold their tensors either shared by every configuration or stacked ``[K, ...]``, one
    network per configuration; :meth:`stack` builds the stacked form of several named networks, each
    repeated for the K configurations of a search.
    """

    @property
    def d_in(self) -> int:
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        raise NotImplementedError

    def check(self, n_configs: int | None = None) -> None:
        """Raise ``ValueError`` when the tensors do not form one network (or one per configuration)."""
        raise NotImplementedError

    def signature(self) -> list:
        """Shapes that must agree between networks attacked in one batch."""
        raise NotImplementedError

    def digest_tensors(self) -> list[Tensor]:
        """The tensors that identify the attacked network in a checkpoint's key."""
        raise NotImplementedError

    def to(self, device, dtype) -> "StationaritySystem":
        raise NotImplementedError

    def loss(self, x: Float[Tensor, "k m d"], lam: Tensor, y: Tensor, alpha: Float[Tensor, " k"],
             form: KKTForm) -> Float[Tensor, " k"]:
        raise NotImplementedError

    @classmethod
    def stack(cls, systems: Sequence["StationaritySystem"], repeats: int, device, dtype) -> "StationaritySystem":
        raise NotImplementedError


class FullWeights(StationaritySystem):
    """``theta = (1/m) sum_j lam_j y_j grad_theta Phi(x_j)``: the trained weights themselves are the
    left-hand side (chapters 01 and 02)."""

    def __init__(self, weights: Sequence[Tensor]):
        self.weights = list(weights)

    @property
    def d_in(self) -> int:
        return self.weights[0].shape[-1]

    @property
    def d_out(self) -> int:
        return self.weights[-1].shape[-2]

    def check(self, n_configs: int | None = None) -> None:
        check_weights(self.weights, n_configs=n_configs)

    def signature(self) -> list:
        return [tuple(w.shape) for w in self.weights]

    def digest_tensors(self) -> list[Tensor]:
        return self.weights

    def to(self, device, dtype) -> "FullWeights":
        return FullWeights([w.detach().to(device, dtype) for w in self.weights])

    def loss(self, x, lam, y, alpha, form):
        return kkt_stationarity_loss(self.weights, x, lam, y, alpha, form)

    @classmethod
    def stack(cls, systems, repeats, device, dtype) -> "FullWeights":
        depth = len(systems[0].weights)
        return cls([torch.cat([s.weights[i].detach().to(device, dtype).unsqueeze(0).expand(repeats, -1, -1)
                               for s in systems]) for i in range(depth)])


def as_system(weights) -> StationaritySystem:
    """A :class:`StationaritySystem` as it is, or a list of weight matrices as :class:`FullWeights`."""
    return weights if isinstance(weights, StationaritySystem) else FullWeights(weights)


@dataclass(frozen=True)
class ExtractionConfig:
    """Settings shared by every configuration of one extraction run."""

    steps: int = 50_000
    momentum: float = 0.9
    form: str = "binary"  # one of KKT_FORMS
    box_low: float = -1.0  # pixel box of the (mean-subtracted) candidates
    box_high: float = 1.0
    lambda_weight: float = 5.0  # weight of the lam >= lambda_min hinge (unused by the general form)
    dtype: str = "float64"  # float32 | float64
    log_every: int = 1000
    checkpoint_every: int = 0  # steps; 0 = only at the end

    def __post_init__(self):
        require_int("steps", self.steps, minimum=0)
        require_float("momentum", self.momentum, minimum=0.0, maximum=1.0)
        require_choice("form", self.form, KKT_FORMS)
        require_float("box_low", self.box_low)
        require_float("box_high", self.box_high)
        if not self.box_low < self.box_high:
            raise ValueError(f"box_low={self.box_low}, box_high={self.box_high}: expected box_low < box_high")
        require_float("lambda_weight", self.lambda_weight, minimum=0.0)
        require_choice("dtype", self.dtype, ["float32", "float64"])
        require_int("log_every", self.log_every, minimum=1)
        require_int("checkpoint_every", self.checkpoint_every, minimum=0)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Hyperparameters:
    """K configurations of the attack, one value per configuration in each field."""

    init_scale: tuple[float, ...]
    lr_x: tuple[float, ...]
    lr_lambda: tuple[float, ...]
    lambda_min: tuple[float, ...]
    alpha: tuple[float, ...]
    seed: tuple[int, ...]  # seeds the configuration's initial candidates and multipliers

    def __post_init__(self):
        sizes = {name: len(getattr(self, name)) for name in (*HYPERPARAMETERS, "seed")}
        if len(set(sizes.values())) != 1 or min(sizes.values()) == 0:
            raise ValueError(f"Hyperparameters fields have lengths {sizes}: expected one equal, non-zero "
                             "number of configurations in every field")
        for name in HYPERPARAMETERS:
            values = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
            for v in values:
                if not (math.isfinite(v) and v > 0):
                    raise ValueError(f"{name}={v!r}: expected a positive number"
                                     + (" (lambda_min <= 0 would let every multiplier vanish, the trivial "
                                        "solution of the KKT equations)" if name == "lambda_min" else ""))
        object.__setattr__(self, "seed", tuple(int(s) for s in self.seed))

    def __len__(self) -> int:
        return len(self.seed)

    @classmethod
    def single(cls, init_scale: float, lr_x: float, lr_lambda: float, lambda_min: float, alpha: float,
               seed: int = 0) -> "Hyperparameters":
        return cls((init_scale,), (lr_x,), (lr_lambda,), (lambda_min,), (alpha,), (seed,))

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, float]]) -> "Hyperparameters":
        return cls(**{name: tuple(r[name] for r in rows) for name in (*HYPERPARAMETERS, "seed")})

    def row(self, k: int) -> dict:
        return {name: getattr(self, name)[k] for name in (*HYPERPARAMETERS, "seed")}

    def rows(self) -> list[dict]:
        return [self.row(k) for k in range(len(self))]

    def subset(self, index: Sequence[int]) -> "Hyperparameters":
        return Hyperparameters.from_rows([self.row(int(k)) for k in index])

    def tensor(self, name: str, device=None, dtype=torch.float64) -> Tensor:
        return torch.tensor(getattr(self, name), device=device, dtype=dtype)


def random_search(n_configs: int, ranges: Mapping[str, Sequence | float], seed: int = 0,
                  seeds: Sequence[int] | None = None) -> Hyperparameters:
    """``n_configs`` configurations drawn from ``ranges``: ``{name: (low, high, "log" | "linear")}`` or
    ``{name: value}`` for a fixed value. Log-uniform draws follow the reference sweeps of Haim et al."""
    require_int("n_configs", n_configs, minimum=1)
    missing = sorted(set(HYPERPARAMETERS) - set(ranges))
    if missing:
        raise ValueError(f"ranges lacks {missing}: expected a range or a value for each of {list(HYPERPARAMETERS)}")
    rng = np.random.default_rng(seed)
    values = {}
    for name in HYPERPARAMETERS:
        spec = ranges[name]
        if isinstance(spec, (int, float)):
            values[name] = tuple([float(spec)] * n_configs)
            continue
        low, high, scale = spec
        require_choice(f"ranges[{name!r}] scale", scale, ["log", "linear"])
        if not 0 < low <= high:
            raise ValueError(f"ranges[{name!r}]=({low}, {high}): expected 0 < low <= high")
        u = rng.uniform(size=n_configs)
        draw = (np.exp(np.log(low) + u * (np.log(high) - np.log(low))) if scale == "log"
                else low + u * (high - low))
        values[name] = tuple(float(v) for v in draw)
    config_seeds = tuple(range(seed, seed + n_configs)) if seeds is None else tuple(seeds)
    return Hyperparameters(**values, seed=config_seeds)


@dataclass
class ExtractionResult:
    """Candidates ``x [K, m, d]`` and multipliers ``lam [K, m]`` (``[K, m, C]`` for ``multiclass_all``) of
    every configuration, with history."""

    x: Float[Tensor, "k m d"]
    lam: Float[Tensor, "k m *c"]
    labels: Tensor
    diverged: Tensor  # [K] bool
    history: dict[str, Tensor]  # step [T], kkt_loss [T, K], prior_loss [T, K]
    hyper: Hyperparameters
    config: ExtractionConfig
    steps_done: int = 0

    @property
    def final_kkt_loss(self) -> Tensor:
        return self.history["kkt_loss"][-1]

    def subset(self, index: Sequence[int]) -> "ExtractionResult":
        """The configurations ``index`` alone, as if they had been run by themselves."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        hist = {"step": self.history["step"]}
        hist.update({key: v[:, idx] for key, v in self.history.items() if key != "step"})
        return ExtractionResult(self.x[idx], self.lam[idx], self.labels, self.diverged[idx], hist,
                                self.hyper.subset(idx.tolist()), self.config, self.steps_done)


def initial_state(hyper: Hyperparameters, n_candidates: int, d: int, form: KKTForm,
                  dtype: torch.dtype = torch.float64, n_outputs: int = 1) -> tuple[Tensor, Tensor]:
    """Per-configuration ``x = N(0, 1) * init_scale`` and ``lam ~ U(0, 1)`` (``N(0, 1)`` for ``general``;
    ``U(0, 1) / (C - 1)`` per class, shape ``[m, C]``, for ``multiclass_all``), drawn on the CPU in float64
    from each configuration's own seed, so a configuration starts from the same point whether it runs
    alone or in a batch, on any device."""
    xs, lams = [], []
    for row in hyper.rows():
        gen = torch.Generator().manual_seed(row["seed"])
        xs.append(torch.randn(n_candidates, d, generator=gen, dtype=torch.float64) * row["init_scale"])
        if form == "multiclass_all":
            lam = torch.rand(n_candidates, n_outputs, generator=gen, dtype=torch.float64) / max(n_outputs - 1, 1)
        else:
            lam = (torch.randn if form == "general" else torch.rand)(n_candidates, generator=gen, dtype=torch.float64)
        lams.append(lam)
    return torch.stack(xs).to(dtype), torch.stack(lams).to(dtype)


def _weights_digest(weights: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(str(tuple(w.shape)).encode())
        h.update(w.detach().to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_key(weights, labels, hyper: Hyperparameters, config: ExtractionConfig) -> dict:
    cfg = asdict(config)
    for transient in ("steps", "log_every", "checkpoint_every"):
        cfg.pop(transient)  # a resumed run may go on longer or log differently
    return {"config": cfg, "hyper": {k: list(v) for k, v in asdict(hyper).items()},
            "weights": _weights_digest(weights), "labels": labels.tolist()}


def extract(weights: "Sequence[Tensor] | StationaritySystem", labels: Tensor, n_train: int, hyper: Hyperparameters,
            config: ExtractionConfig, device: torch.device | str = "cpu",
            checkpoint_dir: str | Path | None = None, progress: bool = True,
            box: tuple[Tensor, Tensor] | None = None) -> ExtractionResult:
    """Run the attack on the trained ``weights`` for every configuration.

    ``weights`` holds one ``[out, in]`` matrix per layer (one network attacked by every configuration), or
    ``[K, out, in]`` stacks (configuration k attacks network k: a search over several networks in one run),
    or is any other :class:`StationaritySystem` (chapter 05's adapters and weight updates).

    ``labels`` are the candidates' labels (``candidate_labels``): ``m = len(labels)`` candidates, which
    must be at least the ``n_train`` the attack is after (Haim et al. use ``m = 2 n``). ``box``, a pair of
    per-pixel bounds ``[d]``, replaces the config's scalar box (e.g. ``(-mean, 1 - mean)``: the pixels of a
    mean-subtracted image in [0, 1]). With
    ``checkpoint_dir`` the state is saved every ``checkpoint_every`` steps and at the end; a restarted
    call continues from the last valid checkpoint and gives the same numbers.
    """
    from imprint.runtime.checkpoint import Checkpointer

    system = as_system(weights)
    system.check(n_configs=len(hyper))
    m = int(labels.shape[0]) if labels.ndim == 1 else -1
    require_int("n_train", n_train, minimum=1)
    if m < n_train:
        raise ValueError(f"n_candidates={m} (len(labels)): expected at least n_train={n_train} candidates, "
                         "one per training sample the attack looks for (m = 2 n is the usual choice)")
    d_out = system.d_out
    check_labels(labels, m, d_out, config.form)
    if config.form == "binary" and d_out != 1:
        raise ValueError(f"form='binary' needs one output, the weights have d_out={d_out}")
    device = torch.device(device)
    dtype = config.torch_dtype
    d = system.d_in
    k = len(hyper)

    if box is not None:
        low, high = (torch.as_tensor(b, dtype=torch.float64) for b in box)
        if low.shape != (d,) or high.shape != (d,) or not bool((low < high).all()):
            raise ValueError(f"box has bounds of shapes {tuple(low.shape)} and {tuple(high.shape)}: expected two "
                             f"per-pixel bounds of shape ({d},) with low < high everywhere")
        box_low, box_high = low.to(device, dtype), high.to(device, dtype)
    else:
        box_low, box_high = config.box_low, config.box_high
    equations = system.to(device, dtype)
    y = labels.to(device)
    init_scale, lr_x, lr_lambda, lambda_min, alpha = (hyper.tensor(n, device, dtype) for n in HYPERPARAMETERS)
    key = _run_key(system.digest_tensors(), labels, hyper, config)
    if box is not None:
        key["box"] = _weights_digest([box_low.reshape(1, -1), box_high.reshape(1, -1)])

    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    state = ckpt.latest() if ckpt else None
    if state is not None and state.meta.get("run") != key:
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} holds another extraction run (other weights, "
                         "labels or hyperparameters); use a fresh folder")
    if state is not None:
        t = {name: v.to(device) for name, v in state.tensors.items()}
        x, lam, buf_x, buf_lam = t["x"].to(dtype), t["lam"].to(dtype), t["buf_x"].to(dtype), t["buf_lam"].to(dtype)
        diverged = t["diverged"].bool()
        hist_step = state.tensors["history_step"].tolist()
        hist_kkt, hist_prior = [t["history_kkt"].to(dtype)], [t["history_prior"].to(dtype)]
        start = state.unit
    else:
        x, lam = (v.to(device) for v in initial_state(hyper, m, d, config.form, dtype, n_outputs=d_out))
        buf_x, buf_lam = torch.zeros_like(x), torch.zeros_like(lam)
        diverged = torch.zeros(k, dtype=torch.bool, device=device)
        hist_step, hist_kkt, hist_prior, start = [], [], [], 0

    use_lambda_prior = config.form != "general" and config.lambda_weight > 0

    def losses(x_: Tensor, lam_: Tensor) -> tuple[Tensor, Tensor]:
        kkt = equations.loss(x_, lam_, y, alpha, config.form)
        prior = box_prior(x_, box_low, box_high)
        if use_lambda_prior:
            prior = prior + lambda_prior(lam_, lambda_min, config.lambda_weight, y=y)
        return kkt, prior

    def save(step: int) -> None:
        if ckpt is None:
            return
        tensors = {"x": x, "lam": lam, "buf_x": buf_x, "buf_lam": buf_lam, "diverged": diverged.to(torch.uint8),
                   "history_step": torch.tensor(hist_step, dtype=torch.int64),
                   "history_kkt": torch.cat(hist_kkt) if hist_kkt else torch.zeros(0, k, dtype=dtype),
                   "history_prior": torch.cat(hist_prior) if hist_prior else torch.zeros(0, k, dtype=dtype)}
        ckpt.save(step, tensors, {"run": key})

    bar = tqdm(total=config.steps, initial=min(start, config.steps), disable=not progress, desc="KKT extraction",
               unit="step")
    step = start
    while step < config.steps:
        xv = x.detach().requires_grad_(True)
        lv = lam.detach().requires_grad_(True)
        kkt, prior = losses(xv, lv)
        total = kkt + prior
        ok = torch.isfinite(total) & ~diverged
        gx, gl = torch.autograd.grad(torch.where(ok, total, torch.zeros_like(total)).sum(), (xv, lv))
        with torch.no_grad():
            ok = ok & torch.isfinite(gx).flatten(1).all(1) & torch.isfinite(gl).flatten(1).all(1)
            if step % config.log_every == 0 and not (hist_step and hist_step[-1] == step):
                hist_step.append(step)
                hist_kkt.append(kkt.detach().unsqueeze(0))
                hist_prior.append(prior.detach().unsqueeze(0))
            keep = ok.reshape(-1, 1, 1)
            keep_l = ok.reshape(-1, *[1] * (lam.ndim - 1))
            gx = torch.where(keep, gx, torch.zeros_like(gx))
            gl = torch.where(keep_l, gl, torch.zeros_like(gl))
            # torch.optim.SGD with momentum, dampening 0: buf = mu buf + g; p -= lr buf (per configuration)
            buf_x = torch.where(keep, config.momentum * buf_x + gx, buf_x)
            buf_lam = torch.where(keep_l, config.momentum * buf_lam + gl, buf_lam)
            x = torch.where(keep, x - lr_x.reshape(-1, 1, 1) * buf_x, x)
            lam = torch.where(keep_l, lam - lr_lambda.reshape(keep_l.shape) * buf_lam, lam)
            diverged = diverged | ~ok
        step += 1
        bar.update(1)
        if ckpt is not None and config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            save(step)
    bar.close()
    if not hist_step or hist_step[-1] != step:
        kkt, prior = losses(x.detach(), lam.detach())
        with torch.no_grad():
            hist_step.append(step)
            hist_kkt.append(kkt.detach().unsqueeze(0))
            hist_prior.append(prior.detach().unsqueeze(0))
    if ckpt is not None and step > start:
        save(step)
    history = {"step": torch.tensor(hist_step), "kkt_loss": torch.cat(hist_kkt).detach().cpu(),
               "prior_loss": torch.cat(hist_prior).detach().cpu()}
    return ExtractionResult(x.detach().cpu(), lam.detach().cpu(), labels.cpu(), diverged.cpu(), history, hyper,
                            config, step)


def attack_networks(networks: "Mapping[str, Sequence[Tensor] | StationaritySystem]", labels: Tensor, n_train: int, hyper: Hyperparameters,
                    config: ExtractionConfig, device: torch.device | str = "cpu",
                    checkpoint_dir: str | Path | None = None, progress: bool = True,
                    box: tuple[Tensor, Tensor] | None = None) -> dict[str, ExtractionResult]:
    """Every configuration of ``hyper`` against every network, as ONE batched optimisation.

    ``networks`` maps a name (the attacked network, its controls) to its weights ``[out, in]`` per layer,
    or to a :class:`StationaritySystem` of one network (all of one kind); all must share the architecture. Configuration k starts from the same candidates on every network
    (its seed), so the networks are compared on equal terms. Returns one result per network.
    """
    names = list(networks)
    if not names:
        raise ValueError("networks is empty: expected at least one named network to attack")
    systems = {name: as_system(networks[name]) for name in names}
    first = systems[names[0]]
    for name, system in systems.items():
        if type(system) is not type(first):
            raise ValueError(f"networks[{name!r}] is a {type(system).__name__}: expected every network to be "
                             f"a {type(first).__name__}, like networks[{names[0]!r}]")
        system.check()
        if system.signature() != first.signature():
            raise ValueError(f"networks[{name!r}] has layer shapes {system.signature()}: expected the architecture "
                             f"of networks[{names[0]!r}], {first.signature()}")
    k = len(hyper)
    device = torch.device(device)
    dtype = first.digest_tensors()[0].dtype
    stacked = type(first).stack([systems[name] for name in names], k, device, dtype)
    everything = Hyperparameters.from_rows(hyper.rows() * len(names))
    result = extract(stacked, labels, n_train, everything, config, device=device, checkpoint_dir=checkpoint_dir,
                     progress=progress, box=box)
    return {name: result.subset(range(j * k, (j + 1) * k)) for j, name in enumerate(names)}
