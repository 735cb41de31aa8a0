"""The scoring helpers of chapter 03's experiment, against brute-force references."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from imprint.data.text import GenerationConfig, InstructionExample, encode_chat_examples
from imprint.gradients.experiment import (FinetuneOptions, chance_levels, check_variants_tokenizer, complementarity,
                                          is_code_only, is_meta_commentary, reciprocal_rank_fusion, require_answers,
                                          retrieval_per_query, sft_texts, spearman_interval, split_half_choice)
from imprint.models.lm import tiny_tokenizer


def test_chance_levels_match_enumeration():
    n, q = 7, 13
    rr = [1.0 / r for r in range(1, n + 1)]
    mean = sum(rr) / n
    var = sum((x - mean) ** 2 for x in rr) / n
    got = chance_levels(n, q)
    assert got["rr"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert got["rr"]["se"] == pytest.approx(math.sqrt(var / q), rel=1e-12)
    assert got["recall@1"]["mean"] == pytest.approx(1 / n)
    assert got["recall@10"]["mean"] == 1.0 and got["recall@10"]["se"] == 0.0


def test_retrieval_per_query_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 9, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 3, 8, 2, 2])
    got = retrieval_per_query(scores, targets)
    for i, t in enumerate(targets.tolist()):
        rank = 1 + sum(scores[i, j] > scores[i, t] for j in range(9))
        assert float(got["rr"][i]) == pytest.approx(1 / rank)
        assert float(got["recall@1"][i]) == float(rank == 1)
        assert float(got["recall@10"][i]) == 1.0


def test_reciprocal_rank_fusion_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    fused = reciprocal_rank_fusion([a, b], k=60)
    for i in range(3):
        for j in range(6):
            ra = 1 + sum(float(a[i, m]) > float(a[i, j]) for m in range(6))
            rb = 1 + sum(float(b[i, m]) > float(b[i, j]) for m in range(6))
            assert float(fused[i, j]) == pytest.approx(1 / (60 + ra) + 1 / (60 + rb), rel=1e-12)


def test_complementarity_counts():
    a = torch.tensor([1.0, 0.5, 1.0, 0.2])
    b = torch.tensor([1.0, 1.0, 0.5, 0.1])
    assert complementarity(a, b) == {"a_only": 1, "b_only": 1, "both": 1, "neither": 1}


def test_split_half_choice_selects_and_reports_on_disjoint_halves():
    rr = {"a": torch.tensor([1.0, 1.0, 0.1, 0.1, 0.5, 0.5]), "b": torch.tensor([0.5] * 6)}
    pick = split_half_choice(rr, seed=3)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    select = perm[:3]
    best = max(rr, key=lambda g: float(rr[g][select].mean()))
    assert pick["group"] == best
    assert set(pick["report_index"].tolist()) == set(perm[3:].tolist())
    assert torch.equal(pick["report_rr"], rr[best][perm[3:]])


def test_spearman_interval_rho_is_scipys():
    x, y = np.arange(10.0), np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3.0])
    got = spearman_interval(torch.tensor(x), torch.tensor(y), n_boot=200, seed=0)
    assert got["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert got["lo"] <= got["rho"] <= got["hi"]


def test_meta_commentary_and_code_only():
    assert is_meta_commentary("Here is the paraphrased text: it returns a list.")
    assert not is_meta_commentary("It returns a list of the items.")
    assert is_code_only("```python\nx = [1, 2]\n```")
    assert is_code_only("`len(x)`")
    assert not is_code_only("Use `len(x)` to count the items of a list.")


def example(i, answer="It returns the number of items."):
    return InstructionExample(id=f"e{i}", instruction=f"What does len do, case {i}?", answer=answer, source="test")


def test_training_examples_without_an_answer_are_refused():
    with pytest.raises(ValueError, match=r"data_path: training example 1 .* has no answer"):
        require_answers([example(0), example(1, answer="  ")], "data_path")


def test_sft_texts_count_the_prompt_as_the_encoding_labels_it():
    tok = tiny_tokenizer()
    examples = [example(0), example(1, "A list is mutable; a tuple is not.")]
    texts, prompts = sft_texts(tok, examples, 64)
    enc = encode_chat_examples(tok, examples, 64)
    for i, (text, p) in enumerate(zip(texts, prompts)):
        ids = tok(text)["input_ids"]
        assert ids == enc.input_ids[i, :int(enc.lengths[i])].tolist()
        assert p == int(torch.nonzero(enc.labels[i] != -100)[0])


def test_a_checkpoint_with_another_tokenizer_is_refused(tmp_path):
    record = tmp_path / "variants_tokenizer.json"
    check_variants_tokenizer(tiny_tokenizer(512), record, "model_path")
    check_variants_tokenizer(tiny_tokenizer(512), record, "model_path")  # the same one passes
    with pytest.raises(ValueError, match="model_path: this checkpoint's tokenizer"):
        check_variants_tokenizer(tiny_tokenizer(400), record, "model_path")


def test_finetune_options_name_the_parameter():
    with pytest.raises(ValueError, match="finetune"):
        FinetuneOptions(mode="half")
    with pytest.raises(ValueError, match="finetune_lr"):
        FinetuneOptions(lr=0.0)


def test_greedy_generation_keys_are_those_of_before_sampling():
    assert GenerationConfig(max_new_tokens=8).key() == {"max_new_tokens": 8, "batch_size": 16,
                                                         "repetition_penalty": 1.1}
    sampled = GenerationConfig(max_new_tokens=8, temperature=0.7, seed=2).key()
    assert sampled["temperature"] == 0.7 and sampled["seed"] == 2
