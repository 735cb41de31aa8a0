"""LoRA adapters of the bias-free MLP: peft models, a batched trainer, and users' adapter folders (chapter 05).

peft is the reference implementation: :func:`lora_model` wraps an :class:`imprint.models.mlp.MLP` in a
``LoraConfig`` that names its target modules (``layers.0``, ``layers.1``, ...), and
:func:`peft_factors` reads the ``(A, B)`` pairs and the scaling back out of any peft model of that
architecture, including one loaded from a user's ``save_pretrained`` folder (:func:`load_adapter`).

The chapter trains hundreds of adapters (every rank, private set and control); :func:`train_adapters`
runs S of them as one set of batched matrix products: each network's factors are stacked along a
leading axis and zero-padded to the largest rank. Padding is exact under gradient descent: a zero row
of ``A`` and the matching zero column of ``B`` have zero gradients, so they stay zero. The forward never
forms ``B A``. Autograd provides the backward; a test checks the batched trainer against peft models
trained one at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from imprint.models.mlp import MLP, batched_loss, margins
from imprint.reconstruction.extraction import _weights_digest
from imprint.runtime.checks import require_choice, require_float, require_int, require_path

LORA_INITS = ("standard", "balanced")


def layer_name(i: int) -> str:
    """The module name of the MLP's ``i``-th linear layer, as peft's ``target_modules`` takes it."""
    return f"layers.{i}"


def check_rank(rank: int, shapes: Mapping[int, tuple[int, int]], what: str = "rank") -> int:
    """``1 <= rank <= min(out, in)`` of every adapted layer (shapes: layer -> (out, in))."""
    require_int(what, rank, minimum=1)
    for i, (out_, in_) in shapes.items():
        if rank > min(out_, in_):
            raise ValueError(f"{what}={rank}: layer {layer_name(i)} is [{out_}, {in_}], so a rank above "
                             f"{min(out_, in_)} adds nothing; expected 1 <= {what} <= {min(out_, in_)}")
    return rank


@dataclass(frozen=True)
class LoRATrainConfig:
    """Full-batch gradient descent on the logistic loss over LoRA factors of chosen layers.

    ``init``: ``"standard"`` is peft's (``A`` uniform in +-1/sqrt(in), ``B = 0``); ``"balanced"`` starts
    from ``A = init_scale * Q_a``, ``B = init_scale * Q_b`` with orthonormal rows / columns, so that
    ``A A^T = B^T B``. ``lora_alpha=None`` sets alpha to the rank (scaling 1).
    """

    layers: tuple[int, ...] = (0, 1)
    lr: float = 0.5
    steps: int = 2000
    init: str = "standard"
    init_scale: float = 0.01
    lora_alpha: float | None = None
    dtype: str = "float32"
    log_every: int = 100
    checkpoint_every: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"layers={list(self.layers)}: expected distinct, non-negative layer indices")
        require_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        require_int("steps", self.steps, minimum=0)
        require_choice("init", self.init, LORA_INITS)
        require_float("init_scale", self.init_scale, minimum=0.0, strict_minimum=True)
        if self.lora_alpha is not None:
            require_float("lora_alpha", self.lora_alpha, minimum=0.0, strict_minimum=True)
        require_choice("dtype", self.dtype, ["float32", "float64"])
        require_int("log_every", self.log_every, minimum=1)
        require_int("checkpoint_every", self.checkpoint_every, minimum=0)
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"log_every={self.log_every}")

    def scaling(self, rank: int) -> float:
        return 1.0 if self.lora_alpha is None else self.lora_alpha / rank


def initial_factors(shapes: Mapping[int, tuple[int, int]], rank: int, config: LoRATrainConfig, seed: int
                    ) -> dict[int, tuple[Tensor, Tensor]]:
    """``(A [r, in], B [out, r])`` per adapted layer, drawn in float64 on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for i in sorted(shapes):
        out_, in_ = shapes[i]
        if config.init == "standard":
            bound = 1.0 / math.sqrt(in_)  # kaiming_uniform_(a=sqrt(5)), as peft initialises lora_A
            lora_a = (torch.rand(rank, in_, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            lora_b = torch.zeros(out_, rank, dtype=torch.float64)
        else:
            qa, _ = torch.linalg.qr(torch.randn(in_, rank, generator=gen, dtype=torch.float64))
            qb, _ = torch.linalg.qr(torch.randn(out_, rank, generator=gen, dtype=torch.float64))
            lora_a, lora_b = config.init_scale * qa.T, config.init_scale * qb
        out[i] = (lora_a, lora_b)
    return out


def lora_model(base: MLP, rank: int, config: LoRATrainConfig,
               factors: Mapping[int, tuple[Tensor, Tensor]] | None = None):
    """A peft model of ``base`` (copied) with rank-``rank`` adapters on ``config.layers``, its factors set
    to ``factors`` when given (e.g. :func:`initial_factors`)."""
    import peft

    shapes = layer_shapes(base, config.layers)
    check_rank(rank, shapes)
    copy = MLP(base.d_in, base.widths, base.d_out)
    copy.load_state_dict(base.state_dict())
    copy = copy.to(next(base.parameters()).dtype)
    alpha = rank if config.lora_alpha is None else config.lora_alpha
    lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                  target_modules=[layer_name(i) for i in config.layers])
    model = peft.get_peft_model(copy, lora_config)
    if factors is not None:
        with torch.no_grad():
            for i, (lora_a, lora_b) in factors.items():
                layer = model.base_model.model.layers[i]
                layer.lora_A["default"].weight.copy_(lora_a)
                layer.lora_B["default"].weight.copy_(lora_b)
    return model


def layer_shapes(base: MLP, layers: Sequence[int]) -> dict[int, tuple[int, int]]:
    """``(out, in)`` of each named layer of ``base``; a layer the network lacks is an error."""
    for i in layers:
        if not 0 <= i < base.depth:
            raise ValueError(f"layers={list(layers)}: the base network has layers 0..{base.depth - 1} "
                             f"({', '.join(layer_name(j) for j in range(base.depth))})")
    return {i: tuple(base.layers[i].weight.shape) for i in layers}


def peft_factors(model) -> tuple[dict[int, tuple[Tensor, Tensor]], float]:
    """The ``(A, B)`` of every adapted layer of a peft-wrapped MLP, and their common scaling."""
    layers = model.base_model.model.layers
    factors, scalings = {}, set()
    for i, layer in enumerate(layers):
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            factors[i] = (layer.lora_A["default"].weight.detach().clone(),
                          layer.lora_B["default"].weight.detach().clone())
            scalings.add(float(layer.scaling["default"]))
    if not factors:
        raise ValueError("the peft model has no LoRA layer named 'default'")
    if len(scalings) != 1:
        raise ValueError(f"adapted layers use scalings {sorted(scalings)}: expected one scaling")
    return factors, scalings.pop()


def load_adapter(base: MLP, adapter_dir: str | Path, rank: int | None = None,
                 layers: Sequence[int] | None = None) -> tuple[dict[int, tuple[Tensor, Tensor]], float]:
    """A user's peft adapter folder (``save_pretrained``: ``adapter_config.json`` + safetensors) on
    ``base``: its factors and scaling, checked against the declared ``rank`` and ``layers`` and against
    the base's layer shapes before anything is loaded into a model."""
    import peft
    from safetensors import safe_open

    folder = require_path("adapter_dir", adapter_dir, kind="directory")
    config_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter_dir={str(folder)!r} has no {path.name} (expected a peft "
                                    "save_pretrained folder with safetensors weights)")
    config = json.loads(config_path.read_text())
    found_rank = int(config.get("r", -1))
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = {layer_name(i): i for i in range(base.depth)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"adapter_dir={str(folder)!r} targets modules {unknown}, which the base network "
                         f"does not have (it has {sorted(names)})")
    found_layers = sorted(names[t] for t in targets)
    if rank is not None and found_rank != rank:
        raise ValueError(f"adapter_dir={str(folder)!r} holds rank {found_rank} adapters: expected rank={rank}")
    if layers is not None and found_layers != sorted(layers):
        raise ValueError(f"adapter_dir={str(folder)!r} adapts layers {found_layers}: expected "
                         f"layers={sorted(layers)}")
    with safe_open(str(weights_path), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    for i in found_layers:
        out_, in_ = base.layers[i].weight.shape
        want = {"lora_A": (found_rank, in_), "lora_B": (out_, found_rank)}
        for part, shape in want.items():
            key = next((k for k in shapes if f"layers.{i}.{part}" in k), None)
            if key is None or shapes[key] != shape:
                raise ValueError(f"adapter_dir={str(folder)!r}: {layer_name(i)}.{part} has shape "
                                 f"{shapes.get(key)}, expected {shape} for a rank-{found_rank} adapter on the "
                                 f"base layer [{out_}, {in_}]")
    copy = MLP(base.d_in, base.widths, base.d_out)
    copy.load_state_dict(base.state_dict())
    model = peft.PeftModel.from_pretrained(copy.to(next(base.parameters()).dtype), str(folder))
    return peft_factors(model)


# ------------------------------------------------------------------------------------ batched training

def batched_adapted_forward(base: Sequence[Tensor], factors: Mapping[int, tuple[Tensor, Tensor]],
                            scaling: Float[Tensor, " s"], x: Float[Tensor, "s n d"]) -> Float[Tensor, "s n c"]:
    """The S ReLU networks ``W_l = W0_l + s B_l A_l`` on their inputs, without forming ``B A``: ``base[l]`` is
    ``[out, in]`` (shared), ``factors[l] = (A [S, r, in], B [S, out, r])``, ``scaling`` the S scalings."""
    s = scaling.reshape(-1, 1, 1).to(x.dtype)
    h = x
    for i, w in enumerate(base):
        z = h @ w.transpose(-1, -2)
        if i in factors:
            lora_a, lora_b = factors[i]
            z = z + s * ((h @ lora_a.transpose(-1, -2)) @ lora_b.transpose(-1, -2))
        h = torch.relu(z) if i < len(base) - 1 else z
    return h


@dataclass
class AdapterRun:
    """S trained adapters: ``factors[l] = (A [S, r_max, in], B [S, out, r_max])``, their ranks and scalings,
    and the logged history (``step``; ``loss``, ``min_margin``, ``train_error`` of shape [T, S])."""

    factors: dict[int, tuple[Tensor, Tensor]]
    ranks: list[int]
    scaling: Tensor
    history: dict[str, Tensor]

    def adapter(self, s: int) -> dict[int, tuple[Tensor, Tensor]]:
        """Network ``s``'s factors at its own rank (padding removed), on the CPU in float64."""
        r = self.ranks[s]
        return {i: (a[s, :r].detach().double().cpu(), b[s, :, :r].detach().double().cpu())
                for i, (a, b) in self.factors.items()}


def train_adapters(base: Sequence[Tensor], x: Float[Tensor, "s n d"], targets: Float[Tensor, "s n"],
                   ranks: Sequence[int], seeds: Sequence[int], config: LoRATrainConfig,
                   device: torch.device | str = "cpu", checkpoint_dir: str | Path | None = None,
                   progress: bool = True) -> AdapterRun:
    """Train S adapters of the shared ``base`` (weights ``[out, in]`` per layer) by full-batch GD, network
    ``s`` on ``x[s]`` with ``targets[s]`` (+-1) at rank ``ranks[s]`` from :func:`initial_factors` of
    ``seeds[s]``. Checkpoints every ``checkpoint_every`` steps into ``checkpoint_dir`` and resumes there."""
    from imprint.runtime.checkpoint import Checkpointer

    n_nets = x.shape[0]
    if x.ndim != 3 or targets.shape != x.shape[:2]:
        raise ValueError(f"x has shape {tuple(x.shape)} and targets {tuple(targets.shape)}: expected "
                         "[S, n, d] and [S, n]")
    if len(ranks) != n_nets or len(seeds) != n_nets:
        raise ValueError(f"ranks has {len(ranks)} and seeds {len(seeds)} entries: expected one per network ({n_nets})")
    if not bool(((targets == 1) | (targets == -1)).all()):
        raise ValueError("targets: the logistic loss expects labels in {+1, -1}")
    depth = len(base)
    bad = [i for i in config.layers if i >= depth]
    if bad:
        raise ValueError(f"layers={list(config.layers)}: the base network has layers 0..{depth - 1}")
    shapes = {i: tuple(base[i].shape) for i in config.layers}
    for r in ranks:
        check_rank(int(r), shapes, "ranks")
    device, dtype = torch.device(device), getattr(torch, config.dtype)
    r_max = max(int(r) for r in ranks)

    def padded(r: int, seed: int) -> dict[int, tuple[Tensor, Tensor]]:
        out = {}
        for i, (a, b) in initial_factors(shapes, int(r), config, int(seed)).items():
            out[i] = (torch.cat([a, a.new_zeros(r_max - r, a.shape[1])]),
                      torch.cat([b, b.new_zeros(b.shape[0], r_max - r)], dim=1))
        return out

    key = {"config": {k: v for k, v in asdict(config).items() if k not in ("steps", "log_every", "checkpoint_every")},
           "ranks": [int(r) for r in ranks], "seeds": [int(s) for s in seeds], "shape": list(x.shape),
           "data": _weights_digest([*base, x, targets])}
    key = json.loads(json.dumps(key))  # as the checkpoint's metadata reads it back (tuples become lists)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    state = ckpt.latest(max_unit=config.steps) if ckpt else None
    if state is not None and state.meta.get("run") != key:
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} holds another adapter run; use a fresh folder")
    if state is not None:
        params = {i: [state.tensors[f"a{i}"].to(device, dtype), state.tensors[f"b{i}"].to(device, dtype)]
                  for i in config.layers}
        start = state.unit
        logged = [state.tensors["history"].to(device, dtype)]
        steps_logged = state.tensors["history_step"].tolist()
    else:
        inits = [padded(r, s) for r, s in zip(ranks, seeds)]
        params = {i: [torch.stack([f[i][j] for f in inits]).to(device, dtype) for j in range(2)] for i in config.layers}
        start, logged, steps_logged = 0, [], []
    scaling = torch.tensor([config.scaling(int(r)) for r in ranks], dtype=dtype, device=device)
    w0 = [w.detach().to(device, dtype) for w in base]
    xs, ys = x.to(device, dtype), targets.to(device, dtype)

    def stats() -> Tensor:
        with torch.no_grad():
            out = batched_adapted_forward(w0, {i: tuple(p) for i, p in params.items()}, scaling, xs)
            q = margins(out, ys, "logistic")
            return torch.stack([batched_loss(out, ys, "logistic"), q.min(1).values, (q <= 0).to(dtype).mean(1)], 1)

    if state is None:
        logged.append(stats().unsqueeze(0))
        steps_logged.append(0)
    leaves = [t for i in config.layers for t in params[i]]
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="LoRA GD", unit="step")
    step = start
    while step < config.steps:
        for t in leaves:
            t.requires_grad_(True)
        out = batched_adapted_forward(w0, {i: tuple(p) for i, p in params.items()}, scaling, xs)
        loss = batched_loss(out, ys, "logistic").sum()  # networks share no variables: each gets its own gradient
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            leaves = [(t - config.lr * g).detach() for t, g in zip(leaves, grads)]
        params = {i: leaves[2 * j:2 * j + 2] for j, i in enumerate(config.layers)}
        step += 1
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            logged.append(stats().unsqueeze(0))
            steps_logged.append(step)
        if ckpt and (step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            tensors = {f"{n}{i}": params[i][j] for i in config.layers for j, n in enumerate("ab")}
            tensors.update(history=torch.cat(logged), history_step=torch.tensor(steps_logged))
            ckpt.save(step, tensors, {"run": key})
    bar.close()
    history = torch.cat(logged).detach().cpu()
    hist = {"step": torch.tensor(steps_logged)}
    hist.update({name: history[:, :, i] for i, name in enumerate(("loss", "min_margin", "train_error"))})
    return AdapterRun({i: (p[0].detach(), p[1].detach()) for i, p in params.items()}, [int(r) for r in ranks],
                      scaling.detach().cpu(), hist)

