"""Layer-wise similarity and retrieval metrics against scikit-learn, rank_bm25 and brute force."""

import numpy as np
import pytest
import torch
from sklearn.metrics import label_ranking_average_precision_score, roc_auc_score, top_k_accuracy_score
from sklearn.metrics.pairwise import cosine_similarity

from imprint.gradients.similarity import (Gram, bm25_scores, mean_reciprocal_rank, own_and_other,
                                          pairwise_scores, recall_at_k, retrieval_metrics, retrieval_ranks,
                                          separation_auc, word_tokens)


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(0)
    key = {"a": torch.randn(9, 5, generator=g), "b": torch.randn(9, 7, generator=g)}
    query = {n: v + 0.7 * torch.randn(v.shape, generator=g) for n, v in key.items()}
    return query, key


def test_cosine_and_dot_per_weight_against_sklearn(features):
    query, key = features
    gram = Gram.from_features(query, key)
    for name in query:
        ref_cos = cosine_similarity(query[name].double().numpy(), key[name].double().numpy())
        np.testing.assert_allclose(gram.scores("cosine")[name].numpy(), ref_cos, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gram.scores("dot")[name].numpy(),
                                   query[name].double().numpy() @ key[name].double().numpy().T, rtol=1e-12)


def test_grouped_gram_equals_gram_of_concatenated_features(features):
    query, key = features
    whole = Gram.from_features(query, key).grouped({"model": ["a", "b"]})
    concat = pairwise_scores(torch.cat([query["a"], query["b"]], 1), torch.cat([key["a"], key["b"]], 1))
    torch.testing.assert_close(whole.scores("cosine")["model"], concat)


def test_zero_gradient_has_zero_cosine():
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    scores = pairwise_scores(q, torch.tensor([[1.0, 1.0]]))
    assert scores[0, 0] == 0 and torch.isclose(scores[1, 0], torch.tensor(2 ** -0.5, dtype=torch.float64))


def test_ranks_against_brute_force_and_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 40))
    targets = rng.integers(0, 40, size=30)
    ranks = retrieval_ranks(torch.tensor(scores), torch.tensor(targets))
    brute = [1 + sum(scores[i, j] > scores[i, targets[i]] for j in range(40)) for i in range(30)]
    assert ranks.tolist() == brute
    for k in (1, 5, 10):
        expected = top_k_accuracy_score(targets, scores, k=k, labels=np.arange(40))
        assert recall_at_k(ranks, k) == pytest.approx(expected)
    onehot = np.eye(40)[targets]
    assert mean_reciprocal_rank(ranks) == pytest.approx(label_ranking_average_precision_score(onehot, scores))


def test_ties_count_against_the_query():
    ranks = retrieval_ranks(torch.zeros(4, 6), torch.arange(4))
    assert ranks.tolist() == [6, 6, 6, 6]
    metrics = retrieval_metrics(torch.eye(5) * 3.0)
    assert metrics == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0}


def test_ranking_rejects_bad_targets():
    with pytest.raises(ValueError, match="targets"):
        retrieval_ranks(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))


def test_own_and_other_and_separation_auc():
    rng = np.random.default_rng(2)
    scores = torch.tensor(rng.normal(size=(6, 6)) + 2 * np.eye(6))
    own, other = own_and_other(scores)
    assert own.tolist() == torch.diagonal(scores).tolist() and other.numel() == 30
    pairs = [(a > b) + 0.5 * (a == b) for a in own.tolist() for b in other.tolist()]
    assert separation_auc(own, other) == pytest.approx(np.mean(pairs))
    labels = np.r_[np.ones(6), np.zeros(30)]
    assert separation_auc(own, other) == pytest.approx(roc_auc_score(labels, np.r_[own.numpy(), other.numpy()]))


def test_bm25_scores_match_rank_bm25_and_find_the_source():
    from rank_bm25 import BM25Okapi

    docs = ["Return the number of items in a container.", "Split the string at sep.",
            "An immutable sequence of items.", "The pass statement does nothing."]
    # "the" is in three of four documents (a negative idf, floored by rank_bm25); repeated and unknown words
    queries = ["how many items does a container hold", "split a string", "what does pass do",
               "the the statement statement zebra", "zebra"]
    scores = bm25_scores(queries, docs)
    assert scores.shape == (5, 4) and scores.dtype == torch.float64
    bm25 = BM25Okapi([word_tokens(d) for d in docs])
    for i, q in enumerate(queries):
        np.testing.assert_allclose(scores[i].numpy(), bm25.get_scores(word_tokens(q)))
    assert scores.argmax(1)[:4].tolist() == [0, 1, 3, 3] and not scores[4].any()
    assert word_tokens("str.split(sep=None)") == ["str", "split", "sep", "none"]


def test_separation_auc_with_ties_against_sklearn():
    rng = np.random.default_rng(3)
    own = torch.tensor(rng.integers(0, 5, size=40).astype(float))
    other = torch.tensor(rng.integers(0, 5, size=300).astype(float))
    labels = np.r_[np.ones(40), np.zeros(300)]
    expected = roc_auc_score(labels, np.r_[own.numpy(), other.numpy()])
    assert separation_auc(own, other) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        separation_auc(own, torch.zeros(0))


@pytest.mark.parametrize("n_own, n_other", [(40, 300), (300, 40), (1, 1), (7, 7)])
def test_separation_auc_is_the_pair_count_whichever_side_is_larger(n_own, n_other):
    rng = np.random.default_rng(n_own * 1000 + n_other)
    own = torch.tensor(rng.integers(0, 6, size=n_own).astype(float))
    other = torch.tensor(rng.integers(0, 6, size=n_other).astype(float))
    o, t = own.numpy()[:, None], other.numpy()[None, :]
    brute = float(((o > t) + 0.5 * (o == t)).mean())  # every pair, ties counted one half
    assert separation_auc(own, other) == brute
    continuous = torch.tensor(rng.normal(size=n_other))
    assert separation_auc(continuous[:1], continuous) == pytest.approx(
        float((continuous[0] > continuous).double().mean() + 0.5 / n_other), abs=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_the_gpu_give_the_cpu_numbers():
    scores = torch.randn(50, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    on_gpu = scores.cuda()
    assert retrieval_metrics(on_gpu) == retrieval_metrics(scores)
    own, other = own_and_other(on_gpu)
    assert own.is_cuda and separation_auc(own, other) == separation_auc(*own_and_other(scores))
