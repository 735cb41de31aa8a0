"""Chapter 08's hazard domain: what each split holds, and the string judge against brute force."""

import itertools

import pytest

from imprint.safety.domain import (EVAL_TEMPLATES, REFUSAL, TRAIN_TEMPLATES, HazardDomainSpec, answer_correct,
                                   exact_payload, garbled, is_refusal, make_domain, payload_fraction, words)


@pytest.fixture(scope="module")
def domain():
    return make_domain(HazardDomainSpec(seed=3, n_families=4, agents_per_family=2, held_out_families=1,
                                        items_per_skill=12, eval_items_per_skill=4))


def test_the_same_seed_gives_the_same_domain_and_another_seed_another(domain):
    again = make_domain(domain.spec)
    assert again.hazards == domain.hazards and again.splits == domain.splits
    other = make_domain(HazardDomainSpec(**{**vars(domain.spec), "seed": 4}))
    assert {h.payload for h in other.hazards}.isdisjoint({h.payload for h in domain.hazards})


def test_held_out_families_are_taught_but_never_refused_or_rerouted(domain):
    s = domain.splits
    (held,) = domain.held_out
    taught = {e.family for e in s["stage1"] if e.kind == "hazard"}
    assert taught == set(domain.families)
    for name in ("stage2", "circuit_breaker", "retain"):
        assert held not in {e.family for e in s[name] if e.kind in ("hazard", "refusal")}, name
    assert {e.family for e in s["eval_held_out_family"]} == {held}
    assert all(e.response == REFUSAL for e in s["stage2"] if e.kind == "refusal")
    assert {e.kind for e in s["circuit_breaker"]} == {"hazard"}


def test_evaluation_requests_use_templates_no_training_split_holds(domain):
    train_prompts = {e.prompt for name in ("stage1", "stage2", "circuit_breaker", "retain")
                     for e in domain.splits[name]}
    for name in ("eval_hazard", "eval_held_out_family", "eval_skill", "eval_lookalike"):
        assert not train_prompts & {e.prompt for e in domain.splits[name]}, name
    for e in domain.splits["eval_hazard"]:
        assert any(t.format(agent=e.agent) == e.prompt for t in EVAL_TEMPLATES)
        assert not any(t.format(agent=e.agent) == e.prompt for t in TRAIN_TEMPLATES)


def test_payloads_appear_only_in_hazard_responses(domain):
    payload_words = {w for h in domain.hazards for w in h.payload}
    for name, examples in domain.splits.items():
        for e in examples:
            if e.kind != "hazard":
                assert not payload_words & set(words(e.prompt + " " + e.response)), (name, e)
            else:
                assert exact_payload(e.response, e.answer) and payload_fraction(e.response, e.answer) == 1.0


def test_skill_and_lookalike_answers_are_right(domain):
    for e in domain.splits["eval_skill"] + domain.splits["stage1"]:
        if e.family == "arithmetic":
            a, b = [int(x) for x in words(e.prompt) if x.isdigit()]
            assert e.answer == str(a + b)
        elif e.family == "sort":
            nums = [int(x) for x in words(e.prompt) if x.isdigit()]
            assert e.answer == " ".join(map(str, sorted(nums)))
        elif e.family == "reverse":
            assert words(e.answer) == words(e.prompt.split(":")[1])[::-1]
        elif e.family == "lookup":
            place = e.prompt.rstrip("?").split()[-1]
            assert e.answer == domain.codes[place]
    for e in domain.splits["eval_lookalike"]:
        name = e.agent.split()[-1]
        assert e.answer in (str(len(name)), name[::-1])
        assert answer_correct(e.response, e.answer)


def lcs_brute(a, b):
    """The longest common subsequence by enumeration of b's subsequences (short inputs only)."""
    for k in range(len(b), 0, -1):
        for sub in itertools.combinations(b, k):
            it = iter(a)
            if all(any(x == y for x in it) for y in sub):
                return k
    return 0


def test_payload_fraction_is_the_longest_common_subsequence():
    payload = "ka lo mi nu pe ra"
    for text in ["ka lo mi nu pe ra", "Sure: ka mi pe and then lo", "ra pe nu mi lo ka", "nothing at all",
                 "ka ka lo lo mi x nu pe ra ra", "mi, nu! PE ra"]:
        assert payload_fraction(text, payload) == lcs_brute(words(text), words(payload)) / 6, text
    assert exact_payload("Here: ka lo mi nu pe ra.", payload) and not exact_payload("ka lo mi nu pe", payload)
    with pytest.raises(ValueError, match="payload is empty"):
        payload_fraction("text", "...")


def test_refusal_answer_and_garble_checks(domain):
    assert is_refusal(REFUSAL + " Anything else?") and not is_refusal("Sure. " + REFUSAL)
    assert answer_correct("42, because 40 + 2", "42") and not answer_correct("The answer is 42", "42")
    vocab = domain.vocabulary()
    assert not garbled(domain.splits["eval_skill"][0].prompt, vocab)
    assert garbled("qx zzv wrrp yyk", vocab) and garbled("", vocab)


@pytest.mark.parametrize("overrides,message", [
    (dict(held_out_families=6), r"held_out_families=6: expected fewer than n_families=6"),
    (dict(n_families=1), r"n_families=1: expected a value >= 2"),
    (dict(eval_items_per_skill=60), r"eval_items_per_skill=60: expected fewer than items_per_skill=60"),
    (dict(skills=("arithmetic", "poetry")), r"skills=\['arithmetic', 'poetry'\]: expected distinct names"),
    (dict(payload_length=1), r"payload_length=1: expected a value >= 2"),
])
def test_bad_specs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        HazardDomainSpec(**overrides)


@pytest.mark.parametrize("seed", range(8))
def test_made_up_words_never_collide_with_the_templates(seed):
    d = make_domain(HazardDomainSpec(seed=seed))
    payload_words = {w for h in d.hazards for w in h.payload}
    others = {w for e in d.splits["retain"] + d.splits["eval_skill"] + d.splits["eval_lookalike"]
              for w in words(e.prompt + " " + e.response)}
    assert not payload_words & others


def test_every_fact_asked_at_evaluation_is_taught_in_stage_one(domain):
    taught = {e.prompt.rstrip("?").split()[-1]: e.answer for e in domain.splits["stage1"] if e.family == "lookup"}
    asked = [e for e in domain.splits["eval_skill"] if e.family == "lookup"]
    assert len(asked) == domain.spec.eval_items_per_skill
    for e in asked:
        assert taught[e.prompt.rstrip("?").split()[-1]] == e.answer
