"""Layer-wise gradient similarity and retrieval metrics for the gradient-similarity chapter (03).

Everything starts from a :class:`Gram`: for each weight, the inner products between the gradients of
``n_q`` query examples (the variants) and ``n_k`` key examples (the training set), and the squared norm
of each gradient. Inner products and squared norms add over weights, so the Gram of a layer, a module
or the whole model is a sum (:meth:`Gram.grouped`), exact or projected alike; the cosine of a group is
its dot product over the product of its norms. Retrieval asks, for each query, where its own training
example ranks among all keys by score: recall@k is the fraction ranked within the first k, the mean
reciprocal rank (MRR) the mean of 1/rank. Ties are counted against the query (a key that scores equal to
the right one ranks before it), so a constant score gives the worst rank rather than the best. The text
baseline BM25 comes from ``rank_bm25``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from imprint.runtime.checks import require_choice, require_int

Computation = Literal["cosine", "dot"]


@dataclass(frozen=True)
class Gram:
    """Per-weight (or per-group) inner products ``dots[name][q, k]`` and squared norms of both sides."""

    dots: dict[str, Tensor]
    query_sqnorms: dict[str, Tensor]
    key_sqnorms: dict[str, Tensor]

    def __post_init__(self):
        if set(self.dots) != set(self.query_sqnorms) or set(self.dots) != set(self.key_sqnorms):
            raise ValueError("dots, query_sqnorms and key_sqnorms must have the same names")
        for name, dot in self.dots.items():
            if dot.shape != (self.query_sqnorms[name].shape[0], self.key_sqnorms[name].shape[0]):
                raise ValueError(f"{name}: dots {tuple(dot.shape)} do not match the norms' lengths")

    @property
    def names(self) -> list[str]:
        return list(self.dots)

    @classmethod
    def from_features(cls, query: Mapping[str, Tensor], key: Mapping[str, Tensor]) -> "Gram":
        """The Gram of per-example feature vectors (projected gradients): ``{name: (n, k)}`` on each side."""
        if set(query) != set(key):
            raise ValueError(f"query and key features name different weights: {sorted(set(query) ^ set(key))[:3]}")
        dots, q_sq, k_sq = {}, {}, {}
        for name in query:
            q, k = query[name].double(), key[name].double()
            dots[name] = q @ k.T
            q_sq[name] = q.square().sum(1)
            k_sq[name] = k.square().sum(1)
        return cls(dots, q_sq, k_sq)

    def grouped(self, groups: Mapping[str, Sequence[str]]) -> "Gram":
        """Sum the weights of each group: ``{group: [weight names]}``."""
        missing = [n for names in groups.values() for n in names if n not in self.dots]
        if missing:
            raise ValueError(f"groups name weights missing from the Gram: {missing[:3]}")
        return Gram({g: sum(self.dots[n] for n in names) for g, names in groups.items()},
                    {g: sum(self.query_sqnorms[n] for n in names) for g, names in groups.items()},
                    {g: sum(self.key_sqnorms[n] for n in names) for g, names in groups.items()})

    def scores(self, computation: Computation = "cosine") -> dict[str, Tensor]:
        """``{name: (n_q, n_k)}`` dot products or cosines (0 where a gradient is zero)."""
        require_choice("computation", computation, ["cosine", "dot"])
        if computation == "dot":
            return dict(self.dots)
        out = {}
        for name, dot in self.dots.items():
            denom = (self.query_sqnorms[name][:, None] * self.key_sqnorms[name][None, :]).sqrt()
            out[name] = torch.where(denom > 0, dot / denom.clamp(min=torch.finfo(denom.dtype).tiny),
                                    torch.zeros_like(dot))
        return out


def pairwise_scores(query: Float[Tensor, "n_q d"], key: Float[Tensor, "n_k d"],
                    computation: Computation = "cosine") -> Float[Tensor, "n_q n_k"]:
    """Cosine or dot product between every query and key vector (float64)."""
    return Gram.from_features({"x": query}, {"x": key}).scores(computation)["x"]


def retrieval_ranks(scores: Float[Tensor, "n_q n_k"], targets: Int[Tensor, " n_q"]) -> Int[Tensor, " n_q"]:
    """1-based rank of each query's target key, ties counted against it: ``#{j: s_j >= s_target}``."""
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)}: expected (n_q, n_k) "
                         "and (n_q,)")
    if bool(((targets < 0) | (targets >= scores.shape[1])).any()):
        raise ValueError(f"targets must lie in [0, {scores.shape[1]})")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    own = scores.gather(1, targets.to(scores.device)[:, None])
    return (scores >= own).sum(1)


def recall_at_k(ranks: Int[Tensor, " n"], k: int) -> float:
    require_int("k", k, minimum=1)
    return float((ranks <= k).double().mean())


def mean_reciprocal_rank(ranks: Int[Tensor, " n"]) -> float:
    return float((1.0 / ranks.double()).mean())


def retrieval_metrics(scores: Float[Tensor, "n_q n_k"], targets: Int[Tensor, " n_q"] | None = None,
                      ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """``{"recall@k": ..., "mrr": ...}``; ``targets`` defaults to ``arange(n_q)`` (query i is key i's variant)."""
    if targets is None:
        targets = torch.arange(scores.shape[0], device=scores.device)
    ranks = retrieval_ranks(scores, targets)
    out = {f"recall@{k}": recall_at_k(ranks, k) for k in ks}
    out["mrr"] = mean_reciprocal_rank(ranks)
    return out


def own_and_other(scores: Float[Tensor, "n n"]) -> tuple[Float[Tensor, " n"], Float[Tensor, " m"]]:
    """Diagonal (each example against its own variant) and off-diagonal entries of a square score matrix."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: expected a square matrix")
    mask = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return scores[mask], scores[~mask]


def _at_most_and_equal(ranked: Tensor, values: Tensor) -> tuple[int, int]:
    """``(sum over values of #{ranked <= v}, sum over values of #{ranked == v})`` for sorted ``ranked``."""
    at_most = torch.searchsorted(ranked, values, right=True)
    # a value equals some entry only if the entry just below its insertion point does: search those again
    tied = (at_most > 0) & (ranked[(at_most - 1).clamp(min=0)] == values)
    equal = 0
    if bool(tied.any()):
        equal = int((at_most[tied] - torch.searchsorted(ranked, values[tied], right=False)).sum())
    return int(at_most.sum()), equal


def separation_auc(own: Float[Tensor, " n"], other: Float[Tensor, " m"]) -> float:
    """Probability that a random own-variant score exceeds a random other-example score (ties count 1/2).

    The Mann-Whitney statistic by sorting the smaller side once and looking the larger one up in it:
    ``O((n + m) log min(n, m))``: a thousand own scores against a million others take about 30 ms on
    two CPU cores. The counts are integers, so the result does not depend on which side is sorted.
    """
    if own.numel() == 0 or other.numel() == 0:
        raise ValueError("own and other must both be non-empty")
    own, other = own.double().flatten(), other.double().flatten()
    pairs = own.numel() * other.numel()
    if own.numel() <= other.numel():
        # wins = sum over other of #{own > o} + ties / 2 = pairs - #{own <= o} + ties / 2
        at_most, equal = _at_most_and_equal(torch.sort(own).values, other)
        wins = pairs - at_most + 0.5 * equal
    else:
        # wins = sum over own of #{other < x} + ties / 2 = #{other <= x} - ties / 2
        at_most, equal = _at_most_and_equal(torch.sort(other).values, own)
        wins = at_most - 0.5 * equal
    return float(wins / pairs)


_WORD = re.compile(r"[a-z0-9_]+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words (identifiers kept whole): the BM25 tokenisation."""
    return _WORD.findall(text.lower())


def bm25_scores(queries: Sequence[str], documents: Sequence[str],
                tokenize: Callable[[str], list[str]] = word_tokens) -> Float[Tensor, "n_q n_d"]:
    """Okapi BM25 score (``rank_bm25`` defaults, k1 = 1.5, b = 0.75) of every document for every query.

    The corpus statistics (term frequencies, document lengths, idf with its floor) are ``rank_bm25``'s;
    the scores are its ``get_scores`` summed over every query word, written as one sparse product: query
    word counts times the documents' per-word BM25 weights (a word no document contains adds nothing).
    ``tokenize`` turns a text into its terms: :func:`word_tokens` by default, or e.g. a model
    tokenizer's tokens (chapter 07's baseline).
    """
    from rank_bm25 import BM25Okapi
    from scipy import sparse

    if not queries or not documents:
        raise ValueError("queries and documents must both be non-empty")
    if not callable(tokenize):
        raise ValueError(f"tokenize={tokenize!r}: expected a callable from a text to its list of terms")
    bm25 = BM25Okapi([tokenize(d) for d in documents])
    vocabulary = {word: j for j, word in enumerate(bm25.idf)}
    norm = bm25.k1 * (1 - bm25.b + bm25.b * np.asarray(bm25.doc_len, dtype=np.float64) / bm25.avgdl)
    rows, cols, weights = [], [], []
    for d, freqs in enumerate(bm25.doc_freqs):
        for word, tf in freqs.items():
            rows.append(d)
            cols.append(vocabulary[word])
            weights.append(bm25.idf[word] * tf * (bm25.k1 + 1) / (tf + norm[d]))
    doc_weights = sparse.csr_matrix((weights, (rows, cols)), shape=(len(documents), len(vocabulary)))
    q_rows, q_cols = [], []
    for i, query in enumerate(queries):
        for word in tokenize(query):
            if word in vocabulary:
                q_rows.append(i)
                q_cols.append(vocabulary[word])
    counts = sparse.csr_matrix((np.ones(len(q_rows)), (q_rows, q_cols)), shape=(len(queries), len(vocabulary)))
    return torch.from_numpy((counts @ doc_weights.T).toarray())
