"""The gradient passes of the gradient-similarity chapter (03), one store partition at a time.

Two passes, each a function of a partition ``[start, end)`` of the training examples so that
:func:`imprint.gradients.store.fill_partitions` can resume it and separate processes can share it:

* :func:`projected_rows`: the factored projections of the examples' gradients at every dimension, for
  any set of examples (the training set, each variant set); the cheap pass, one backward pass per
  example.
* :func:`exact_rows`: the exact inner products between the partition's training examples and every
  variant of every setting, with the squared norms of both. The partition's layer inputs and output
  gradients stay in memory while the variants stream through in batches; the training examples'
  projections come from the same backward pass as their factors. Each partition keeps the projections of
  the variants with the same row indices as its training examples (there is one variant per example;
  projected in a pass of their own), and the variants' squared norms as *shared* tensors, the same in
  every partition (checked when the store is loaded).

:func:`exact_gram` and :func:`projected_gram` turn loaded tensors into :class:`~imprint.gradients.
similarity.Gram` objects with the variants as queries and the training examples as keys.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from imprint.data.text import ChatEncoding
from imprint.gradients.per_example import (Factors, GradientProjection, Site, capture_rows, factor_gram, gram_costs,
                                           materialise_gradients, projected_features)
from imprint.gradients.similarity import Gram
from imprint.runtime.checks import require_choice, require_int

EXACT_SHARED = ("query_sqnorm/",)


def projected_rows(model: nn.Module, encoding: ChatEncoding, start: int, end: int, projection: GradientProjection,
                   batch_size: int) -> dict[str, Tensor]:
    """``{"k{k}/{weight}": (end - start, k)}``: projected gradients of examples ``start:end``."""
    return projected_features(model, encoding, start, end, projection, batch_size)


def _flatten_projected(prefix: str, projected: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{prefix}k{k}/{name}": value.float().cpu() for k, per in projected.items() for name, value in per.items()}


def keys_to_form(keys: Factors, max_elements: int, method: str, budget: int) -> list[str]:
    """The weights whose key gradients :func:`exact_rows` forms once, in model order, within ``budget`` numbers.

    Only weights that the chosen ``method`` would materialise anyway qualify (with ``"auto"``, those for
    which materialising formed keys is cheaper than the ghost identity, the keys standing in for the
    queries' lengths).
    """
    require_int("budget", budget, minimum=0)
    if method == "ghost":
        return []
    chosen, used = [], 0
    for name in keys.param_names:
        out, inp = keys.param_shape(name)
        if method == "auto":
            costs = gram_costs(keys, keys, name, max_elements, a_formed=True)
            if costs["ghost"] < costs["materialise"]:
                continue
        if used + keys.n * out * inp <= budget:
            chosen.append(name)
            used += keys.n * out * inp
    return chosen


def _half_device_memory(model: nn.Module) -> int:
    """Numbers of the model's dtype that fill half of its CUDA device's memory; 0 off CUDA."""
    weight = next(model.parameters())
    if weight.device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(weight.device).total_memory // 2 // weight.element_size()


def exact_rows(model: nn.Module, train: ChatEncoding, variants: Mapping[str, ChatEncoding], start: int, end: int,
               sites: Sequence[Site], batch_size: int, projection: GradientProjection | None = None,
               max_elements: int = 1 << 28, method: str = "auto", query_block: int | None = None,
               key_elements: int | None = None, length_order: bool = True) -> dict[str, Tensor]:
    """Store tensors for training examples ``start:end`` against every variant of every setting.

    Variants are captured ``query_block`` at a time (in backward passes of ``batch_size``); a larger block
    re-forms the training examples' gradients fewer times at the cost of memory. ``key_elements`` bounds
    how many numbers of formed training-example gradients are kept for the whole partition
    (:func:`keys_to_form`); those weights are formed once instead of once per block. ``None``: half the
    memory of a CUDA device, none on other devices. ``length_order``: variants are captured in order of
    length (less padding), their results put back in dataset order.

    Rows (``end - start``): ``dot/{setting}/{weight}`` (rows, n_variants), ``sqnorm/{weight}`` and, with a
    projection, ``train/k{k}/{weight}`` and ``query/{setting}/k{k}/{weight}`` (the variants ``start:end``).
    Shared: ``query_sqnorm/{setting}/{weight}`` (n_variants,).
    """
    require_int("batch_size", batch_size, minimum=1)
    if key_elements is None:
        key_elements = _half_device_memory(model)
    require_int("key_elements", key_elements, minimum=0)
    require_choice("method", method, ["auto", "materialise", "ghost"])
    block = require_int("query_block", query_block if query_block is not None else batch_size, minimum=1)
    for setting, encoding in variants.items():
        if len(encoding) != len(train):
            raise ValueError(f"variants[{setting!r}] has {len(encoding)} examples: expected one per training "
                             f"example ({len(train)})")
    keys = capture_rows(model, train, start, end, sites, batch_size)
    tensors: dict[str, Tensor] = {}
    if projection is not None:
        tensors.update(_flatten_projected("train/", projection.project(keys)))
    formed = materialise_gradients(keys, keys_to_form(keys, max_elements, method, key_elements), max_elements)
    keys = keys.without(list(formed))
    key_norms: dict[str, Tensor] = {}
    for setting, encoding in variants.items():
        # Blocks of similar lengths: a batch is as wide as its longest sequence, so sorting the variants
        # by length spares most of the padding in the forward and backward passes and the formed gradients.
        order = torch.argsort(encoding.lengths, stable=True) if length_order else torch.arange(len(encoding))
        by_length = encoding.take(order)
        dots: dict[str, list[Tensor]] = defaultdict(list)
        query_norms: dict[str, list[Tensor]] = defaultdict(list)
        for lo in range(0, len(encoding), block):
            queries = capture_rows(model, by_length, lo, min(lo + block, len(encoding)), sites, batch_size)
            dot, sq_keys, sq_queries = factor_gram(keys, queries, max_elements, method, formed)
            for name in dot:
                dots[name].append(dot[name])
                query_norms[name].append(sq_queries[name])
                key_norms.setdefault(name, sq_keys[name])
            del queries
        inverse = torch.argsort(order)
        for name in dots:
            tensors[f"dot/{setting}/{name}"] = torch.cat(dots[name], dim=1)[:, inverse]
            tensors[f"query_sqnorm/{setting}/{name}"] = torch.cat(query_norms[name])[inverse]
        if projection is not None:
            # The partition's own variants, projected in one pass of their own: in length order they are
            # scattered over nearly every block, and projecting a row or two per block costs more than
            # capturing them again.
            tensors.update({f"query/{setting}/{key}": value for key, value in
                            projected_features(model, encoding, start, end, projection, batch_size).items()})
    tensors.update({f"sqnorm/{name}": value for name, value in key_norms.items()})
    return tensors


def exact_gram(tensors: Mapping[str, Tensor], setting: str, names: Sequence[str]) -> Gram:
    """Variants of ``setting`` (queries) against the training examples (keys), per weight, exact."""
    return Gram({n: tensors[f"dot/{setting}/{n}"].T.contiguous() for n in names},
                {n: tensors[f"query_sqnorm/{setting}/{n}"] for n in names},
                {n: tensors[f"sqnorm/{n}"] for n in names})


def features(tensors: Mapping[str, Tensor], prefix: str, k: int, names: Sequence[str]) -> dict[str, Tensor]:
    """``{weight: (n, k)}`` from keys ``{prefix}k{k}/{weight}``."""
    return {n: tensors[f"{prefix}k{k}/{n}"] for n in names}


def projected_gram(train_features: Mapping[str, Tensor], variant_features: Mapping[str, Tensor]) -> Gram:
    """Variants (queries) against the training examples (keys), per weight, from projected gradients."""
    return Gram.from_features(variant_features, train_features)
