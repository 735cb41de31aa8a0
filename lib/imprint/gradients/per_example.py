"""Per-example gradients of the supervised fine-tuning loss, for the gradient-similarity chapter (03).

The loss of an example is the mean token cross-entropy over its answer tokens (``labels != -100``; the
prompt and the padding do not count). Three ways to get one gradient per example, which the tests hold
equal:

* :func:`per_example_gradients_loop`: the reference, one backward pass per example, each on its own
  unpadded sequence;
* :func:`per_example_gradients`: ``torch.func`` (``vmap`` of ``grad`` of a ``functional_call``), any
  parameter;
* :func:`capture_factors`: one batched backward pass with hooks that keep, for every selected linear
  layer, its inputs ``a_t`` and the loss gradient ``g_t`` with respect to its outputs (and, for an
  embedding table, the token ids). A linear layer's per-example weight gradient is ``sum_t g_t a_t^T``
  (:meth:`Factors.gradients`), and the factored projection of :mod:`imprint.gradients.projection`
  never forms it (:func:`projected_gradients`). Weight gradients are never accumulated: the backward
  pass only propagates activation gradients, which is why this path is the fast one.

Batches are right padded and passed without an attention mask: with causal attention no real token sees
a padding token, and the padding carries no loss, so every per-example gradient is exactly that of the
unpadded example. Parameters are grouped by transformer layer or by module for the layer-wise analysis
(:func:`parameter_groups`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from imprint.data.text import IGNORE_INDEX, ChatEncoding
from imprint.gradients.projection import FactoredProjector, ProjectionKind, derive_seed
from imprint.runtime.checks import require_choice, require_int

Granularity = Literal["parameter", "module", "layer", "model"]
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def sft_loss_per_example(logits: Float[Tensor, "batch seq vocab"], labels: Int[Tensor, "batch seq"]
                         ) -> Float[Tensor, " batch"]:
    """Mean next-token cross-entropy over each example's answer tokens (``labels`` shifted by one)."""
    # position t predicts token t + 1; the last position predicts nothing. The logits stay (batch * seq,
    # vocab) with the vocabulary contiguous: the (batch, vocab, seq) layout takes a much slower kernel.
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    mask = targets != IGNORE_INDEX
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(),
                                             reduction="none").view(targets.shape)
    return (token_loss * mask).sum(1) / mask.sum(1)


def _check_batch(input_ids: Tensor, labels: Tensor) -> None:
    if input_ids.shape != labels.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)}: expected two "
                         "(batch, seq) tensors of the same shape")
    n_answer = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    if bool((n_answer == 0).any()):
        bad = torch.nonzero(n_answer == 0).flatten().tolist()
        raise ValueError(f"examples {bad} have no answer token to take the loss on (all labels are -100)")


def weight_matrix_names(model: nn.Module) -> list[str]:
    """Names of the weights of every ``nn.Linear`` and ``nn.Embedding`` (a tied weight once), in model order."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    found = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) in names:
            name = names[id(module.weight)]
            if name not in found:
                found.append(name)
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return sorted(found, key=order.__getitem__)


def group_name(param_name: str, granularity: Granularity) -> str:
    """``layers.03`` (layer), ``layers.3.mlp.up_proj`` (module), the name itself, or ``model``.

    Parameters outside the numbered blocks form their own layer group named after their module
    (``embed_tokens``, ``lm_head``, ``norm``).
    """
    require_choice("granularity", granularity, ["parameter", "module", "layer", "model"])
    stem = param_name[len("model."):] if param_name.startswith("model.") else param_name
    stem = stem.rsplit(".", 1)[0] if stem.endswith((".weight", ".bias")) else stem
    if granularity == "parameter":
        return param_name
    if granularity == "module":
        return stem
    if granularity == "model":
        return "model"
    match = _LAYER.search("." + stem + ".")
    return f"layers.{int(match.group(1)):02d}" if match else stem.split(".")[-1]


def parameter_groups(param_names: Sequence[str], granularity: Granularity) -> dict[str, list[str]]:
    """Group name -> parameter names, in the order the groups first appear."""
    groups: dict[str, list[str]] = {}
    for name in param_names:
        groups.setdefault(group_name(name, granularity), []).append(name)
    return groups


def _select(model: nn.Module, param_names: Sequence[str] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    names = list(param_names) if param_names is not None else weight_matrix_names(model)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"param_names: {missing[:3]} are not parameters of the model")
    return {n: named[n].detach() for n in names}


def per_example_gradients(model: nn.Module, input_ids: Int[Tensor, "batch seq"], labels: Int[Tensor, "batch seq"],
                          param_names: Sequence[str] | None = None, chunk_size: int | None = None
                          ) -> dict[str, Tensor]:
    """Per-example gradients ``{name: (batch, *shape)}`` by ``torch.func.vmap(grad(loss))``.

    ``param_names`` defaults to :func:`weight_matrix_names`; the others stay fixed. ``chunk_size`` bounds
    how many examples ``vmap`` processes at once. The model must use eager attention.
    """
    _check_batch(input_ids, labels)
    params = _select(model, param_names)

    def loss(p: dict[str, Tensor], ids: Tensor, lab: Tensor) -> Tensor:
        logits = functional_call(model, p, (ids[None],), {"use_cache": False}).logits
        return sft_loss_per_example(logits, lab[None])[0]

    return vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, input_ids, labels)


def per_example_gradients_loop(model: nn.Module, input_ids: Int[Tensor, "batch seq"],
                               labels: Int[Tensor, "batch seq"], param_names: Sequence[str] | None = None,
                               lengths: Int[Tensor, " batch"] | None = None) -> dict[str, Tensor]:
    """The reference: a separate forward and backward pass per example, on its unpadded tokens."""
    _check_batch(input_ids, labels)
    params = _select(model, param_names)
    out: dict[str, list[Tensor]] = defaultdict(list)
    for b in range(input_ids.shape[0]):
        width = int(lengths[b]) if lengths is not None else input_ids.shape[1]
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        logits = functional_call(model, leaves, (input_ids[b:b + 1, :width],), {"use_cache": False}).logits
        loss = sft_loss_per_example(logits, labels[b:b + 1, :width])[0]
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for name, g in zip(leaves, grads):
            out[name].append(g)
    return {n: torch.stack(gs) for n, gs in out.items()}


# ---------------------------------------------------------------------------------------------------
# The factored path: layer inputs and output gradients from one batched backward pass


@dataclass(frozen=True)
class Site:
    """A module whose weight is a selected parameter: ``kind`` is ``linear`` or ``embedding``."""

    module_name: str
    param_name: str
    kind: Literal["linear", "embedding"]
    out_features: int
    in_features: int
    padding_idx: int | None = None


def factor_sites(model: nn.Module, param_names: Sequence[str] | None = None) -> list[Site]:
    """The linear and embedding modules carrying ``param_names`` (a tied weight has two sites)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    selected = list(param_names) if param_names is not None else weight_matrix_names(model)
    known = set(dict(model.named_parameters()))
    missing = [n for n in selected if n not in known]
    if missing:
        raise ValueError(f"param_names: {missing[:3]} are not parameters of the model")
    sites = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and names.get(id(module.weight)) in selected:
            if isinstance(module, nn.Linear):
                if module.bias is not None and names.get(id(module.bias)) in selected:
                    raise ValueError(f"param_names: the bias of {module_name} is not supported by the factored "
                                     "path; use per_example_gradients for it")
                sites.append(Site(module_name, names[id(module.weight)], "linear", module.out_features,
                                  module.in_features))
            else:
                sites.append(Site(module_name, names[id(module.weight)], "embedding", module.num_embeddings,
                                  module.embedding_dim, module.padding_idx))
    covered = {s.param_name for s in sites}
    uncovered = [n for n in selected if n not in covered]
    if uncovered:
        raise ValueError(f"param_names: {uncovered[:3]} are not the weight of a linear or embedding layer; "
                         "the factored path supports only those (use per_example_gradients)")
    return sites


def _embedding_mask(site: Site, x: Tensor, g: Tensor) -> Tensor:
    """``nn.Embedding`` gives its ``padding_idx`` row no gradient; the factored path must agree."""
    if site.kind != "embedding" or site.padding_idx is None:
        return g
    return g.masked_fill((x == site.padding_idx)[..., None], 0.0)


def _run_with_hooks(model: nn.Module, input_ids: Tensor, labels: Tensor, sites: Sequence[Site],
                    consume: Callable[[Site, Tensor, Tensor], None]) -> Float[Tensor, " batch"]:
    """Forward and backward with hooks; ``consume(site, inputs_or_ids, output_grads)`` per site."""
    _check_batch(input_ids, labels)
    by_module = {s.module_name: s for s in sites}
    modules = dict(model.named_modules())
    embedding = model.get_input_embeddings()
    leaves: list[Tensor] = []
    calls: dict[str, int] = defaultdict(int)
    handles = []

    def make_hook(site: Site | None):
        def hook(module, args, output):
            if module is embedding:
                # A grad-requiring leaf at the embedding output: the backward pass then reaches every
                # layer's activations while no weight gradient is formed.
                output = output.detach().requires_grad_(True)
                leaves.append(output)
            if site is not None:
                calls[site.module_name] += 1
                saved = args[0] if site.kind == "embedding" else args[0].detach()
                output.register_hook(lambda g, s=site, x=saved: consume(s, x, _embedding_mask(s, x, g.detach())))
            return output
        return hook

    try:
        for name, site in by_module.items():
            handles.append(modules[name].register_forward_hook(make_hook(site)))
        if not any(modules[s.module_name] is embedding for s in sites):
            handles.append(embedding.register_forward_hook(make_hook(None)))
        with torch.enable_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits
            losses = sft_loss_per_example(logits, labels)
            torch.autograd.backward(losses.sum(), inputs=leaves)
    finally:
        for handle in handles:
            handle.remove()
    repeated = [n for n, c in calls.items() if c != 1]
    if repeated:
        raise RuntimeError(f"modules {repeated[:3]} ran more than once per forward pass; the factored "
                           "gradient assumes one call per module")
    return losses.detach()


@dataclass
class Factors:
    """Inputs (or token ids) and output gradients of every site, for a batch of examples."""

    sites: list[Site]
    inputs: dict[str, Tensor] = field(default_factory=dict)
    output_grads: dict[str, Tensor] = field(default_factory=dict)
    losses: Tensor | None = None

    @property
    def n(self) -> int:
        return next(iter(self.output_grads.values())).shape[0]

    @property
    def seq_len(self) -> int:
        return max(t.shape[1] for t in self.output_grads.values())

    @property
    def param_names(self) -> list[str]:
        return list(dict.fromkeys(s.param_name for s in self.sites))

    def without(self, param_names: Sequence[str]) -> "Factors":
        """The same factors with the tensors of the sites of ``param_names`` released (kept as empty tensors).

        For weights whose gradients are already formed (:func:`materialise_gradients`): their factors are
        no longer read, and a tensor shared with a site of another weight stays alive through that site.
        """
        dropped = {s.module_name for s in self.sites if s.param_name in set(param_names)}
        hollow = Factors(self.sites, dict(self.inputs), dict(self.output_grads), self.losses)
        for name in dropped:
            for kept in (hollow.inputs, hollow.output_grads):
                t = kept[name]
                kept[name] = t.new_empty((t.shape[0], 0, *t.shape[2:]))
        return hollow

    def take(self, index: Tensor) -> "Factors":
        """The examples at ``index`` (a shared tensor stays shared)."""
        taken = Factors(self.sites, losses=None if self.losses is None else self.losses[index.to(self.losses.device)])
        memo: dict[int, Tensor] = {}
        for kind in ("inputs", "output_grads"):
            for name, t in getattr(self, kind).items():
                if id(t) not in memo:
                    memo[id(t)] = t[index.to(t.device)]
                getattr(taken, kind)[name] = memo[id(t)]
        return taken

    def param_shape(self, param_name: str) -> tuple[int, int]:
        site = next(s for s in self.sites if s.param_name == param_name)
        return site.out_features, site.in_features

    def gradients(self, param_name: str, rows: slice = slice(None)) -> Float[Tensor, "n out in"]:
        """The per-example gradient of ``param_name`` for examples ``rows``: ``sum_t g_t a_t^T`` over its sites.

        Linear sites contribute a batched product over positions; an embedding site adds its output
        gradients into the rows of its token ids, in place.
        """
        sites = [s for s in self.sites if s.param_name == param_name]
        if not sites:
            raise ValueError(f"param_name={param_name!r}: not captured by these factors")
        total = None
        for site in sorted(sites, key=lambda s: s.kind != "linear"):  # linear sites first
            g = self.output_grads[site.module_name][rows]
            if site.kind == "linear":
                part = torch.einsum("bto,bti->boi", g, self.inputs[site.module_name][rows].to(g.dtype))
                total = part if total is None else total.add_(part)
                continue
            ids = self.inputs[site.module_name][rows]
            b, t = ids.shape
            if total is None:
                total = torch.zeros(b, site.out_features, site.in_features, device=g.device, dtype=g.dtype)
            flat = (ids + site.out_features * torch.arange(b, device=ids.device)[:, None]).reshape(-1)
            total.view(b * site.out_features, site.in_features).index_add_(0, flat, g.reshape(b * t, -1))
        return total

    def stackable(self, param_name: str) -> bool:
        """Whether the weight has one linear site, so that :meth:`stacked_gradients` can batch it with others."""
        sites = [s for s in self.sites if s.param_name == param_name]
        return len(sites) == 1 and sites[0].kind == "linear"

    def stacked_gradients(self, param_names: Sequence[str], rows: slice = slice(None)) -> Float[Tensor, "w n d"]:
        """Flattened per-example gradients of several weights of one shape, ``(len(param_names), n, out * in)``.

        Weights with one linear site each (:meth:`stackable`) are formed in one batched product over all
        of them, which spares a kernel launch per weight; any other weight must come alone.
        """
        names = list(param_names)
        if len(names) == 1 and not self.stackable(names[0]):
            return self.gradients(names[0], rows).flatten(1)[None]
        bad = [n for n in names if not self.stackable(n)]
        if bad or len({self.param_shape(n) for n in names}) != 1:
            raise ValueError(f"param_names: expected weights of one shape with one linear site each; "
                             f"{bad[:3] or names[:3]} are not")
        modules = [next(s.module_name for s in self.sites if s.param_name == n) for n in names]
        g = torch.stack([self.output_grads[m][rows] for m in modules])  # (weights, n, T, out)
        x = torch.stack([self.inputs[m][rows] for m in modules]).to(g.dtype)  # (weights, n, T, in)
        return torch.matmul(g.transpose(-1, -2), x).flatten(2)

    @staticmethod
    def concat(parts: Sequence["Factors"]) -> "Factors":
        """One ``Factors`` for several batches (sequences zero-padded to the longest: zero gradients add nothing).

        Sites that share an input tensor (the query, key and value projections of a block) keep sharing
        one concatenated tensor.
        """
        if not parts:
            raise ValueError("parts is empty: expected at least one batch of factors")
        width = max(t.shape[1] for p in parts for t in p.output_grads.values())

        def pad(t: Tensor) -> Tensor:
            if t.shape[1] == width:
                return t
            return nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1]))

        merged = Factors(parts[0].sites)
        memo: dict[tuple, Tensor] = {}
        for site in parts[0].sites:
            key = site.module_name
            for kind in ("inputs", "output_grads"):
                tensors = [getattr(p, kind)[key] for p in parts]
                ident = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors)  # same memory
                if ident not in memo:
                    memo[ident] = tensors[0] if len(tensors) == 1 else torch.cat([pad(t) for t in tensors])
                getattr(merged, kind)[key] = memo[ident]
        merged.losses = torch.cat([p.losses for p in parts])
        return merged


def capture_factors(model: nn.Module, input_ids: Int[Tensor, "batch seq"], labels: Int[Tensor, "batch seq"],
                    param_names: Sequence[str] | None = None, sites: Sequence[Site] | None = None) -> Factors:
    """Inputs and output gradients of every site from one batched forward and backward pass."""
    sites = list(sites) if sites is not None else factor_sites(model, param_names)
    factors = Factors(sites)

    def keep(site: Site, x: Tensor, g: Tensor) -> None:
        factors.inputs[site.module_name] = x
        factors.output_grads[site.module_name] = g

    factors.losses = _run_with_hooks(model, input_ids, labels, sites, keep)
    return factors


def per_example_gradients_factored(model: nn.Module, input_ids: Int[Tensor, "batch seq"],
                                   labels: Int[Tensor, "batch seq"], param_names: Sequence[str] | None = None
                                   ) -> dict[str, Tensor]:
    """Per-example weight gradients ``{name: (batch, out, in)}`` from :func:`capture_factors`."""
    factors = capture_factors(model, input_ids, labels, param_names)
    return {name: factors.gradients(name) for name in factors.param_names}


# ---------------------------------------------------------------------------------------------------
# Projections


class GradientProjection:
    """Factored projectors for every selected weight at each dimension of ``proj_dims``.

    The projector of weight ``name`` at dimension ``k`` is seeded with ``derive_seed(seed, name, k)``, so
    every run, partition and process uses the same matrices. A tied weight's two sites share theirs.
    """

    def __init__(self, model: nn.Module, proj_dims: Sequence[int], seed: int, kind: ProjectionKind = "rademacher",
                 param_names: Sequence[str] | None = None, device: torch.device | str = "cpu"):
        dims = list(proj_dims)
        bad = [k for k in dims if isinstance(k, bool) or not isinstance(k, int) or k <= 0]
        if not dims or bad:
            raise ValueError(f"proj_dims={dims!r}: expected a non-empty list of projection dimensions >= 1")
        self.sites = factor_sites(model, param_names)
        self.proj_dims = dims
        self.seed = seed
        self.kind = kind
        shapes = {s.param_name: (s.out_features, s.in_features) for s in self.sites}
        self.projectors = {(name, k): FactoredProjector(out, inp, k, derive_seed(seed, name, k), kind, str(device))
                           for name, (out, inp) in shapes.items() for k in dims}

    @property
    def param_names(self) -> list[str]:
        return list(dict.fromkeys(s.param_name for s in self.sites))

    def project_site(self, site: Site, k: int, x: Tensor, g: Tensor) -> Float[Tensor, "batch proj"]:
        projector = self.projectors[(site.param_name, k)]
        if site.kind == "linear":
            return projector.project_factors(x, g)
        return projector.project_embedding(x, g)

    def project(self, factors: Factors) -> dict[int, dict[str, Tensor]]:
        """``{k: {weight: (n, k)}}`` from captured factors (the same numbers as :func:`projected_gradients`)."""
        out: dict[int, dict[str, Tensor]] = {k: {} for k in self.proj_dims}
        for site in self.sites:
            x, g = factors.inputs[site.module_name], factors.output_grads[site.module_name]
            for k in self.proj_dims:
                part = self.project_site(site, k, x, g)
                previous = out[k].get(site.param_name)
                out[k][site.param_name] = part if previous is None else previous + part
        return out

    def project_gradients(self, grads: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """The same projections applied to materialised per-example gradients (the reference)."""
        return {k: {name: self.projectors[(name, k)].project_gradient(grads[name]) for name in self.param_names}
                for k in self.proj_dims}


def projected_gradients(model: nn.Module, input_ids: Int[Tensor, "batch seq"], labels: Int[Tensor, "batch seq"],
                        projection: GradientProjection) -> dict[int, dict[str, Tensor]]:
    """``{k: {weight name: (batch, k)}}``: factored projections of every per-example weight gradient.

    Each site is projected inside its backward hook and its factors are dropped at once, so memory does
    not grow with the number of layers or of examples.
    """
    out: dict[int, dict[str, Tensor]] = {k: {} for k in projection.proj_dims}

    def project(site: Site, x: Tensor, g: Tensor) -> None:
        for k in projection.proj_dims:
            part = projection.project_site(site, k, x, g)
            previous = out[k].get(site.param_name)
            out[k][site.param_name] = part if previous is None else previous + part

    _run_with_hooks(model, input_ids, labels, projection.sites, project)
    return out


def projected_features(model: nn.Module, encoding: ChatEncoding, start: int, end: int,
                       projection: GradientProjection, batch_size: int) -> dict[str, Tensor]:
    """Projected gradients of examples ``start:end`` as store tensors ``{"k{k}/{weight}": (end-start, k)}``."""
    require_int("batch_size", batch_size, minimum=1)
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for lo in range(start, end, batch_size):
        batch = encoding.select(lo, min(lo + batch_size, end))
        projected = projected_gradients(model, batch.input_ids.to(device), batch.labels.to(device), projection)
        for k, per_param in projected.items():
            for name, value in per_param.items():
                parts[f"k{k}/{name}"].append(value.float().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def capture_rows(model: nn.Module, encoding: ChatEncoding, start: int, end: int, sites: Sequence[Site],
                 batch_size: int) -> Factors:
    """:func:`capture_factors` for examples ``start:end`` in batches of ``batch_size``, concatenated."""
    device = next(model.parameters()).device
    parts = []
    for lo in range(start, end, batch_size):
        batch = encoding.select(lo, min(lo + batch_size, end))
        parts.append(capture_factors(model, batch.input_ids.to(device), batch.labels.to(device), sites=sites))
    return Factors.concat(parts)


def _site_terms(f: Factors, site: Site, rows: slice) -> tuple[Tensor, Tensor]:
    """``(U, W)`` with the site's per-example gradient ``U^T W``: ``U`` are output gradients (or token ids)."""
    return f.inputs[site.module_name][rows] if site.kind == "embedding" else f.output_grads[site.module_name][rows], \
        f.output_grads[site.module_name][rows] if site.kind == "embedding" else f.inputs[site.module_name][rows]


def _output_side_products(site_a: Site, ua: Tensor, site_b: Site, ub: Tensor, dtype: torch.dtype) -> Tensor:
    """``u_{i,t} . u_{j,s}`` for all examples and positions, ``(n_a, n_b, T_a, T_b)``; ids stand for one-hots."""
    if site_a.kind == "linear" and site_b.kind == "linear":
        return torch.einsum("ato,bso->abts", ua.to(dtype), ub.to(dtype))
    if site_a.kind == "embedding" and site_b.kind == "embedding":
        return (ua[:, None, :, None] == ub[None, :, None, :]).to(dtype)
    if site_a.kind == "embedding":  # one-hot(x_{i,t}) . g_{j,s} = g_{j,s}[x_{i,t}]
        picked = ub.to(dtype)[:, :, ua.reshape(-1)].reshape(ub.shape[0], ub.shape[1], *ua.shape)
        return picked.permute(2, 0, 3, 1)
    return _output_side_products(site_b, ub, site_a, ua, dtype).permute(1, 0, 3, 2)


def _ghost_dots(a: Factors, b: Factors, name: str, rows_a: slice, rows_b: slice, dtype: torch.dtype) -> Tensor:
    """``<G_i, G_j> = sum_{t,s} (u_it . u_js)(w_it . w_js)`` summed over the weight's pairs of sites."""
    sites = [s for s in a.sites if s.param_name == name]
    total = None
    for site_a in sites:
        ua, wa = _site_terms(a, site_a, rows_a)
        for site_b in sites:
            ub, wb = _site_terms(b, site_b, rows_b)
            uu = _output_side_products(site_a, ua, site_b, ub, dtype)
            ww = torch.einsum("ati,bsi->abts", wa.to(dtype), wb.to(dtype))
            part = (uu * ww).sum((2, 3))
            total = part if total is None else total + part
    return total


def _paired_output_products(site_a: Site, ua: Tensor, site_b: Site, ub: Tensor, dtype: torch.dtype) -> Tensor:
    """``u_{i,t} . u'_{i,s}`` within each example (two sites of one weight), ``(n, T, T)``."""
    if site_a.kind == "linear" and site_b.kind == "linear":
        return torch.einsum("ato,aso->ats", ua.to(dtype), ub.to(dtype))
    if site_a.kind == "embedding" and site_b.kind == "embedding":
        return (ua[:, :, None] == ub[:, None, :]).to(dtype)
    if site_a.kind == "embedding":  # g_{i,s}[x_{i,t}]
        n, t = ua.shape
        picked = torch.gather(ub.to(dtype), 2, ua[:, None, :].expand(n, ub.shape[1], t))  # (n, s, t)
        return picked.transpose(1, 2)
    return _paired_output_products(site_b, ub, site_a, ua, dtype).transpose(1, 2)


def _ghost_sqnorms(f: Factors, name: str, dtype: torch.dtype) -> Tensor:
    """Squared norm of each example's gradient of ``name`` by the ghost identity, all examples at once."""
    sites = [s for s in f.sites if s.param_name == name]
    total = None
    for site_a in sites:
        ua, wa = _site_terms(f, site_a, slice(None))
        for site_b in sites:
            ub, wb = _site_terms(f, site_b, slice(None))
            uu = _paired_output_products(site_a, ua, site_b, ub, dtype)
            part = (uu * torch.einsum("ati,asi->ats", wa.to(dtype), wb.to(dtype))).sum((1, 2))
            total = part if total is None else total + part
    return total


def gram_costs(a: Factors, b: Factors, name: str, max_elements: int, a_formed: bool = False) -> dict[str, float]:
    """Multiply-adds of the two exact methods for one weight: materialised gradients or the ghost identity.

    ``a_formed``: the gradients of ``a`` are already materialised (:func:`materialise_gradients`), so only
    those of ``b`` are formed, once.
    """
    out, inp = a.param_shape(name)
    n_sites = sum(s.param_name == name for s in a.sites)
    t_a, t_b = a.seq_len, b.seq_len
    rows = max(1, max_elements // (out * inp))
    chunks_a = 1 if a_formed else -(-a.n // rows)
    formed_a = 0 if a_formed else a.n * t_a
    # Materialising writes and reads every gradient entry: bound by memory traffic, so counted twice.
    materialise = 2 * (n_sites * out * inp * (formed_a + chunks_a * b.n * t_b) + a.n * b.n * out * inp)
    ghost = n_sites ** 2 * a.n * b.n * t_a * t_b * (out + inp) + (a.n * t_a ** 2 + b.n * t_b ** 2) * (out + inp)
    return {"materialise": float(materialise), "ghost": float(ghost)}


def _sqnorms(rows: Tensor, width: int) -> Tensor:
    """Squared norms of flattened ``(..., out * width)`` gradients: each matrix row's norm in the gradient's
    dtype, their squares summed in float64 (one float32 sum over a 28M-entry table would lose digits)."""
    per_row = torch.linalg.vector_norm(rows.unflatten(-1, (-1, width)), dim=-1)
    return per_row.double().square().sum(-1)


def _row_dots(a: Tensor, b: Tensor, width: int, max_elements: int) -> Tensor:
    """``a @ b.T`` in float64 for flattened ``(n, out * width)`` gradients: one batched product per matrix row
    in the gradients' dtype, the rows' partial dots summed in float64.

    Splitting the long reduction keeps every multiprocessor busy (a single ``(n_a, d) @ (d, n_b)`` product
    of a few dozen rows runs on a handful of them: ten times slower on an H100 for SmolLM2's MLP weights)
    and, as for :func:`_sqnorms`, sums the millions of terms of a large table in float64. The views are
    strided, never copied; the partial products are taken for as many matrix rows at a time as fit in
    ``max_elements`` numbers.
    """
    rows_a = a.view(a.shape[0], -1, width).transpose(0, 1)  # (out, n_a, width)
    rows_b = b.view(b.shape[0], -1, width).permute(1, 2, 0)  # (out, width, n_b)
    step = max(1, max_elements // (a.shape[0] * b.shape[0]))
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for lo in range(0, rows_a.shape[0], step):
        total += torch.bmm(rows_a[lo:lo + step], rows_b[lo:lo + step]).double().sum(0)
    return total


def weight_stacks(f: Factors, names: Sequence[str]) -> list[list[str]]:
    """``names`` in stacks that :meth:`Factors.stacked_gradients` forms together: the weights of one shape
    with one linear site each (the same projection in every transformer layer), any other weight alone.
    Stacks are ordered by their first weight, in the order of ``names``."""
    stacks: dict[object, list[str]] = {}
    for name in names:
        stacks.setdefault(f.param_shape(name) if f.stackable(name) else name, []).append(name)
    return list(stacks.values())


def _chunks(n_weights: int, n_rows: int, size: int, max_elements: int) -> list[tuple[slice, slice]]:
    """``(weights, rows)`` chunks of a ``(n_weights, n_rows, size)`` stack of at most ``max_elements``
    numbers (one row of one weight when even that is larger)."""
    rows = max(1, min(n_rows, max_elements // size))
    weights = max(1, max_elements // (rows * size)) if rows == n_rows else 1
    return [(slice(w, w + weights), slice(r, r + rows))
            for w in range(0, n_weights, weights) for r in range(0, n_rows, rows)]


class FormedGradients(Mapping[str, Tensor]):
    """Per-example gradients of several weights, formed once (:func:`materialise_gradients`).

    ``stacks`` pairs a list of weights of one shape with their gradients ``(weights, n, out * in)`` and
    their squared norms ``(weights, n)`` in float64; ``self[name]`` is one weight's ``(n, out * in)``.
    """

    def __init__(self, stacks: Sequence[tuple[list[str], Tensor, Tensor]]):
        self.stacks = list(stacks)
        self._where = {name: (i, j) for i, (names, _, _) in enumerate(self.stacks) for j, name in enumerate(names)}

    @classmethod
    def of(cls, gradients: Mapping[str, Tensor], widths: Mapping[str, int]) -> "FormedGradients":
        """Each of ``{name: (n, out * in)}`` as a stack of its own (``widths``: each weight's ``in``)."""
        if isinstance(gradients, FormedGradients):
            return gradients
        return cls([([name], g[None], _sqnorms(g, widths[name])[None]) for name, g in gradients.items()])

    def __getitem__(self, name: str) -> Tensor:
        i, j = self._where[name]
        return self.stacks[i][1][j]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def materialise_gradients(f: Factors, names: Sequence[str], max_elements: int = 1 << 28) -> FormedGradients:
    """The flattened per-example gradients of ``names``, formed once: ``result[name]`` is ``(n, out * in)``.

    Passed to :func:`factor_gram` as ``a_gradients``, they spare re-forming the same examples' gradients
    against every new batch of the other side (the keys of a store partition against blocks of queries).
    Weights of one shape are formed and kept as one stack (:func:`weight_stacks`), in chunks of at most
    ``max_elements`` numbers; the result holds ``n`` times the weights' size.
    """
    require_int("max_elements", max_elements, minimum=1)
    stacks = []
    for group in weight_stacks(f, names):
        out, inp = f.param_shape(group[0])
        formed = sqnorms = None
        for weights, rows in _chunks(len(group), f.n, out * inp, max_elements):
            part = f.stacked_gradients(group[weights], rows)
            if formed is None:
                formed = part.new_empty((len(group), f.n, out * inp))
                sqnorms = torch.empty(len(group), f.n, dtype=torch.float64, device=part.device)
            formed[weights, rows] = part
            sqnorms[weights, rows] = _sqnorms(part, inp)
            del part
        stacks.append((group, formed, sqnorms))
    return FormedGradients(stacks)


def factor_gram(a: Factors, b: Factors, max_elements: int = 1 << 28, method: str = "auto",
                a_gradients: Mapping[str, Tensor] | None = None
                ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Exact per-weight inner products ``<grad_i, grad_j>`` of the examples of ``a`` and ``b``.

    Returns ``(dots {name: (n_a, n_b)}, squared norms of a {name: (n_a,)}, of b {name: (n_b,)})`` in float64,
    on the CPU.
    Two exact methods: ``"materialise"`` forms the gradients weight by weight, in row chunks of at most
    ``max_elements`` numbers; ``"ghost"`` never forms them and uses
    ``<sum_t u_t w_t^T, sum_s u'_s w'_s^T> = sum_{t,s} (u_t . u'_s)(w_t . w'_s)``, cheaper for short
    sequences and few examples. ``"auto"`` picks the cheaper one per weight (:func:`gram_costs`).
    ``a_gradients`` (from :func:`materialise_gradients`, or any ``{name: (n_a, out * in)}``) holds already
    formed gradients of ``a`` for some weights: those weights use them and form only the gradients of
    ``b``, a stack of weights of one shape at a time.
    """
    require_choice("method", method, ["auto", "materialise", "ghost"])
    require_int("max_elements", max_elements, minimum=1)
    given = a_gradients or {}
    unknown = [n for n in given if n not in a.param_names]
    if unknown:
        raise ValueError(f"a_gradients: {unknown[:3]} are not weights of these factors")
    for name in given:
        out, inp = a.param_shape(name)
        if given[name].shape != (a.n, out * inp):
            raise ValueError(f"a_gradients[{name!r}] has shape {tuple(given[name].shape)}: expected "
                             f"({a.n}, {out * inp})")
    formed = FormedGradients.of(given, {n: a.param_shape(n)[1] for n in given})
    device = next(iter(b.output_grads.values())).device
    stacked = []  # (names, dots (w, n_a, n_b), squared norms of a (w, n_a), of b (w, n_b)) on the device
    for names, stack, sqnorms in formed.stacks:
        out, inp = a.param_shape(names[0])
        dot = torch.empty(len(names), a.n, b.n, dtype=torch.float64, device=device)
        norm_b = torch.empty(len(names), b.n, dtype=torch.float64, device=device)
        for weights, rows in _chunks(len(names), b.n, out * inp, max_elements):
            gb = b.stacked_gradients(names[weights], rows)
            norm_b[weights, rows] = _sqnorms(gb, inp)
            for j, w in enumerate(range(len(names))[weights]):
                dot[w, :, rows] = _row_dots(stack[w], gb[j], inp, max_elements)
            del gb
        stacked.append((names, dot, sqnorms, norm_b))
    for name in a.param_names:
        if name in formed:
            continue
        out, inp = a.param_shape(name)
        chosen = method
        if chosen == "auto":
            costs = gram_costs(a, b, name, max_elements)
            chosen = min(costs, key=costs.get)
        dtype = next(iter(a.output_grads.values())).dtype
        rows = max(1, max_elements // (out * inp))
        if chosen == "ghost":
            per_pair = max(1, max_elements // max(1, b.n * b.seq_len * a.seq_len))
            dot = torch.cat([_ghost_dots(a, b, name, slice(lo, lo + per_pair), slice(None), dtype).double()
                             for lo in range(0, a.n, per_pair)])
            norm_a, norm_b = (_ghost_sqnorms(f, name, dtype).double() for f in (a, b))
        else:
            dot = torch.empty(a.n, b.n, dtype=torch.float64, device=device)
            norm_a = torch.empty(a.n, dtype=torch.float64, device=device)
            norm_b = torch.empty(b.n, dtype=torch.float64, device=device)
            for lo in range(0, a.n, rows):  # row chunks of a's gradients, formed chunk by chunk
                ga = a.gradients(name, slice(lo, lo + rows)).flatten(1)
                norm_a[lo:lo + ga.shape[0]] = _sqnorms(ga, inp)
                for lo_b in range(0, b.n, rows):
                    gb = b.gradients(name, slice(lo_b, lo_b + rows)).flatten(1)
                    if lo == 0:
                        norm_b[lo_b:lo_b + gb.shape[0]] = _sqnorms(gb, inp)
                    dot[lo:lo + ga.shape[0], lo_b:lo_b + gb.shape[0]] = _row_dots(ga, gb, inp, max_elements)
        stacked.append(([name], dot[None], norm_a[None], norm_b[None]))
    # one transfer per stack at the end rather than a device synchronisation per weight; model order
    parts: tuple[dict[str, Tensor], ...] = ({}, {}, {})
    for names, *tensors in stacked:
        for part, tensor in zip(parts, tensors):
            part.update(zip(names, tensor.cpu()))
    return tuple({n: part[n] for n in a.param_names} for part in parts)
