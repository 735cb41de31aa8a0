"""The gradient passes of the gradient-similarity chapter (03), one store partition at a time.

Two passes, each a function of a partition ``[start, end)`` of the training examples so that
:func:`imprint.gradients.store.fill_partitions` can resume it and separate processes can share it:

* :func:`projected_rows`: the factored projections of the examples' gradients at every dimension, for
  any set of examples (the training set, each variant set); the cheap pass, one backward pass per
  example.
* :func:`exact_rows`: the exact inner products between the partition's training examples and every
  variant of every setting, with the squared norms of both. The partition's layer inputs and output
  gradients stay in memory while the variants stream through in batches; the projections of both
  sides come from the same backward passes. Each partition keeps the projections of the variants with
  the same row indices as its training examples (there is one variant per example), and the variants'
  squared norms as *shared* tensors, the same in every partition (checked when the store is loaded).

:func:`exact_gram` and :func:`projected_gram` turn loaded tensors into :class:`~imprint.gradients.
similarity.Gram` objects with the variants as queries and the training examples as keys.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from imprint.data.text import ChatEncoding
from imprint.gradients.per_example import GradientProjection, Site, capture_rows, factor_gram
from imprint.gradients.similarity import Gram
from imprint.runtime.checks import require_int

EXACT_SHARED = ("query_sqnorm/",)


def projected_rows(model: nn.Module, encoding: ChatEncoding, start: int, end: int, projection: GradientProjection,
                   batch_size: int) -> dict[str, Tensor]:
    """``{"k{k}/{weight}": (end - start, k)}``: projected gradients of examples ``start:end``."""
    from imprint.gradients.per_example import projected_features

    return projected_features(model, encoding, start, end, projection, batch_size)


def _flatten_projected(prefix: str, projected: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{prefix}k{k}/{name}": value.float().cpu() for k, per in projected.items() for name, value in per.items()}


def exact_rows(model: nn.Module, train: ChatEncoding, variants: Mapping[str, ChatEncoding], start: int, end: int,
               sites: Sequence[Site], batch_size: int, projection: GradientProjection | None = None,
               max_elements: int = 1 << 28, method: str = "auto", query_block: int | None = None
               ) -> dict[str, Tensor]:
    """Store tensors for training examples ``start:end`` against every variant of every setting.

    Variants are captured ``query_block`` at a time (in backward passes of ``batch_size``); a larger block
    re-forms the training examples' gradients fewer times at the cost of memory.

    Rows (``end - start``): ``dot/{setting}/{weight}`` (rows, n_variants), ``sqnorm/{weight}`` and, with a
    projection, ``train/k{k}/{weight}`` and ``query/{setting}/k{k}/{weight}`` (the variants ``start:end``).
    Shared: ``query_sqnorm/{setting}/{weight}`` (n_variants,).
    """
    require_int("batch_size", batch_size, minimum=1)
    block = require_int("query_block", query_block if query_block is not None else batch_size, minimum=1)
    for setting, encoding in variants.items():
        if len(encoding) != len(train):
            raise ValueError(f"variants[{setting!r}] has {len(encoding)} examples: expected one per training "
                             f"example ({len(train)})")
    keys = capture_rows(model, train, start, end, sites, batch_size)
    tensors: dict[str, Tensor] = {}
    if projection is not None:
        tensors.update(_flatten_projected("train/", projection.project(keys)))
    key_norms: dict[str, Tensor] = {}
    for setting, encoding in variants.items():
        dots: dict[str, list[Tensor]] = defaultdict(list)
        query_norms: dict[str, list[Tensor]] = defaultdict(list)
        query_features: dict[str, list[Tensor]] = defaultdict(list)
        for lo in range(0, len(encoding), block):
            queries = capture_rows(model, encoding, lo, min(lo + block, len(encoding)), sites, batch_size)
            dot, sq_keys, sq_queries = factor_gram(keys, queries, max_elements, method)
            for name in dot:
                dots[name].append(dot[name])
                query_norms[name].append(sq_queries[name])
                key_norms.setdefault(name, sq_keys[name])
            mine = slice(max(start, lo) - lo, max(0, min(end, lo + queries.n) - lo))
            if projection is not None and mine.stop > mine.start:
                for key, value in _flatten_projected(f"query/{setting}/", projection.project(queries)).items():
                    query_features[key].append(value[mine])
            del queries
        for name in dots:
            tensors[f"dot/{setting}/{name}"] = torch.cat(dots[name], dim=1)
            tensors[f"query_sqnorm/{setting}/{name}"] = torch.cat(query_norms[name])
        tensors.update({key: torch.cat(parts) for key, parts in query_features.items()})
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
