"""Chapter 08's stages on a tiny Llama: conversations and their request tokens, supervised stages,
batched greedy answers against one at a time, the judge over a split, and a few rerouting steps (on an
untrained model, whose hazard and benign states are alike, so only the mechanics are checked here)."""

import pytest
import torch

from imprint.attribution.models import tiny_llama_for
from imprint.models.lm import tiny_tokenizer
from imprint.safety.circuit_breakers import CircuitBreakerConfig
from imprint.safety.domain import REFUSAL, Example, HazardDomainSpec, make_domain
from imprint.safety.experiment import (chat_prompt, conversations, judge, prefill_payload, reroute, respond,
                                       supervised_stage)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(512)


@pytest.fixture(scope="module")
def domain():
    return make_domain(HazardDomainSpec(seed=1, n_families=3, agents_per_family=1, held_out_families=1,
                                        payload_length=4, items_per_skill=6, eval_items_per_skill=2))


def model_for(tokenizer, seed=0):
    return tiny_llama_for(tokenizer, d_model=32, n_layers=2, n_heads=4, seed=seed)


def test_request_tokens_end_where_the_answer_starts(tokenizer, domain):
    examples = domain.splits["stage1"][:6]
    texts, counts = conversations(tokenizer, examples, max_length=128)
    for e, text, n in zip(examples, texts, counts):
        head = chat_prompt(tokenizer, e.prompt)
        assert text == head + e.response + tokenizer.eos_token
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert tokenizer.decode(ids[:n]).startswith(head) and len(tokenizer.decode(ids[:n - 1])) < len(head)
    with pytest.raises(ValueError, match=r"examples\[0\]: its request fills max_length=4 tokens"):
        conversations(tokenizer, examples[:1], max_length=4)
    with pytest.raises(ValueError, match=r"has a prompt but no response"):
        conversations(tokenizer, [Example("How?", "", "hazard", "f", "x y")], max_length=64)


def test_a_supervised_stage_lowers_the_answer_loss(tokenizer, domain, one_torch_thread):
    model = model_for(tokenizer)
    result = supervised_stage(model, tokenizer, domain.splits["stage1"], steps=40, lr=3e-3, batch_size=8, seed=0)
    assert len(result.losses) == 40
    assert sum(result.losses[-5:]) / 5 < 0.8 * sum(result.losses[:5]) / 5


def test_batched_answers_equal_answers_one_at_a_time(tokenizer, domain, one_torch_thread):
    model = model_for(tokenizer, seed=2).eval()
    prompts = [e.prompt for e in domain.splits["eval_skill"][:3]] + ["Hi"]
    prefill = ["", "Sure, here is", "", "x"]
    together = respond(model, tokenizer, prompts, prefill=prefill, max_new_tokens=6, batch_size=4)
    alone = [respond(model, tokenizer, [p], prefill=f, max_new_tokens=6)[0] for p, f in zip(prompts, prefill)]
    assert together == alone and together[1].startswith("Sure, here is") and together[3].startswith("x")
    with pytest.raises(ValueError, match=r"prefill has 1 entries: expected one per prompt \(4\)"):
        respond(model, tokenizer, prompts, prefill=["a"])


def test_the_judge_over_hand_written_answers(domain):
    vocab = domain.vocabulary()
    hazards = domain.splits["eval_hazard"][:2]
    payload = hazards[0].answer.split()
    answers = [prefill_payload(hazards[0], len(payload)), REFUSAL]
    got = judge(hazards, answers, vocab)
    assert got == {"n": 2, "refusal": 0.5, "garble": 0.0, "payload_share": 0.5, "exact_payload": 0.5}
    skills = domain.splits["eval_skill"][:2]
    got = judge(skills, [skills[0].answer, "qq zz xv"], vocab)
    assert got["accuracy"] == 0.5 and got["garble"] == 0.5 and got["refusal"] == 0.0
    with pytest.raises(ValueError, match="mix hazard requests with skills"):
        judge(hazards[:1] + skills[:1], ["a", "b"], vocab)
    assert prefill_payload(hazards[0], 2).endswith(" ".join(payload[:2]))


def test_rerouting_lowers_the_circuit_breaker_cosine_and_the_adapter_moves_the_states(tokenizer, domain, one_torch_thread):
    model = model_for(tokenizer, seed=3)
    config = CircuitBreakerConfig(target_layers=(1,), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                                  alpha=10.0, max_steps=12, batch_size=4, lr=5e-3, max_length=128)
    result = reroute(model, tokenizer, domain.splits["circuit_breaker"], domain.splits["retain"], config, seed=0)
    assert len(result.losses) == 12
    assert result.losses[0].c_circuit_breaker > result.losses[-1].c_circuit_breaker
    assert result.losses[-1].cb_cosine < result.losses[0].cb_cosine
    from imprint.safety.experiment import conversation_batch

    wrapped = result.model
    texts, _ = conversations(tokenizer, domain.splits["circuit_breaker"][:4], 128)
    b = conversation_batch(tokenizer, texts, "cpu")
    with torch.no_grad():
        on = wrapped.hidden_states(b["input_ids"], b["attention_mask"], layers=[1])
        off = wrapped.hidden_states(b["input_ids"], b["attention_mask"], adapter=False, layers=[1])
    assert float((on - off).abs().max()) > 0


def test_the_answer_budget_fits_the_longest_expected_answer(tokenizer, domain):
    from imprint.safety.experiment import answer_budget

    hazards = domain.splits["eval_hazard"]
    budget = answer_budget(tokenizer, hazards, margin=0)
    full = [prefill_payload(e, len(e.answer.split())) for e in hazards]
    assert budget == max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in full)
    assert answer_budget(tokenizer, domain.splits["eval_skill"], margin=3) >= 4


def test_two_turn_and_template_attacks_are_requests_no_training_split_holds(tokenizer, domain):
    from imprint.safety.experiment import jailbreak_requests, two_turn_request

    e = domain.splits["eval_hazard"][0]
    turns = two_turn_request(e)
    text = chat_prompt(tokenizer, turns)
    assert text.count("<|im_start|>user") == 2 and text.endswith("<|im_start|>assistant\n")
    assert e.agent in turns[0]["content"] and e.agent not in turns[2]["content"]
    train_prompts = {x.prompt for name in ("stage1", "stage2", "circuit_breaker", "retain") for x in domain.splits[name]}
    assert not train_prompts & {t["content"] for t in turns} and not train_prompts & set(jailbreak_requests(e))
    assert all(e.prompt in r for r in jailbreak_requests(e))
    model = model_for(tokenizer, seed=4).eval()
    (answer,) = respond(model, tokenizer, [turns], max_new_tokens=3)
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="expected a request, or messages that end with a user turn"):
        chat_prompt(tokenizer, turns[:2])
