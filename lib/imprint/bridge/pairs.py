"""Proxy pairs of the gradient bridge (chapter 06), generated in resumable safetensors shards.

A pair is what a LoRA client would send for one private batch, computed here on a batch of *public*
proxy images, together with the full-weight gradient the decoder should recover:

* ``T = 1``: the first SGD step from ``B = 0`` (:func:`~imprint.bridge.per_example.lora_step_pairs`):
  ``Delta B = -lr s G A^T``, ``Delta A = 0``, target ``G = grad_W L`` at the pretrained weights;
* ``T > 1`` (:func:`lora_path_pairs`): ``T`` SGD steps of ``(B, A)`` on the same batch (``A`` trained as
  well unless ``train_a=False``), ``Delta B = B_T``, ``Delta A = A_T - A_0``, ``Delta W = s B_T A_T``, and
  target the sum of the full gradients along the path, ``sum_t grad_W L(W0 + s B_t A_t)``, ``t < T``
  (with ``A`` frozen, ``Delta B = -lr s (sum_t G_t) A^T`` exactly).

:func:`generate_pairs` draws, for pair ``i``, a batch size from ``batch_sizes``, a step count from
``steps`` and that many distinct proxy images, from a generator seeded by ``(seed, shard)``: a shard's
content depends only on its number. Shards of ``shard_size`` pairs are written atomically
(``shard-00000.safetensors``) and recorded with their sha256 in ``manifest.json`` after each one, so a
killed generation resumes at the first shard that is missing or fails its digest, and gives the same
tensors as an uninterrupted run. :func:`load_pairs` reads them back, verified.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from imprint.bridge.per_example import _batches, _weights, check_lora_factors, lora_setup, lora_step_pairs
from imprint.runtime.checks import require_float, require_int, require_positive
from imprint.runtime.io import atomic_save_tensors, atomic_write_json, load_tensors, sha256_file

MANIFEST = "manifest.json"
FACTORS = "factors.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LoRAPathPairs:
    """Per batch and adapted weight: ``T`` SGD steps of a LoRA adapter from ``B = 0`` and the sum of the
    full gradients at the weights the path went through."""

    full: dict[str, Tensor]      # sum_t G_t, [n_batches, out, in]
    delta_b: dict[str, Tensor]   # B_T, [n_batches, out, r]
    delta_a: dict[str, Tensor]   # A_T - A_0, [n_batches, r, in]
    delta_w: dict[str, Tensor]   # s B_T A_T, [n_batches, out, in]
    lora_a: dict[str, Tensor]    # A_0, [r, in]
    lr: float
    scaling: float
    steps: int


def lora_path_pairs(model: nn.Module, x: Float[Tensor, "n *features"], labels: Int[Tensor, " n"],
                    lora_a: Mapping[str, Tensor], lr: float, steps: int, scaling: float = 1.0,
                    batch_size: int = 1, train_a: bool = True) -> LoRAPathPairs:
    """``steps`` SGD steps of size ``lr`` of the adapter ``W0 + scaling B A`` from ``B = 0``, ``A = lora_a``,
    on each consecutive batch of ``batch_size`` examples (the same batch at every step), vmapped over
    batches; only the weights named by ``lora_a`` are adapted. With ``steps=1`` it is
    :func:`~imprint.bridge.per_example.lora_step_pairs`."""
    steps = require_int("steps", steps, minimum=1)
    lr, scaling, names, params, factors, xb, yb = lora_setup(model, x, labels, lora_a, lr, scaling, batch_size)
    n_batches = xb.shape[0]

    def loss_w(w: dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, {**params, **w}, (xs,)), ys)

    def loss_ba(b: dict[str, Tensor], a: dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        return loss_w({n: params[n] + scaling * b[n] @ a[n] for n in names}, xs, ys)

    def step(b, a, xs, ys):
        gb, ga = grad(loss_ba, argnums=(0, 1))(b, a, xs, ys)
        gw = grad(loss_w)({n: params[n] + scaling * b[n] @ a[n] for n in names}, xs, ys)
        return gb, ga, gw

    batched = vmap(step, in_dims=(0, 0, 0, 0))
    b = {n: params[n].new_zeros(n_batches, params[n].shape[0], factors[n].shape[0]) for n in names}
    a = {n: factors[n].expand(n_batches, *factors[n].shape).clone() for n in names}
    total = {n: params[n].new_zeros(n_batches, *params[n].shape) for n in names}
    for _ in range(steps):
        gb, ga, gw = batched(b, a, xb, yb)
        b = {n: b[n] - lr * gb[n] for n in names}
        if train_a:
            a = {n: a[n] - lr * ga[n] for n in names}
        total = {n: total[n] + gw[n] for n in names}
    return LoRAPathPairs(full=total, delta_b=b, delta_a={n: a[n] - factors[n] for n in names},
                         delta_w={n: scaling * b[n] @ a[n] for n in names}, lora_a=factors, lr=lr,
                         scaling=scaling, steps=steps)


@dataclass(frozen=True)
class PairOptions:
    """What :func:`generate_pairs` draws: ``n_pairs`` pairs in shards of ``shard_size``; per pair a batch
    size from ``batch_sizes`` and a step count from ``steps`` (uniformly), SGD of size ``lr`` with LoRA
    scaling ``scaling``; ``train_a`` whether ``A`` moves after the first step."""

    n_pairs: int = 4096
    shard_size: int = 1024
    batch_sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    steps: tuple[int, ...] = (1,)
    lr: float = 0.1
    scaling: float = 1.0
    train_a: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        require_int("n_pairs", self.n_pairs, minimum=1)
        require_int("shard_size", self.shard_size, minimum=1)
        if not self.batch_sizes:
            raise ValueError("batch_sizes=(): expected at least one batch size")
        for b in self.batch_sizes:
            require_int("batch_sizes", b, minimum=1)
        if not self.steps:
            raise ValueError("steps=(): expected at least one step count")
        for t in self.steps:
            require_int("steps", t, minimum=1)
        require_positive("lr", self.lr)
        if require_float("scaling", self.scaling) == 0.0:
            raise ValueError("scaling=0.0: expected a nonzero LoRA scaling (the update would not depend on G)")
        require_int("seed", self.seed, minimum=0)

    @property
    def n_shards(self) -> int:
        return -(-self.n_pairs // self.shard_size)


def _digest(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _draw_shard(k: int, options: PairOptions, n_proxy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch sizes, step counts and members (``[m, max batch]``, padded with -1) of shard ``k``."""
    m = min(options.shard_size, options.n_pairs - k * options.shard_size)
    rng = np.random.default_rng([options.seed, k])
    sizes = rng.choice(np.asarray(options.batch_sizes), size=m)
    steps = rng.choice(np.asarray(options.steps), size=m)
    members = np.full((m, max(options.batch_sizes)), -1, dtype=np.int64)
    for i in range(m):
        members[i, :sizes[i]] = rng.choice(n_proxy, size=sizes[i], replace=False)
    return sizes, steps, members


def _compute_shard(k: int, model: nn.Module, x: Tensor, labels: Tensor, factors: dict[str, Tensor],
                   options: PairOptions) -> dict[str, Tensor]:
    sizes, steps, members = _draw_shard(k, options, x.shape[0])
    m = len(sizes)
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for name, a in factors.items():
        o, d, r = params[name].shape[0], params[name].shape[1], a.shape[0]
        out[f"{name}/delta_b"] = torch.zeros(m, o, r, dtype=torch.float32)
        out[f"{name}/delta_a"] = torch.zeros(m, r, d, dtype=torch.float32)
        out[f"{name}/full"] = torch.zeros(m, o, d, dtype=torch.float32)
    for b in sorted(set(sizes.tolist())):
        for t in sorted(set(steps.tolist())):
            rows = np.flatnonzero((sizes == b) & (steps == t))
            if rows.size == 0:
                continue
            idx = torch.as_tensor(members[rows, :b].reshape(-1), device=x.device)
            xs, ys = x[idx], labels[idx]
            if t == 1:
                p = lora_step_pairs(model, xs, ys, factors, lr=options.lr, scaling=options.scaling, batch_size=b)
                delta_a = {n: torch.zeros(rows.size, *factors[n].shape) for n in factors}
            else:
                p = lora_path_pairs(model, xs, ys, factors, lr=options.lr, steps=t, scaling=options.scaling,
                                    batch_size=b, train_a=options.train_a)
                delta_a = p.delta_a
            rows_t = torch.as_tensor(rows)
            for n in factors:
                out[f"{n}/delta_b"][rows_t] = p.delta_b[n].detach().float().cpu()
                out[f"{n}/delta_a"][rows_t] = delta_a[n].detach().float().cpu()
                out[f"{n}/full"][rows_t] = p.full[n].detach().float().cpu()
    out["batch_size"] = torch.as_tensor(sizes, dtype=torch.int64)
    out["steps"] = torch.as_tensor(steps, dtype=torch.int64)
    out["members"] = torch.as_tensor(members)
    out["index"] = torch.arange(k * options.shard_size, k * options.shard_size + m, dtype=torch.int64)
    return out


def _config(model: nn.Module, x: Tensor, labels: Tensor, factors: dict[str, Tensor], options: PairOptions) -> dict:
    params = dict(model.named_parameters())
    config = {
        "format": FORMAT_VERSION,
        "options": asdict(options),
        "layers": {n: {"out": params[n].shape[0], "in": params[n].shape[1], "rank": a.shape[0]}
                   for n, a in factors.items()},
        "model_sha256": _digest([p for _, p in model.named_parameters()]),
        "data_sha256": _digest([x, labels]),
        "factors_sha256": _digest(list(factors.values())),
    }
    return json.loads(json.dumps(config))  # tuples as lists, as the manifest reads back


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def generate_pairs(folder: str | Path, model: nn.Module, x: Float[Tensor, "n 1 height width"],
                   labels: Int[Tensor, " n_labels"], lora_a: Mapping[str, Tensor], options: PairOptions = PairOptions(),
                   progress: bool = False) -> Path:
    """Write the proxy pairs of ``model`` on the proxy images ``x`` (labels ``labels``) for the LoRA factors
    ``lora_a`` (``name -> A [r, in]``) into ``folder`` as shards plus ``manifest.json``; returns the
    manifest's path. A folder holding a manifest of another configuration (options, model weights, proxy
    data, factors) is refused; one of the same configuration is resumed: shards already recorded with a
    matching sha256 are kept, the others (missing, partial, corrupted) recomputed, stale temporary files
    removed. Tensors are stored in float32 on the CPU."""
    folder = Path(folder)
    if x.ndim != 4 or x.shape[0] < 1:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [n, 1, height, width] with n >= 1")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}: expected ({x.shape[0]},), one per image")
    if max(options.batch_sizes) > x.shape[0]:
        raise ValueError(f"batch_sizes={options.batch_sizes}: the largest exceeds the {x.shape[0]} proxy images")
    if not lora_a:
        raise ValueError("lora_a is empty: expected at least one adapted weight (name -> A [r, in])")
    params = _weights(model, list(lora_a))
    factors = check_lora_factors(params, lora_a)
    device = params[next(iter(factors))].device
    x, labels = x.to(device), labels.to(device)
    config = _config(model, x, labels, factors, options)
    manifest = _read_manifest(folder)
    if manifest is not None and manifest.get("config") != config:
        raise ValueError(f"folder={str(folder)!r} holds pairs of another configuration (options, model, proxy "
                         "data or factors differ): expected an empty folder or one generated with the same")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink()
    if manifest is None:
        manifest = {"config": config, "n_pairs": options.n_pairs, "shards": {}}
    # one metadata key: safetensors orders several arbitrarily, and the bytes should repeat
    atomic_save_tensors(folder / FACTORS, factors, {"lora": {"lr": options.lr, "scaling": options.scaling}})
    shards = manifest["shards"]
    iterator = range(options.n_shards)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc="proxy pair shards")
    for k in iterator:
        name = _shard_name(k)
        entry = shards.get(name)
        path = folder / name
        if entry is not None and path.is_file() and sha256_file(path) == entry["sha256"]:
            continue
        tensors = _compute_shard(k, model, x, labels, factors, options)
        atomic_save_tensors(path, tensors, {"shard": k})
        shards[name] = {"n": int(tensors["index"].numel()), "sha256": sha256_file(path)}
        atomic_write_json(folder / MANIFEST, manifest)
    atomic_write_json(folder / MANIFEST, manifest)
    return folder / MANIFEST


@dataclass(frozen=True)
class ProxyPairs:
    """Pairs read back by :func:`load_pairs`, concatenated over shards (leading axis: pair)."""

    delta_b: dict[str, Tensor]   # [n, out, r]
    delta_a: dict[str, Tensor]   # [n, r, in]
    full: dict[str, Tensor]      # [n, out, in]
    lora_a: dict[str, Tensor]    # A_0, [r, in]
    batch_size: Tensor           # [n]
    steps: Tensor                # [n]
    members: Tensor              # [n, max batch], proxy indices padded with -1
    index: Tensor                # [n]
    lr: float
    scaling: float

    @property
    def n(self) -> int:
        return int(self.index.numel())

    def delta_w(self, name: str) -> Float[Tensor, "n out d_in"]:
        """The change of the effective weight, ``s Delta B (A_0 + Delta A)``."""
        return self.scaling * self.delta_b[name] @ (self.lora_a[name] + self.delta_a[name])

    def subset(self, rows: Int[Tensor, " m"]) -> "ProxyPairs":
        return ProxyPairs({n: v[rows] for n, v in self.delta_b.items()},
                          {n: v[rows] for n, v in self.delta_a.items()},
                          {n: v[rows] for n, v in self.full.items()}, self.lora_a, self.batch_size[rows],
                          self.steps[rows], self.members[rows], self.index[rows], self.lr, self.scaling)


def load_pairs(folder: str | Path, layers: Sequence[str] | None = None) -> ProxyPairs:
    """All shards of a complete generation in ``folder``, each checked against the manifest's sha256;
    ``layers`` (default: all adapted weights) selects which layers' tensors are kept."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"folder={str(folder)!r}: no {MANIFEST} (expected a folder from generate_pairs)")
    config = manifest["config"]
    all_layers = list(config["layers"])
    layers = all_layers if layers is None else list(layers)
    unknown = [n for n in layers if n not in all_layers]
    if unknown or not layers:
        raise ValueError(f"layers={layers}: expected a non-empty subset of {all_layers}")
    n_shards = -(-config["options"]["n_pairs"] // config["options"]["shard_size"])
    parts = []
    for k in range(n_shards):
        name, path = _shard_name(k), folder / _shard_name(k)
        entry = manifest["shards"].get(name)
        if entry is None or not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise ValueError(f"folder={str(folder)!r}: shard {name} is missing or fails its sha256 (an "
                             "interrupted generation: run generate_pairs again with the same arguments)")
        parts.append(load_tensors(path))
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    factors = load_tensors(folder / FACTORS)
    opts = config["options"]
    return ProxyPairs({n: cat[f"{n}/delta_b"] for n in layers}, {n: cat[f"{n}/delta_a"] for n in layers},
                      {n: cat[f"{n}/full"] for n in layers}, {n: factors[n].float() for n in layers},
                      cat["batch_size"], cat["steps"], cat["members"], cat["index"], float(opts["lr"]),
                      float(opts["scaling"]))
