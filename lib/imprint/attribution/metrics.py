"""Ranking metrics of an attribution on HOPS (chapter 07): how well a score matrix finds each query's
relevant training documents, with bootstrap intervals over queries and a paired test between methods.

A score matrix ``scores[i, j]`` says how much document j is credited for query i's answer (higher:
more); ``relevant[i, j]`` marks the documents of query i's function family
(:func:`imprint.data.hops.relevance_mask`). Each query's documents are ranked by decreasing score. Tied scores are ranked by document index
(``ties="index"``, a stable sort on ``(-score, j)``): deterministic, and neutral on average when the
corpus order is unrelated to relevance, as in the shuffled HOPS corpus; ``ties="pessimistic"`` ranks the
non-relevant documents of a tie first, so a constant score gets the worst ranking. The ROC-AUC does not
rank at all: it counts a tied relevant/non-relevant pair as one half.

Per query, with R relevant documents among n and ``rel_r`` whether the document at rank r is relevant:

* ``recall@k`` = (relevant in the top k) / R, ``precision@k`` = (relevant in the top k) / k,
  ``hit@k`` = 1 if any relevant document is in the top k;
* ``rr`` = 1 / (rank of the first relevant document);
* ``ap`` = (1/R) sum_r rel_r * precision@r, the average precision;
* ``auc`` = P(score of a relevant document > score of a non-relevant one) + P(equal) / 2, over all
  R (n - R) pairs.

:func:`summarise` averages them over queries with percentile-bootstrap intervals, overall and per group
of queries (base against wrapper queries); :func:`paired_difference` compares two methods on the same
queries; :func:`composition_at_k` says what kind of document fills the top k (:func:`hops_categories`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from imprint.data.hops import HopsDocument, HopsFunction, HopsQuery, relevance_mask
from imprint.runtime.checks import require_choice, require_float, require_int

HOPS_CATEGORIES = ("constant", "identity", "same answer", "distractor", "other")
TIES = ("index", "pessimistic")


# ---------------------------------------------------------------------------------------------------
# Checks


def _require_level(level) -> float:
    level = require_float("level", level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: expected a number in (0, 1)")
    return level


def _require_scores(scores: Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: expected (queries, documents)")
    if not torch.is_floating_point(scores):
        raise ValueError(f"scores has dtype {scores.dtype}: expected a floating-point tensor")
    bad = torch.isnan(scores).any(1)
    if bad.any():
        raise ValueError(f"scores holds NaN for queries {_some(bad)}: expected a number for every document")


def _require_same_shape(name: str, value: Tensor, shape: torch.Size) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(value.shape)}: expected the shape of scores, "
                         f"{tuple(shape)}")


def _require_k(name: str, k, n: int) -> int:
    return require_int(name, k, minimum=1, maximum=n)


def _some(rows: Tensor, at_most: int = 10) -> str:
    index = torch.nonzero(rows).flatten().tolist()
    head = ", ".join(map(str, index[:at_most]))
    return f"[{head}{', ...' if len(index) > at_most else ''}] ({len(index)} of {rows.numel()})"


def _per_query_vector(name: str, value, length: int | None = None) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != 1 or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} is {shape}: expected a non-empty 1-D tensor of per-query values")
    if length is not None and value.numel() != length:
        raise ValueError(f"{name} has {value.numel()} values: expected one per query ({length})")
    value = value.detach().to("cpu", torch.float64)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds non-finite values at {_some(~torch.isfinite(value))}: expected "
                         "numbers")
    return value


# ---------------------------------------------------------------------------------------------------
# Ranking


def rank_order(scores: Float[Tensor, "q n"], relevant: Bool[Tensor, "_q _n"] | None = None,
               ties: str = "index") -> Int[Tensor, "q n"]:
    """``order[i, r]``: the document at rank r (0-based) of query i, by decreasing score; ties by document
    index, or with ``ties="pessimistic"`` non-relevant documents first (then by index)."""
    require_choice("ties", ties, TIES)
    if ties == "index":
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    if relevant is None:
        raise ValueError("relevant=None with ties='pessimistic': expected the relevance mask")
    first = torch.sort(relevant.to(torch.uint8), dim=1, stable=True).indices
    within = torch.sort(scores.gather(1, first), dim=1, descending=True, stable=True).indices
    return first.gather(1, within)


def ranking_metrics(scores: Float[Tensor, "q n"], relevant: Bool[Tensor, "_q _n"],
                    ks: Sequence[int] = (1, 5, 10), ties: str = "index") -> dict[str, Float[Tensor, " q"]]:
    """Per-query ``recall@k``, ``precision@k`` and ``hit@k`` for each k of ``ks``, then ``rr``, ``ap`` and
    ``auc`` (defined in the module docstring), as float64 tensors of length q on the device of ``scores``.

    ``relevant`` must have the shape of ``scores`` and mark, for every query, at least one relevant and
    one non-relevant document (else recall, AP and AUC are undefined); every k lies in ``1..n``.
    """
    _require_scores(scores)
    _require_same_shape("relevant", relevant, scores.shape)
    if relevant.dtype != torch.bool:
        raise ValueError(f"relevant has dtype {relevant.dtype}: expected a boolean mask")
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
        raise ValueError(f"ks={ks!r}: expected a non-empty list of integers in 1..{scores.shape[1]}")
    ks = list(dict.fromkeys(_require_k(f"ks[{i}]", k, scores.shape[1]) for i, k in enumerate(ks)))
    require_choice("ties", ties, TIES)
    n_rel = relevant.sum(1)
    if (n_rel == 0).any():
        raise ValueError(f"relevant marks no document for queries {_some(n_rel == 0)}: expected at least "
                         "one relevant document per query")
    if (n_rel == scores.shape[1]).any():
        raise ValueError(f"relevant marks every document for queries {_some(n_rel == scores.shape[1])}: "
                         "expected at least one non-relevant document per query")

    n = scores.shape[1]
    order = rank_order(scores, relevant, ties)
    hits = relevant.gather(1, order).double()
    found = hits.cumsum(1)
    n_rel = n_rel.double()
    out = {}
    for k in ks:
        at_k = found[:, k - 1]
        out[f"recall@{k}"] = at_k / n_rel
        out[f"precision@{k}"] = at_k / k
        out[f"hit@{k}"] = (at_k > 0).double()
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)
    out["rr"] = 1.0 / ((found == 0).sum(1).double() + 1.0)
    out["ap"] = (hits * found / positions).sum(1) / n_rel
    out["auc"] = _auc(scores.gather(1, order), hits, n_rel)
    return out


def _auc(ranked: Tensor, hits: Tensor, n_rel: Tensor) -> Tensor:
    """AUC from the ranked scores: a relevant document beats the non-relevant ones outside and above its
    tie group, and half of those inside it."""
    q, n = ranked.shape
    start = torch.ones_like(ranked, dtype=torch.bool)
    start[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    group = start.cumsum(1) - 1
    misses = 1.0 - hits
    flat = (group + n * torch.arange(q, device=ranked.device)[:, None]).flatten()
    per_group = torch.zeros(q * n, dtype=misses.dtype, device=ranked.device)
    per_group = per_group.scatter_add_(0, flat, misses.flatten()).view(q, n)
    above = (per_group.cumsum(1) - per_group).gather(1, group)
    tied = per_group.gather(1, group)
    n_neg = n - n_rel
    return (hits * (n_neg[:, None] - above - tied / 2)).sum(1) / (n_rel * n_neg)


# ---------------------------------------------------------------------------------------------------
# Bootstrap summaries and paired comparisons


def _interval(boot: Tensor, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2
    lo, hi = torch.quantile(boot, torch.tensor([alpha, 1.0 - alpha], dtype=boot.dtype))
    return float(lo), float(hi)


def _bootstrap_means(values: Tensor, n_boot: int, generator: torch.Generator) -> Tensor:
    index = torch.randint(values.numel(), (n_boot, values.numel()), generator=generator)
    return values[index].mean(1)


def summarise(per_query: Mapping[str, Tensor], groups: Mapping[str, Tensor] | None = None,
              n_boot: int = 1000, seed: int = 0, level: float = 0.95,
              clusters: Int[Tensor, " _q"] | None = None) -> dict[str, dict[str, dict[str, float | int]]]:
    """Mean of each per-query metric with a percentile-bootstrap interval, overall and per group.

    For a split of m queries the bootstrap draws an index matrix
    ``torch.randint(m, (n_boot, m), generator=torch.Generator().manual_seed(seed))``, takes the mean of
    each resample (row), and reports the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those
    means (linear interpolation) as ``lo`` and ``hi``. Every split restarts the generator from ``seed``,
    and every metric of a split uses the same resamples. ``groups`` maps a name to a boolean mask over
    the q queries (``{"base": depth == 0, "wrapper": depth >= 1}``); a group that selects no query is left
    out of the result. Returns ``{"overall": {metric: {"mean", "lo", "hi", "n"}}, group: {...}}``.

    With ``clusters`` (one integer label per query, e.g. its function) the bootstrap resamples whole
    clusters instead (:func:`cluster_weights`): queries of one cluster are not independent draws, and the
    interval then reflects the number of clusters, not of queries; ``"clusters"`` gives their number.
    """
    if not isinstance(per_query, Mapping) or not per_query:
        raise ValueError(f"per_query={per_query!r}: expected a non-empty dict of per-query metric tensors")
    names = list(per_query)
    first = _per_query_vector(f"per_query[{names[0]!r}]", per_query[names[0]])
    values = torch.stack([first] + [_per_query_vector(f"per_query[{k!r}]", per_query[k], first.numel())
                                    for k in names[1:]])
    q = values.shape[1]
    splits = {"overall": torch.ones(q, dtype=torch.bool)}
    for name, mask in (groups or {}).items():
        if not isinstance(name, str) or name == "overall":
            raise ValueError(f"groups has the name {name!r}: expected a string other than 'overall'")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (q,):
            got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"groups[{name!r}] is {got}: expected a boolean mask of shape ({q},)")
        splits[name] = mask.cpu()
    n_boot = require_int("n_boot", n_boot, minimum=1)
    seed = require_int("seed", seed)
    level = _require_level(level)
    clusters = _require_clusters(clusters, q)

    out = {}
    for split, mask in splits.items():
        m = int(mask.sum())
        if m == 0:
            continue
        rows = values[:, mask]
        generator = torch.Generator().manual_seed(seed)
        extra = {}
        if clusters is None:
            index = torch.randint(m, (n_boot, m), generator=generator)
            boot = rows[:, index].mean(2)
        else:
            w = cluster_weights(clusters[mask], n_boot, generator)
            boot = (rows @ w.T) / w.sum(1)
            extra = {"clusters": int(torch.unique(clusters[mask]).numel())}
        out[split] = {}
        for name, v, b in zip(names, rows, boot):
            lo, hi = _interval(b, level)
            out[split][name] = {"mean": float(v.mean()), "lo": lo, "hi": hi, "n": m, **extra}
    return out


def _require_clusters(clusters, q: int) -> Tensor | None:
    if clusters is None:
        return None
    if not isinstance(clusters, Tensor) or clusters.dtype not in (torch.int32, torch.int64) \
            or tuple(clusters.shape) != (q,):
        got = (clusters.dtype, tuple(clusters.shape)) if isinstance(clusters, Tensor) else type(clusters).__name__
        raise ValueError(f"clusters is {got}: expected integer labels of shape ({q},), one per query")
    return clusters.cpu()


def cluster_weights(clusters: Int[Tensor, " m"], n_boot: int, generator: torch.Generator) -> Float[Tensor, "b m"]:
    """Cluster-bootstrap weights: each of ``n_boot`` resamples draws as many clusters as there are, with
    replacement, and weighs every query by how often its cluster was drawn."""
    _, inverse = torch.unique(clusters, return_inverse=True)
    k = int(inverse.max()) + 1
    draws = torch.randint(k, (n_boot, k), generator=generator)
    counts = torch.zeros(n_boot, k, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n_boot, k,
                                                                                          dtype=torch.float64))
    return counts[:, inverse]


def paired_difference(per_query_a: Tensor | Mapping[str, Tensor],
                      per_query_b: Tensor | Mapping[str, Tensor], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95, n_perm: int = 10000, clusters: Tensor | None = None) -> dict:
    """Mean paired difference a - b over the same queries, with a bootstrap interval and a permutation test.

    With d_i = a_i - b_i over q queries: ``mean`` is the mean of d; ``lo`` and ``hi`` the percentile
    bootstrap interval of that mean (resampled queries as in :func:`summarise`); ``p`` the two-sided
    sign-flip p-value, (1 + #{s : |mean(s * d)| >= |mean(d)|}) / (1 + n_perm) over ``n_perm`` random sign
    vectors s in {-1, 1}^q (the null: a and b are exchangeable within each query). One generator seeded
    with ``seed`` draws the bootstrap indices, then the signs. Returns ``{"mean", "lo", "hi", "p", "n",
    "mean_a", "mean_b"}``; given two dicts of per-query metrics with the same keys, one such dict per
    metric. With ``clusters`` the bootstrap resamples whole clusters and the signs flip per cluster (the
    null: a and b exchangeable within each cluster).
    """
    if isinstance(per_query_a, Mapping) or isinstance(per_query_b, Mapping):
        ka, kb = (sorted(v) if isinstance(v, Mapping) else type(v).__name__
                  for v in (per_query_a, per_query_b))
        if not isinstance(ka, list) or not ka or ka != kb:
            raise ValueError(f"per_query_a has {ka} and per_query_b {kb}: expected two tensors, or two "
                             "non-empty dicts with the same metrics")
        return {k: paired_difference(per_query_a[k], per_query_b[k], n_boot, seed, level, n_perm, clusters)
                for k in per_query_a}
    a = _per_query_vector("per_query_a", per_query_a)
    b = _per_query_vector("per_query_b", per_query_b, a.numel())
    n_boot = require_int("n_boot", n_boot, minimum=1)
    n_perm = require_int("n_perm", n_perm, minimum=1)
    seed = require_int("seed", seed)
    level = _require_level(level)

    d = a - b
    q = d.numel()
    clusters = _require_clusters(clusters, q)
    generator = torch.Generator().manual_seed(seed)
    if clusters is None:
        lo, hi = _interval(_bootstrap_means(d, n_boot, generator), level)
        inverse, k = torch.arange(q), q
    else:
        w = cluster_weights(clusters, n_boot, generator)
        lo, hi = _interval((w @ d) / w.sum(1), level)
        inverse = torch.unique(clusters, return_inverse=True)[1]
        k = int(inverse.max()) + 1
    observed = float(d.mean().abs())
    tolerance = 1e-12 * max(1.0, float(d.abs().max()))
    extreme, chunk = 0, max(1, 2**22 // q)
    for start in range(0, n_perm, chunk):
        rows = min(chunk, n_perm - start)
        signs = (torch.randint(2, (rows, k), generator=generator, dtype=torch.float64) * 2 - 1)[:, inverse]
        extreme += int(((signs @ d).abs() / q >= observed - tolerance).sum())
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "p": (1 + extreme) / (1 + n_perm), "n": q,
            "mean_a": float(a.mean()), "mean_b": float(b.mean())}


# ---------------------------------------------------------------------------------------------------
# What fills the top k


def hops_categories(queries: Sequence[HopsQuery], documents: Sequence[HopsDocument],
                    functions: Sequence[HopsFunction]) -> tuple[Int[Tensor, "q n"], tuple[str, ...]]:
    """The category of every document relative to every query, as codes into :data:`HOPS_CATEGORIES`.

    For query i and document j: ``"constant"`` when j is relevant to i (a document of i's function family,
    :func:`imprint.data.hops.relevance_mask`) with role ``constant``; ``"identity"`` when relevant with any
    other role (a wrapper's document); ``"distractor"`` when j's role is ``distractor``, whichever function
    it mentions; ``"same answer"`` when j belongs to another family whose constant is i's answer (only where
    pairs share a constant); ``"other"`` otherwise (the documents of other families).
    """
    mask = relevance_mask(queries, documents, functions)
    role = torch.tensor([d.role == "constant" for d in documents], dtype=torch.bool)
    distractor = torch.tensor([d.role == "distractor" for d in documents], dtype=torch.bool)
    doc_constant = torch.tensor([-1 if d.constant is None else d.constant for d in documents])
    answer = torch.tensor([q.constant for q in queries])
    codes = torch.full(mask.shape, HOPS_CATEGORIES.index("other"), dtype=torch.long)
    codes[(answer[:, None] == doc_constant[None, :]) & ~mask] = HOPS_CATEGORIES.index("same answer")
    codes[:, distractor] = HOPS_CATEGORIES.index("distractor")
    codes[mask & role] = HOPS_CATEGORIES.index("constant")
    codes[mask & ~role] = HOPS_CATEGORIES.index("identity")
    return codes, HOPS_CATEGORIES


def composition_at_k(scores: Float[Tensor, "q n"], doc_category: Int[Tensor, "_q _n"], names: Sequence[str],
                     k: int = 10) -> dict[str, float]:
    """Mean share of each category among a query's top k documents (ranked as in :func:`ranking_metrics`
    with ``ties="index"``), averaged over queries; ``doc_category[i, j]`` is the code (an index into
    ``names``) of document j for query i, and the shares sum to 1."""
    _require_scores(scores)
    _require_same_shape("doc_category", doc_category, scores.shape)
    if isinstance(names, (str, bytes)) or not names or len(set(names)) != len(names) \
            or not all(isinstance(s, str) for s in names):
        raise ValueError(f"names={names!r}: expected distinct category names")
    k = _require_k("k", k, scores.shape[1])
    if doc_category.numel() and (doc_category.min() < 0 or doc_category.max() >= len(names)):
        raise ValueError(f"doc_category holds codes {int(doc_category.min())}..{int(doc_category.max())}: "
                         f"expected codes in 0..{len(names) - 1}, one per name")
    top = doc_category.gather(1, rank_order(scores)[:, :k].to(doc_category.device))
    counts = torch.nn.functional.one_hot(top.long(), len(names)).sum(1).double() / k
    return {name: float(share) for name, share in zip(names, counts.mean(0))}
