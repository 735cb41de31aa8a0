"""The chapter's gradient passes on a tiny Llama: exact inner products and projections per store
partition, against single-example backward passes; partitions resumed and loaded give the same Gram."""

import pytest
import torch

from imprint.data.text import InstructionExample, encode_chat_examples
from imprint.gradients.per_example import (GradientProjection, capture_rows, factor_sites, per_example_gradients_loop,
                                           weight_matrix_names)
from imprint.gradients.pipeline import (EXACT_SHARED, exact_gram, exact_rows, features, keys_to_form, projected_gram,
                                       projected_rows)
from imprint.gradients.similarity import retrieval_metrics
from imprint.gradients.store import GradientStore, fill_partitions
from imprint.models.lm import tiny_llama

TRAIN = [InstructionExample(str(i), q, a, "t") for i, (q, a) in enumerate([
    ("What does len do?", "Return the number of items in a container."),
    ("What is a tuple?", "An immutable sequence."),
    ("Explain pass.", "A null operation: nothing happens."),
    ("What does abs do?", "Return the absolute value of the argument."),
    ("What is None?", "The sole value of the type NoneType."),
])]
VARIANTS = {
    "paraphrased": [InstructionExample(e.id, "Tell me: " + e.instruction, e.answer + " Indeed.", "t") for e in TRAIN],
    "model_generated": [InstructionExample(e.id, e.instruction, "I think " + e.answer.lower(), "t") for e in TRAIN],
}


@pytest.fixture(scope="module")
def setup():
    lm = tiny_llama(2, dtype="float64")
    train = encode_chat_examples(lm.tokenizer, TRAIN, max_length=128)
    variants = {s: encode_chat_examples(lm.tokenizer, v, max_length=128) for s, v in VARIANTS.items()}
    names = weight_matrix_names(lm.model)
    flat = {}
    for key, enc in [("train", train), *variants.items()]:
        grads = per_example_gradients_loop(lm.model, enc.input_ids, enc.labels, names, enc.lengths)
        flat[key] = {n: g.flatten(1) for n, g in grads.items()}
    return lm, train, variants, names, flat


def test_exact_rows_against_single_example_gradients(setup):
    lm, train, variants, names, flat = setup
    projection = GradientProjection(lm.model, [4], seed=1)
    rows = exact_rows(lm.model, train, variants, 1, 4, factor_sites(lm.model), batch_size=2, projection=projection)
    for setting in variants:
        for n in names:
            torch.testing.assert_close(rows[f"dot/{setting}/{n}"], flat["train"][n][1:4] @ flat[setting][n].T,
                                       rtol=1e-9, atol=1e-14)
            torch.testing.assert_close(rows[f"query_sqnorm/{setting}/{n}"], flat[setting][n].square().sum(1),
                                       rtol=1e-9, atol=1e-14)
    alone = projected_rows(lm.model, variants["paraphrased"], 0, 5, projection, batch_size=5)
    for n in names:
        torch.testing.assert_close(rows[f"sqnorm/{n}"], flat["train"][n][1:4].square().sum(1), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(rows[f"query/paraphrased/k4/{n}"], alone[f"k4/{n}"][1:4], rtol=1e-5, atol=1e-8)


def test_partitioned_exact_store_gives_the_one_shot_gram(setup, tmp_path):
    lm, train, variants, names, flat = setup
    projection = GradientProjection(lm.model, [4, 9], seed=0)
    sites = factor_sites(lm.model)
    store = GradientStore(tmp_path / "exact", len(train), {"test": 1}, shared=EXACT_SHARED)
    compute = lambda s, e: exact_rows(lm.model, train, variants, s, e, sites, 2, projection)  # noqa: E731
    fill_partitions(store, 0, 3, 2, compute, progress=False)   # one process: rows [0, 3)
    fill_partitions(store, 3, 5, 2, compute, progress=False)   # another: rows [3, 5)
    loaded = store.load()
    for setting in variants:
        gram = exact_gram(loaded, setting, names)
        for n in names:
            torch.testing.assert_close(gram.dots[n], flat[setting][n] @ flat["train"][n].T, rtol=1e-9, atol=1e-14)
        grouped = gram.grouped({"model": names}).scores("cosine")["model"]
        whole_q = torch.cat([flat[setting][n] for n in names], 1)
        whole_k = torch.cat([flat["train"][n] for n in names], 1)
        expected = torch.nn.functional.normalize(whole_q, dim=1) @ torch.nn.functional.normalize(whole_k, dim=1).T
        torch.testing.assert_close(grouped, expected, rtol=1e-9, atol=1e-12)
        assert set(retrieval_metrics(grouped)) == {"recall@1", "recall@10", "mrr"}
        proj = projected_gram(features(loaded, "train/", 9, names), features(loaded, f"query/{setting}/", 9, names))
        assert proj.dots[names[0]].shape == (5, 5)
        alone = projected_rows(lm.model, variants[setting], 0, 5, projection, batch_size=5)
        torch.testing.assert_close(proj.dots[names[0]], (alone[f"k9/{names[0]}"] @ loaded[f"train/k9/{names[0]}"].T)
                                   .double(), rtol=1e-5, atol=1e-9)


def test_query_blocks_and_their_order_do_not_change_the_numbers(setup):
    lm, train, variants, names, flat = setup
    sites = factor_sites(lm.model)
    one = {"paraphrased": variants["paraphrased"]}
    a = exact_rows(lm.model, train, one, 0, 2, sites, batch_size=2, query_block=3)
    b = exact_rows(lm.model, train, one, 0, 2, sites, batch_size=1, query_block=5, method="materialise",
                   length_order=False)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="query_block"):
        exact_rows(lm.model, train, one, 0, 2, sites, batch_size=2, query_block=0)


@pytest.mark.parametrize("method", ["materialise", "auto"])
def test_keys_formed_once_give_the_same_numbers(setup, method):
    lm, train, variants, names, flat = setup
    sites = factor_sites(lm.model)
    plain = exact_rows(lm.model, train, variants, 1, 4, sites, batch_size=2, query_block=2, method=method)
    kept = exact_rows(lm.model, train, variants, 1, 4, sites, batch_size=2, query_block=2, method=method,
                      key_elements=10 ** 9)
    assert set(plain) == set(kept)
    for key in plain:
        torch.testing.assert_close(kept[key], plain[key], rtol=1e-9, atol=1e-14)
    for setting in variants:
        for n in names:
            torch.testing.assert_close(kept[f"dot/{setting}/{n}"], flat["train"][n][1:4] @ flat[setting][n].T,
                                       rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="key_elements"):
        exact_rows(lm.model, train, variants, 1, 4, sites, batch_size=2, key_elements=-1)


@pytest.mark.parametrize("method", ["materialise", "ghost"])
def test_exact_rows_never_read_memory_they_did_not_write(setup, method):
    """With every new tensor filled with NaN, the numbers are finite and the same as without the fill."""
    lm, train, variants, names, flat = setup
    sites = factor_sites(lm.model)
    projection = GradientProjection(lm.model, [4], seed=1)
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    runs = []
    try:
        for fill in (True, False):
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = fill
            runs.append(exact_rows(lm.model, train, variants, 1, 4, sites, batch_size=2, projection=projection,
                                   method=method, query_block=2, key_elements=10 ** 9))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
    filled, plain = runs
    assert set(filled) == set(plain)
    for key in filled:
        assert torch.isfinite(filled[key]).all(), key
        torch.testing.assert_close(filled[key], plain[key], rtol=0, atol=0)


def test_keys_to_form_stays_within_its_budget(setup):
    lm, train, variants, names, flat = setup
    keys = capture_rows(lm.model, train, 0, 3, factor_sites(lm.model), batch_size=3)
    size = {n: keys.n * flat["train"][n].shape[1] for n in names}
    assert keys_to_form(keys, 1 << 20, "materialise", sum(size.values())) == names
    assert keys_to_form(keys, 1 << 20, "ghost", sum(size.values())) == []
    assert keys_to_form(keys, 1 << 20, "materialise", 0) == []
    budget = sum(size.values()) // 2
    chosen = keys_to_form(keys, 1 << 20, "materialise", budget)
    assert 0 < sum(size[n] for n in chosen) <= budget and len(chosen) < len(names)
    assert chosen == [n for n in names if n in chosen]  # model order


def test_killed_projected_pass_resumes_with_identical_numbers(setup, tmp_path):
    lm, train, variants, names, flat = setup
    projection = GradientProjection(lm.model, [4], seed=0)
    compute = lambda s, e: projected_rows(lm.model, train, s, e, projection, batch_size=2)  # noqa: E731
    calls = []

    def dies_after_one(s, e):
        if calls:
            raise KeyboardInterrupt
        calls.append((s, e))
        return compute(s, e)

    resumed = GradientStore(tmp_path / "resumed", len(train), {"test": 1})
    with pytest.raises(KeyboardInterrupt):
        fill_partitions(resumed, 0, 5, 2, dies_after_one, progress=False)
    assert resumed.partitions() == [(0, 2)]
    assert fill_partitions(resumed, 0, 5, 2, compute, progress=False) == [(2, 4), (4, 5)]
    straight = GradientStore(tmp_path / "straight", len(train), {"test": 1})
    fill_partitions(straight, 0, 5, 2, compute, progress=False)
    a, b = resumed.load(), straight.load()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_one_variant_per_training_example_is_required(setup):
    lm, train, variants, names, flat = setup
    short = {"paraphrased": variants["paraphrased"].select(0, 3)}
    with pytest.raises(ValueError, match="one per training example"):
        exact_rows(lm.model, train, short, 0, 2, factor_sites(lm.model), batch_size=2)
