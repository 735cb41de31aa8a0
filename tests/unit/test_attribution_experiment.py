"""Chapter 07's experiment functions: the query draw and its validation/test split, the score cache a rerun
reads back, the metrics table and the rule for beating BM25 on scores whose answer is known."""

import torch

from imprint.attribution import experiment as ex
from imprint.attribution.evaluation import LogitEvaluation
from imprint.data.hops import generate_hops_documents, hops_queries, hops_spec, relevance_mask, spec_functions


def evaluated(queries, correct):
    """A logit evaluation whose correct queries are given."""
    q = len(queries)
    return LogitEvaluation(queries=queries, candidates=[0, 1], predicted=torch.zeros(q, dtype=torch.long),
                           correct=correct, confidence=torch.ones(q), probs=torch.ones(q, 2) / 2,
                           per_function={}, per_depth={})


def corpus():
    spec = hops_spec(3, docs_per_base=6, docs_per_wrapper=4)
    docs = generate_hops_documents(spec)
    functions = spec_functions(spec)
    return docs, functions, hops_queries(functions, inputs=range(1, 9))


def test_queries_are_drawn_per_function_and_split_alternately():
    _, _, queries = corpus()
    correct = torch.tensor([q.input != 3 or q.hop_depth == 0 for q in queries])
    evaluation = evaluated(queries, correct)
    qs = ex.attribution_queries(evaluation, per_function=4, seed=0)
    funcs = [q.func for q in qs.queries]
    assert all(funcs.count(f) == 4 for f in set(funcs)) and len(set(funcs)) == 6
    assert all(correct[queries.index(q)] for q in qs.queries)
    for f in set(funcs):
        rows = [i for i, g in enumerate(funcs) if g == f]
        assert qs.validation[rows].tolist() == [True, False, True, False]
    again = ex.attribution_queries(evaluation, per_function=4, seed=0)
    assert [q.uid for q in again.queries] == [q.uid for q in qs.queries]
    assert qs.clusters().unique().numel() == 6


def test_the_cache_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).reshape(2, 3)

    first, _ = ex.cached(tmp_path, "m", "k1", compute)
    second, _ = ex.cached(tmp_path, "m", "k1", compute)
    assert len(calls) == 1 and torch.equal(first, second)
    ex.cached(tmp_path, "m", "k2", compute)
    assert len(calls) == 2


def test_a_perfect_scorer_beats_bm25_and_random_does_not():
    docs, functions, queries = corpus()
    evaluation = evaluated(queries, torch.ones(len(queries), dtype=torch.bool))
    qs = ex.attribution_queries(evaluation, per_function=6, seed=1)
    relevant = relevance_mask(qs.queries, docs, functions)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(relevant.shape, generator=gen)
    scores = {"BM25": noise + 0.3 * relevant, "perfect": relevant.float() + 0.01 * noise,
              "random": torch.rand(relevant.shape, generator=gen)}
    from imprint.attribution.metrics import hops_categories

    table = ex.method_table(scores, relevant, qs, hops_categories(qs.queries, docs, functions), n_boot=200)
    head = ex.headline(table)
    assert head["beats_reference"] == ["perfect"]
    assert table["perfect"]["summary"]["wrapper"]["precision@10"]["mean"] == 1.0
    assert table["perfect"]["summary"]["wrapper"]["precision@10"]["clusters"] == 3
    comp = table["perfect"]["composition@10"]
    assert abs(sum(comp.values()) - 1) < 1e-6 and comp["other"] == 0


def test_test_only_baselines_leave_validation_rows_nan_and_the_table_reads_them():
    docs, functions, queries = corpus()
    qs = ex.attribution_queries(evaluated(queries, torch.ones(len(queries), dtype=torch.bool)), per_function=4)
    seen = []

    def compute(qq):
        seen.append([q.uid for q in qq])
        return torch.ones(len(qq), len(docs))

    full = ex._on_test_rows(qs, len(docs), compute)
    assert seen[0] == [q.uid for q, t in zip(qs.queries, qs.test.tolist()) if t]
    assert torch.isnan(full[qs.validation]).all() and (full[qs.test] == 1).all()
    relevant = relevance_mask(qs.queries, docs, functions)
    from imprint.attribution.metrics import hops_categories

    table = ex.method_table({"x": full + torch.rand(full.shape)}, relevant, qs,
                            hops_categories(qs.queries, docs, functions), n_boot=50)
    assert table["x"]["summary"]["overall"]["precision@10"]["n"] == int(qs.test.sum())


def test_versus_is_the_mean_paired_difference_of_precision_at_10():
    docs, functions, queries = corpus()
    qs = ex.attribution_queries(evaluated(queries, torch.ones(len(queries), dtype=torch.bool)), per_function=6)
    relevant = relevance_mask(qs.queries, docs, functions)
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(relevant.shape, generator=gen) + 0.5 * relevant,
              "b": torch.rand(relevant.shape, generator=gen)}
    got = ex.versus(scores, relevant, qs, "a", "b", n_boot=200)
    rows = [i for i in range(len(qs.queries)) if qs.test[i] and qs.queries[i].hop_depth >= 1]

    def p10(s, i):
        top = sorted(range(len(docs)), key=lambda j: -float(s[i, j]))[:10]
        return sum(bool(relevant[i, j]) for j in top) / 10

    want = sum(p10(scores["a"], i) - p10(scores["b"], i) for i in rows) / len(rows)
    assert abs(got["mean"] - want) < 1e-9 and got["n"] == len(rows)
    assert got["lo"] <= got["hi"]
    import pytest

    with pytest.raises(ValueError, match=r"method 'c': not among the scored methods \['a', 'b'\]"):
        ex.versus(scores, relevant, qs, "a", "c")


def test_first_layer_reaching_reads_the_per_layer_precision():
    choice = ex.LayerChoice(layers=[0, 1, 2, 3], precision_at_10={"base": [0.1, 0.2, 1.0, 1.0],
                                                                  "wrapper": [0.1, 0.95, 0.5, 1.0]},
                            weights=[0.25] * 4, best_layer=3)
    assert ex.first_layer_reaching(choice, 0.9) == 1
    assert ex.first_layer_reaching(choice, 0.9, group="base") == 2
    assert ex.first_layer_reaching(choice, 1.01) is None


def test_caches_and_checkpoints_are_keyed_by_the_corpus(tmp_path):
    from imprint.data.hops import HopsSpec

    spec = hops_spec(3, docs_per_base=6, docs_per_wrapper=4)
    shared = HopsSpec(**{**vars(spec), "constants": (5, 5, 7)})
    a, b = generate_hops_documents(spec), generate_hops_documents(shared)
    assert [d.uid for d in a] == [d.uid for d in b]  # the same uids: the texts and constants differ
    assert ex.corpus_digest(a) == ex.corpus_digest(list(a)) != ex.corpus_digest(b)
    tune = dict(steps=10, lr=1e-3)
    assert ex.finetune_dir(tmp_path, "tiny", a, tune) == ex.finetune_dir(tmp_path, "tiny", a, dict(tune))
    assert len({ex.finetune_dir(tmp_path, "tiny", a, tune), ex.finetune_dir(tmp_path, "tiny", b, tune),
                ex.finetune_dir(tmp_path, "smollm2", a, tune),
                ex.finetune_dir(tmp_path, "tiny", a, dict(tune, steps=11))}) == 4
