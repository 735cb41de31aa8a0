"""The attribution metrics of chapter 07: every per-query ranking metric against Python loops (and
sklearn), a hand-made example with ties, the bootstrap against a loop with the same generator, the
composition of the top k on a tiny HOPS corpus, the paired sign-flip test against full enumeration, and
the refusals."""

import itertools

import numpy as np
import pytest
import torch

from imprint.attribution.metrics import (HOPS_CATEGORIES, composition_at_k, hops_categories,
                                         paired_difference, ranking_metrics, summarise)
from imprint.data.hops import (HopsSpec, generate_hops_documents, hops_queries, hops_spec, relevance_mask,
                               spec_functions)

try:
    from sklearn import metrics as sk_metrics
except ImportError:
    sk_metrics = None

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_case(q, n, seed, ties):
    """Scores (integers 0..3 when ``ties``, so many tie) and a mask with a relevant and a non-relevant
    document in every row."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (q, n), generator=g).double() if ties else torch.randn(q, n, generator=g)
    relevant = torch.rand(q, n, generator=g) < 0.3
    relevant[:, 0], relevant[:, 1] = True, False
    shuffle = torch.argsort(torch.rand(q, n, generator=g), dim=1)
    return scores, relevant.gather(1, shuffle)


def loop_metrics(s, rel, ks, pessimistic=False):
    """One query at a time, straight from the definitions."""
    n = len(s)
    order = sorted(range(n), key=lambda j: (-s[j], rel[j] if pessimistic else 0, j))
    hits = [rel[j] for j in order]
    n_rel = sum(rel)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = sum(hits[:k]) / n_rel
        out[f"precision@{k}"] = sum(hits[:k]) / k
        out[f"hit@{k}"] = float(any(hits[:k]))
    out["rr"] = 1 / (hits.index(True) + 1)
    out["ap"] = sum(sum(hits[:r + 1]) / (r + 1) for r in range(n) if hits[r]) / n_rel
    pos = [s[j] for j in range(n) if rel[j]]
    neg = [s[j] for j in range(n) if not rel[j]]
    out["auc"] = sum((x > y) + 0.5 * (x == y) for x in pos for y in neg) / (len(pos) * len(neg))
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("pessimistic", [False, True])
def test_every_metric_matches_a_loop_over_queries(ties, pessimistic):
    scores, relevant = random_case(12, 17, seed=3 + ties, ties=ties)
    ks = (1, 3, 17)
    got = ranking_metrics(scores, relevant, ks, ties="pessimistic" if pessimistic else "index")
    names = [f"{m}@{k}" for k in ks for m in ("recall", "precision", "hit")] + ["rr", "ap", "auc"]
    assert list(got) == names
    for i in range(len(scores)):
        want = loop_metrics(scores[i].tolist(), relevant[i].tolist(), ks, pessimistic)
        for name, value in want.items():
            assert got[name][i].item() == pytest.approx(value, abs=1e-12), (name, i)


@pytest.mark.skipif(sk_metrics is None, reason="scikit-learn is not installed")
def test_auc_and_ap_match_sklearn():
    for ties in (False, True):
        scores, relevant = random_case(10, 30, seed=7, ties=ties)
        got = ranking_metrics(scores, relevant, ks=(5,))
        for i in range(len(scores)):
            y, s = relevant[i].numpy(), scores[i].numpy()
            assert got["auc"][i].item() == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
            if not ties:
                want = sk_metrics.average_precision_score(y, s)
                assert got["ap"][i].item() == pytest.approx(want, abs=1e-12)


def test_hand_made_example_with_a_tie():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                           [0.2, 0.5, 0.5, 0.1, 0.9]])
    relevant = torch.tensor([[0, 1, 0, 1, 0],
                             [0, 1, 0, 0, 1]], dtype=torch.bool)
    want = {"recall@1": [0, 1 / 2], "precision@1": [0, 1], "hit@1": [0, 1],
            "recall@3": [1 / 2, 1], "precision@3": [1 / 3, 2 / 3], "hit@3": [1, 1],
            "rr": [1 / 2, 1], "ap": [1 / 2, 1], "auc": [1 / 2, 11 / 12]}
    got = ranking_metrics(scores, relevant, ks=(1, 3))
    for name, values in want.items():
        assert got[name].tolist() == pytest.approx(values, abs=1e-12), name
    # The tie 0.5/0.5 of the second query ranks its non-relevant document 2 first: AP drops, AUC stays.
    worst = ranking_metrics(scores, relevant, ks=(1, 3), ties="pessimistic")
    assert worst["ap"].tolist() == pytest.approx([1 / 2, 5 / 6])
    assert worst["auc"].tolist() == pytest.approx([1 / 2, 11 / 12])
    assert worst["recall@3"].tolist() == pytest.approx([1 / 2, 1])


def test_a_constant_score_is_worst_under_pessimistic_ties_and_half_under_auc():
    relevant = torch.zeros(3, 8, dtype=torch.bool)
    relevant[:, :2] = True
    got = ranking_metrics(torch.zeros(3, 8), relevant, ks=(2,), ties="pessimistic")
    assert got["recall@2"].tolist() == [0, 0, 0] and got["rr"].tolist() == pytest.approx([1 / 7] * 3)
    assert got["auc"].tolist() == [0.5, 0.5, 0.5]
    assert ranking_metrics(torch.zeros(3, 8), relevant, ks=(2,))["recall@2"].tolist() == [1, 1, 1]


def slow_bootstrap(values, n_boot, seed, level):
    """The documented draw, one resample at a time, and numpy's linear-interpolation percentiles."""
    m = len(values)
    index = torch.randint(m, (n_boot, m), generator=torch.Generator().manual_seed(seed)).tolist()
    means = [sum(values[i] for i in row) / m for row in index]
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return sum(values) / m, lo, hi


def test_bootstrap_matches_a_loop_with_the_same_generator():
    g = torch.Generator().manual_seed(1)
    per_query = {"a": torch.rand(9, generator=g), "b": torch.randint(0, 2, (9,), generator=g).double()}
    groups = {"odd": torch.arange(9) % 2 == 1, "none": torch.zeros(9, dtype=torch.bool)}
    got = summarise(per_query, groups, n_boot=40, seed=5, level=0.8)
    assert set(got) == {"overall", "odd"}
    for split, rows in (("overall", slice(None)), ("odd", groups["odd"])):
        for name, v in per_query.items():
            mean, lo, hi = slow_bootstrap(v[rows].tolist(), 40, 5, 0.8)
            assert got[split][name] == pytest.approx({"mean": mean, "lo": lo, "hi": hi, "n": len(v[rows])})


def test_bootstrap_contains_the_mean_shrinks_with_queries_and_is_seeded():
    g = torch.Generator().manual_seed(2)
    width = {}
    for q in (20, 2000):
        values = {"x": torch.rand(q, generator=g), "y": (torch.rand(q, generator=g) < 0.3).double()}
        got = summarise(values, n_boot=400, seed=0)
        for stats in got["overall"].values():
            assert stats["lo"] <= stats["mean"] <= stats["hi"] and stats["n"] == q
        width[q] = got["overall"]["x"]["hi"] - got["overall"]["x"]["lo"]
        assert summarise(values, n_boot=400, seed=0) == got
        assert summarise(values, n_boot=400, seed=1)["overall"]["x"]["lo"] != got["overall"]["x"]["lo"]
    assert width[2000] < width[20] / 4


def test_summarise_runs_on_ranking_metrics_of_a_full_size_problem():
    scores, relevant = random_case(500, 3000, seed=0, ties=False)
    per_query = ranking_metrics(scores, relevant)
    depth = torch.arange(500) % 3
    got = summarise(per_query, {"base": depth == 0, "wrapper": depth >= 1})
    assert set(got) == {"overall", "base", "wrapper"} and set(got["base"]) == set(per_query)
    assert got["wrapper"]["auc"]["n"] == 333
    assert got["overall"]["auc"]["mean"] == pytest.approx(0.5, abs=0.01)


@pytest.fixture(scope="module")
def tiny_hops():
    spec = hops_spec(n_pairs=3, depth2=True, docs_per_base=6, docs_per_wrapper=4, docs_per_depth2=3,
                     distractors_per_function=1, distractor_tokens=("<AN>",), distractors_per_token=4)
    functions = spec_functions(spec)
    return hops_queries(functions, inputs=range(1, 3)), generate_hops_documents(spec), functions


def assert_categories_by_loop(queries, docs, functions, codes, names):
    """Every (query, document) category against the rule written out, pair by pair."""
    base = {f.token: f.base for f in functions}
    answer = {f.token: f.constant for f in functions}
    for i, q in enumerate(queries):
        for j, d in enumerate(docs):
            if d.role == "distractor":
                want = "distractor"
            elif base[d.func] == base[q.func]:
                want = "constant" if d.role == "constant" else "identity"
            elif answer[d.func] == q.constant:
                want = "same answer"
            else:
                want = "other"
            assert names[codes[i, j]] == want, (q.func, d.uid)


def test_hops_categories_follow_roles_and_families(tiny_hops):
    queries, docs, functions = tiny_hops
    codes, names = hops_categories(queries, docs, functions)
    assert names == HOPS_CATEGORIES and codes.shape == (len(queries), len(docs))
    assert_categories_by_loop(queries, docs, functions, codes, names)
    assert {names[c] for c in codes.unique().tolist()} == {"constant", "identity", "distractor", "other"}
    assert torch.equal(codes <= 1, relevance_mask(queries, docs, functions))


def test_hops_categories_mark_the_pair_that_shares_the_answer():
    spec = hops_spec(n_pairs=3, docs_per_base=4, docs_per_wrapper=2, distractors_per_function=1)
    spec = HopsSpec(**{**vars(spec), "constants": (5, 5, 7)})
    functions = spec_functions(spec)
    queries, docs = hops_queries(functions, inputs=range(1, 3)), generate_hops_documents(spec)
    codes, names = hops_categories(queries, docs, functions)
    assert_categories_by_loop(queries, docs, functions, codes, names)
    shared = [i for i, q in enumerate(queries) if q.constant == 5]
    assert (codes[shared] == names.index("same answer")).sum(1).min() > 0
    assert torch.equal(codes <= 1, relevance_mask(queries, docs, functions))


def test_composition_matches_a_count_of_the_top_k(tiny_hops):
    queries, docs, functions = tiny_hops
    codes, names = hops_categories(queries, docs, functions)
    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 5, codes.shape, generator=g).float()
    got = composition_at_k(scores, codes, names, k=7)
    assert list(got) == list(names) and sum(got.values()) == pytest.approx(1.0)
    counts = dict.fromkeys(names, 0.0)
    for i in range(len(queries)):
        s = scores[i].tolist()
        for j in sorted(range(len(docs)), key=lambda j: (-s[j], j))[:7]:
            counts[names[codes[i, j]]] += 1 / (7 * len(queries))
    assert got == pytest.approx(counts, abs=1e-12)


def test_paired_p_value_matches_full_enumeration_of_signs():
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(10, generator=g), torch.rand(10, generator=g)
    d = (a - b).tolist()
    observed = abs(sum(d))
    exact = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-12
                for signs in itertools.product((-1, 1), repeat=10)) / 2**10
    got = paired_difference(a, b, n_perm=20000)
    assert got["p"] == pytest.approx(exact, abs=0.02)
    assert got["mean"] == pytest.approx(sum(d) / 10) and got["lo"] <= got["mean"] <= got["hi"]
    assert got["mean_a"] == pytest.approx(float(a.mean()))
    assert got["mean_b"] == pytest.approx(float(b.mean()))
    assert paired_difference(a, b, n_perm=20000) == got


def test_paired_difference_of_equal_methods_and_of_a_clearly_better_one():
    g = torch.Generator().manual_seed(8)
    b = torch.rand(60, generator=g)
    same = paired_difference(b, b.clone())
    assert (same["mean"], same["lo"], same["hi"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    balanced = torch.tensor([0.25, -0.25, 0.5, -0.5] * 15)
    assert paired_difference(b + balanced, b)["p"] == 1.0
    better = paired_difference(b + 0.2 + 0.05 * torch.rand(60, generator=g), b, n_perm=2000)
    assert better["p"] == 1 / 2001 and better["lo"] > 0.2
    d = (b + balanced) - b
    same_draw = summarise({"d": d}, seed=3)["overall"]["d"]
    assert paired_difference(b + balanced, b, seed=3)["lo"] == same_draw["lo"]


def test_paired_difference_of_metric_dicts_compares_each_metric():
    scores, relevant = random_case(40, 30, seed=9, ties=False)
    good = ranking_metrics(scores + 3 * relevant, relevant)
    bad = ranking_metrics(scores, relevant)
    got = paired_difference(good, bad, n_perm=500)
    assert set(got) == set(good) and got["auc"]["p"] == 1 / 501 and got["auc"]["mean"] > 0.3
    assert got["hit@10"] == paired_difference(good["hit@10"], bad["hit@10"], n_perm=500)


@pytest.mark.parametrize("call, name", [
    (lambda s, r: ranking_metrics(s, r[:, :4]), "relevant"),
    (lambda s, r: ranking_metrics(s[:1], r), "relevant"),
    (lambda s, r: ranking_metrics(s, torch.zeros_like(r).index_fill_(1, torch.tensor([0]), True)
                                  .index_fill_(0, torch.tensor([1]), False), ks=(1,)), "relevant"),
    (lambda s, r: ranking_metrics(s, torch.ones_like(r), ks=(1,)), "relevant"),
    (lambda s, r: ranking_metrics(s, r, ks=(2, 6)), "ks"),
    (lambda s, r: ranking_metrics(s, r, ks=(0,)), "ks"),
    (lambda s, r: ranking_metrics(s, r, ks=()), "ks"),
    (lambda s, r: ranking_metrics(s, r, ks=(1,), ties="random"), "ties"),
    (lambda s, r: ranking_metrics(s.index_fill(1, torch.tensor([2]), float("nan")), r, ks=(1,)), "scores"),
    (lambda s, r: composition_at_k(s, r.long(), ("a", "b"), k=6), "k"),
    (lambda s, r: composition_at_k(s, r.long(), ("a", "b"), k=0), "k"),
    (lambda s, r: composition_at_k(s, r.long(), ("a",), k=2), "doc_category"),
    (lambda s, r: composition_at_k(s, r.long()[:, :3], ("a", "b")), "doc_category"),
    (lambda s, r: composition_at_k(s, r.long(), ("a", "a"), k=2), "names"),
    (lambda s, r: summarise({"x": s[0]}, level=1.0), "level"),
    (lambda s, r: summarise({"x": s[0]}, level=0.0), "level"),
    (lambda s, r: summarise({"x": s[0]}, level=1.5), "level"),
    (lambda s, r: summarise({"x": s[0]}, n_boot=0), "n_boot"),
    (lambda s, r: summarise({"x": s[0], "y": s[0, :3]}), "per_query"),
    (lambda s, r: summarise({}), "per_query"),
    (lambda s, r: summarise({"x": s[0]}, {"g": r[0, :2]}), "groups"),
    (lambda s, r: summarise({"x": s[0]}, {"overall": r[0]}), "groups"),
    (lambda s, r: paired_difference(s[0], s[1, :4]), "per_query_b"),
    (lambda s, r: paired_difference(s[0], s[1], level=-0.1), "level"),
    (lambda s, r: paired_difference({"x": s[0]}, {"y": s[1]}), "per_query_a"),
])
def test_bad_input_is_refused_by_name(call, name):
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]])
    relevant = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call(scores, relevant)


# ---------------------------------------------------------------------------------------------------
# Cluster bootstrap


def test_singleton_clusters_give_the_query_bootstrap():
    gen = torch.Generator().manual_seed(3)
    pq = {"x": torch.rand(23, generator=gen, dtype=torch.float64)}
    groups = {"g": torch.arange(23) % 3 == 0}
    plain = summarise(pq, groups, n_boot=200, seed=5)
    clustered = summarise(pq, groups, n_boot=200, seed=5, clusters=torch.arange(23))
    for split in plain:
        for k in ("mean", "lo", "hi"):
            assert clustered[split]["x"][k] == pytest.approx(plain[split]["x"][k], abs=1e-12)
    a, b = torch.rand(23, generator=gen), torch.rand(23, generator=gen)
    p_plain = paired_difference(a, b, n_boot=200, seed=1, n_perm=500)
    p_clustered = paired_difference(a, b, n_boot=200, seed=1, n_perm=500, clusters=torch.arange(23))
    for k in ("lo", "hi", "p"):
        assert p_clustered[k] == pytest.approx(p_plain[k], abs=1e-12)


def test_cluster_bootstrap_matches_a_loop_over_drawn_clusters():
    clusters = torch.tensor([0, 0, 0, 1, 2, 2, 5, 5, 5, 5])
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 1.0, 4.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    n_boot, level = 400, 0.9
    got = summarise({"v": values}, n_boot=n_boot, seed=7, level=level, clusters=clusters)["overall"]["v"]
    gen = torch.Generator().manual_seed(7)
    ids = [0, 1, 2, 5]
    draws = torch.randint(len(ids), (n_boot, len(ids)), generator=gen)
    means = []
    for row in draws.tolist():
        picked = torch.cat([values[clusters == ids[j]] for j in row])
        means.append(float(picked.mean()))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    assert got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi) and got["clusters"] == 4


def test_identical_copies_within_clusters_do_not_narrow_the_interval():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(12, generator=gen, dtype=torch.float64)
    copies = base.repeat_interleave(10)
    clusters = torch.arange(12).repeat_interleave(10)
    once = summarise({"v": base}, n_boot=300, seed=2)["overall"]["v"]
    clustered = summarise({"v": copies}, n_boot=300, seed=2, clusters=clusters)["overall"]["v"]
    naive = summarise({"v": copies}, n_boot=300, seed=2)["overall"]["v"]
    assert clustered["lo"] == pytest.approx(once["lo"]) and clustered["hi"] == pytest.approx(once["hi"])
    assert naive["hi"] - naive["lo"] < 0.5 * (clustered["hi"] - clustered["lo"])


def test_clusters_are_refused_by_name():
    with pytest.raises(ValueError, match="clusters"):
        summarise({"v": torch.rand(4)}, clusters=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="clusters"):
        paired_difference(torch.rand(4), torch.rand(4), clusters=torch.zeros(4))
