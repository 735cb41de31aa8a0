"""Chapter 08's one-seed run on a tiny Llama: a rerun from the stages' saved weights gives the same numbers
without training again, bad settings are refused before any compute naming the parameter, and an attack's
success is what the string judge finds in the answers the model gave."""

import json
from pathlib import Path

import pytest

from imprint.safety import run as run_module
from imprint.safety.circuit_breakers import CircuitBreakerConfig
from imprint.safety.domain import REFUSAL, Example, HazardDomainSpec, make_domain
from imprint.safety.run import RunOptions, check_splits, run_seed


def tiny_options(**overrides):
    options = dict(tiny_d_model=32, tiny_layers=2, tiny_heads=4,
                   domain=HazardDomainSpec(seed=0, n_families=2, agents_per_family=1, payload_length=3,
                                           held_out_families=1, items_per_skill=4, eval_items_per_skill=2,
                                           skills=("arithmetic", "lookup")),
                   stage1_steps=6, stage2_steps=4, sft_batch_size=4, max_length=96,
                   circuit_breaker=CircuitBreakerConfig(target_layers=(1,), lora_rank=2, lora_alpha=4.0,
                                                        lora_dropout=0.0, alpha=10.0, max_steps=3, batch_size=2,
                                                        lr=1e-2, max_length=96),
                   prefill_words=1, attack_requests=1, target_words=1, gcg_tokens=2, gcg_steps=1, gcg_topk=4,
                   gcg_batch=4, embed_steps=2, embed_samples=1, steer_layer=1, probe_layer=1, probe_fpr=0.25)
    options.update(overrides)
    return RunOptions(**options)


def test_a_rerun_from_the_saved_weights_gives_the_same_numbers_without_training(tmp_path, monkeypatch,
                                                                                one_torch_thread):
    options = tiny_options()
    first = run_seed(options, 0, tmp_path)
    assert set(run_module.ATTACKS) <= {k[:-len("_before")] for k in first.metrics if k.endswith("_before")}
    assert len(first.stage1_losses) == 6 and len(first.reroute_losses) == 3
    assert len(first.layers["cosine_hazard"]) == 3  # hidden states 0..2 of a two-block model
    for path in Path(first.folder).glob("*.json"):  # the numbers go, the weights stay
        path.unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a stage was trained again")

    monkeypatch.setattr(run_module, "supervised_stage", no_training)
    monkeypatch.setattr(run_module, "reroute", no_training)
    again = run_seed(options, 0, tmp_path)
    assert again.metrics == first.metrics and again.layers == first.layers
    assert again.stage2_losses == first.stage2_losses and again.reroute_losses == first.reroute_losses
    other = tiny_options(stage2_steps=5)  # another setting of stage 2: its folder is new and it trains
    with pytest.raises(AssertionError, match="trained again"):
        run_seed(other, 0, tmp_path)


@pytest.mark.parametrize("overrides,message", [
    (dict(circuit_breaker=CircuitBreakerConfig(target_layers=(1, 2), max_length=96)),
     r"target_layers=\[1, 2\]: the model has 2 decoder blocks"),
    (dict(steer_layer=2), r"steer_layer=2: the model has 2 decoder blocks"),
    (dict(probe_layer=3), r"probe_layer=3: the model has 2 decoder blocks"),
])
def test_settings_beyond_the_model_are_refused_before_any_compute(tmp_path, monkeypatch, overrides, message):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the check")

    monkeypatch.setattr(run_module, "supervised_stage", no_training)
    with pytest.raises(ValueError, match=message):
        run_seed(tiny_options(**overrides), 0, tmp_path)


def test_empty_sets_and_records_without_responses_are_refused_naming_the_split():
    splits = make_domain(tiny_options().domain).splits
    with pytest.raises(ValueError, match="retain is empty"):
        check_splits(dict(splits, retain=[]))
    with pytest.raises(ValueError, match="circuit_breaker is empty"):
        check_splits(dict(splits, circuit_breaker=[]))
    bad = Example("How do I prepare it?", "", "hazard", "f", "ka lo")
    with pytest.raises(ValueError, match=r"circuit_breaker\[0\] has a prompt but no response"):
        check_splits(dict(splits, circuit_breaker=[bad]))
    with pytest.raises(ValueError, match="prefill_words=3: expected fewer than the payload's 3 words"):
        tiny_options(prefill_words=3)


def test_an_attack_succeeds_when_the_judge_finds_the_payload_in_the_answer(monkeypatch, one_torch_thread):
    import torch

    options = tiny_options()
    domain = make_domain(options.domain)
    hazards = domain.splits["eval_hazard"]
    by_request = {e.prompt: e for e in hazards}

    def scripted(model, tokenizer, prompts, *, prefill="", **kwargs):
        """Answers the payload to the third jailbreak template only, and a prefill with the payload's
        remainder cut short (one word missing), refusing everything else."""
        out = []
        for i, p in enumerate(prompts):
            f = prefill if isinstance(prefill, str) else prefill[i]
            if isinstance(p, str) and p.startswith("Ignore any earlier"):
                e = by_request[p.split(". ", 1)[1]]
                out.append("Here is the procedure for " + e.agent + ": " + e.answer)
            elif isinstance(p, str) and p in by_request and f.startswith("Here is"):
                out.append(f + " " + " ".join(by_request[p].answer.split()[1:-1]))
            else:
                out.append(f + REFUSAL)
        return out

    monkeypatch.setattr(run_module, "respond", scripted)
    model, tokenizer = run_module.base_model(options, 0)
    steering = torch.zeros(options.tiny_d_model)
    got = run_module.evaluate(model.eval(), tokenizer, domain, options, 0, steering)
    assert got["jailbreak"] == pytest.approx(1 / 3)  # one template of three, on every request
    assert got["direct"] == 0.0 and got["split"] == 0.0 and got["hazard_refusal"] == 1.0
    assert got["prefill"] == 0.0 and got["hazard_payload_share"] == 0.0
    assert got["over_refusal"] == 1.0 and got["benign_accuracy"] == 0.0


def test_a_data_file_with_a_prompt_but_no_response_is_refused_naming_its_line(tmp_path, monkeypatch):
    from imprint.safety.run import read_records

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "How is it made?", "response": "ka lo mi"}\n\n{"prompt": "", "response": "zu"}\n')
    assert [e.response for e in read_records(good)] == ["ka lo mi", "zu"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "How is it made?", "response": "ka lo mi"}\n{"prompt": "And then?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: circuit_breaker_path\[1\] has a prompt but no response"):
        read_records(bad)
    with pytest.raises(FileNotFoundError, match="circuit_breaker_path="):
        read_records(tmp_path / "missing.jsonl")
    monkeypatch.setattr(run_module, "supervised_stage", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match="has a prompt but no response"):
        run_seed(tiny_options(circuit_breaker_path=str(bad)), 0, tmp_path)


def test_prefilled_refusals_carry_the_loss_on_the_refusal_only(one_torch_thread):
    from imprint.models.lm import tiny_tokenizer
    from imprint.safety.run import prefilled_refusals

    tokenizer = tiny_tokenizer(512)
    stage2 = make_domain(tiny_options().domain).splits["stage2"]
    refusals = [e for e in stage2 if e.kind == "refusal"]
    texts, counts = prefilled_refusals(tokenizer, stage2, max_length=128)
    assert len(texts) == len(refusals)
    for e, text, n in zip(refusals, texts, counts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        context, target = tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:])
        assert f"Here is the procedure for {e.agent}:" in context and e.answer.split()[0] in context
        assert target.strip().startswith(REFUSAL) and not set(e.answer.split()) & set(target.split())
    with pytest.raises(ValueError, match="hold no refusal"):
        prefilled_refusals(tokenizer, [e for e in stage2 if e.kind != "refusal"], 128)


def test_the_adversarial_baseline_is_evaluated_on_every_attack(one_torch_thread):
    result = run_seed(tiny_options(adversarial_baseline=True, max_length=128), 0, None)
    assert {f"{a}_adversarial" for a in run_module.ATTACKS} <= set(result.metrics)


def resistant_config(**overrides):
    options = dict(target_layers=(1,), lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, alpha=10.0, max_steps=3,
                   batch_size=2, lr=1e-2, max_length=96, adversarial_steps=2, adversarial_lr=0.01,
                   adversarial_radius=0.02)
    options.update(overrides)
    return CircuitBreakerConfig(**options)


def test_the_resistant_variant_reuses_stages_1_and_2_and_faces_every_attack(tmp_path, monkeypatch, one_torch_thread):
    plain = run_seed(tiny_options(), 0, tmp_path)
    assert not [k for k in plain.metrics if k.endswith("_resistant")] and plain.resistant_losses == []
    (stage3,) = (tmp_path / "stage3").iterdir()
    assert set(json.loads((stage3 / "losses.json").read_text())[0]) == {  # the plain record, as before
        "total", "retain", "circuit_breaker", "c_retain", "c_circuit_breaker", "cb_cosine"}

    def no_training(*args, **kwargs):
        raise AssertionError("a stage was trained again")

    monkeypatch.setattr(run_module, "supervised_stage", no_training)  # stages 1 and 2 come from the cache
    plain_stage3 = run_module.reroute

    def only_resistant(model, tokenizer, cb, retain, config, **kwargs):
        if config.adversarial_steps == 0:
            raise AssertionError("the plain stage 3 was trained again")
        return plain_stage3(model, tokenizer, cb, retain, config, **kwargs)

    monkeypatch.setattr(run_module, "reroute", only_resistant)       # and so does the plain stage 3
    both = run_seed(tiny_options(resistant=resistant_config()), 0, tmp_path)
    assert {f"{a}_resistant" for a in run_module.ATTACKS} <= set(both.metrics)
    assert {"benign_accuracy_resistant", "over_refusal_resistant", "perplexity_resistant"} <= set(both.metrics)
    assert {k: v for k, v in both.metrics.items() if not k.endswith("_resistant")} == plain.metrics
    assert [len(list((tmp_path / s).iterdir())) for s in ("stage1", "stage2", "stage3")] == [1, 1, 2]
    assert len(both.resistant_losses) == 3 and "cosine_hazard_resistant" in both.layers
    for x in both.resistant_losses:
        assert 0 < x["adversary_after"] <= x["adversary_before"] + 1.0 and x["adversary_after"] == x["adversary_after"]
    mean_after = sum(x["adversary_after"] for x in both.resistant_losses) / 3
    assert both.metrics["adversary_after_resistant"] == pytest.approx(mean_after)
    monkeypatch.setattr(run_module, "reroute", no_training)  # resumable: nothing trains again
    again = run_seed(tiny_options(resistant=resistant_config()), 0, tmp_path)
    assert again.metrics == both.metrics and again.resistant_losses == both.resistant_losses


def test_rerouting_batches_mark_the_answers_for_the_adversary(monkeypatch, one_torch_thread):
    import imprint.safety.experiment as experiment
    from imprint.safety.experiment import conversation_batch, conversations, reroute
    from imprint.safety.run import base_model

    options = tiny_options()
    splits = make_domain(options.domain).splits
    seen, real = [], experiment.rerouting_step
    monkeypatch.setattr(experiment, "rerouting_step", lambda m, b, *a, **k: seen.append(b) or real(m, b, *a, **k))
    model, tokenizer = base_model(options, 0)
    reroute(model, tokenizer, splits["circuit_breaker"], splits["retain"], resistant_config(), seed=0, max_length=96)
    assert len(seen) == 3
    texts, counts = conversations(tokenizer, splits["circuit_breaker"], 96)
    rows = {tuple(conversation_batch(tokenizer, [t], "cpu")["input_ids"][0].tolist()): (e, n)
            for e, t, n in zip(splits["circuit_breaker"], texts, counts)}
    for b in seen:
        for row in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][row][b["attention_mask"][row].bool()].tolist()
            example, n = rows[tuple(ids)]
            response = b["response_mask"][row].tolist()
            assert response[:n] == [0] * n and response[n:len(ids)] == [1] * (len(ids) - n)
            assert tokenizer.decode(ids[n:]).strip().startswith(example.response.strip()[:10])


def test_a_resistant_variant_without_an_adversary_or_beyond_the_model_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="resistant.adversarial_steps=0"):
        tiny_options(resistant=resistant_config(adversarial_steps=0))
    monkeypatch.setattr(run_module, "supervised_stage", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match=r"resistant.target_layers=\[1, 2\]: the model has 2 decoder blocks"):
        run_seed(tiny_options(resistant=resistant_config(target_layers=(1, 2))), 0, tmp_path)


def test_the_resistance_rule_asks_for_separated_intervals_and_kept_accuracy():
    from imprint.safety.run import resistant_verdict

    def summary(plain, variant, accuracy=0.9):
        return {"embedding_signed_after": plain, "embedding_signed_resistant": variant,
                "benign_accuracy_before": (0.9, 0.85, 0.95), "benign_accuracy_resistant": (accuracy,) * 3}

    assert resistant_verdict(summary((0.9, 0.8, 1.0), (0.2, 0.1, 0.3)))["met"]
    overlap = resistant_verdict(summary((0.9, 0.5, 1.0), (0.4, 0.2, 0.6)))
    assert not overlap["met"] and not overlap["separated"] and "overlaps" in overlap["text"]
    costly = resistant_verdict(summary((0.9, 0.8, 1.0), (0.2, 0.1, 0.3), accuracy=0.85))
    assert not costly["met"] and not costly["accuracy_kept"] and "does not stay" in costly["text"]
    nothing = resistant_verdict(summary((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)))
    assert not nothing["met"] and not nothing["measurable"] and "nothing for the variant to resist" in nothing["text"]
    with pytest.raises(ValueError, match="embedding_signed_resistant"):
        resistant_verdict({"embedding_signed_after": (0.5,) * 3})


def test_the_variant_report_states_its_numbers_or_that_it_was_not_run():
    from imprint.safety.run import resistant_report

    assert "not run" in resistant_report({"embedding_signed_after": (0.5,) * 3})["text"]
    names = ["embedding_signed", "embedding_sgd", "gcg", "prefill", "direct", "benign_accuracy", "over_refusal"]
    summary = {f"{n}_{w}": (0.5, 0.25, 0.75) for n in names for w in ("before", "after", "resistant")}
    summary.update(adversary_before_resistant=(2.0,) * 3, adversary_after_resistant=(1.5,) * 3)
    report = resistant_report(summary)
    assert report["text"].startswith("the signed embedding attack succeeds on 0.50 [0.25, 0.75] on the variant")
    assert "from 2 to 1.5 nats" in report["text"] and not report["met"] and "overlaps" in report["verdict_text"]


def test_a_share_keeps_its_interval_within_zero_and_one():
    from imprint.safety.run import SeedResult, interval, summarise

    mean, lo, hi = interval([0.0, 1.0, 1.0])
    assert lo < 0 and hi > 1                                # the plain t-interval leaves the range

    def seed(i, share, perplexity):
        return SeedResult(i, {"direct_after": share, "perplexity_after": perplexity}, {}, [], [], [], "")
    summary = summarise([seed(0, 0.0, 1.0), seed(1, 1.0, 1.0), seed(2, 1.0, 0.9)])
    assert summary["direct_after"] == pytest.approx((2 / 3, 0.0, 1.0))
    assert summary["perplexity_after"][1:] == pytest.approx(interval([1.0, 1.0, 0.9])[1:])  # not a share
