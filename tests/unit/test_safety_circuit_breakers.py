"""Circuit breakers (chapter 08): the options and their refusals, the retain and circuit-breaker losses
against float64 loops over layers, rows and positions (with inputs on which a wrong mask broadcast gives
another value), the coefficient schedule, the LoRA wrapper over a tiny from-scratch Llama (adapter off is
the base model exactly, layer dropping, generation, the merged save and its reload), and a few rerouting
steps that lower the cosine at the target layers on the circuit-breaker batch while the retain states
stay put; the embedding-space adversary of the resistant variant (its response loss against a plain
forward pass, its bound, the weights it leaves alone, and the step it feeds), and the plain step it must
leave as it was."""

import copy
import dataclasses
import math

import pytest
import torch

from imprint.safety import (CircuitBreakerConfig, CircuitBreakerModel, check_batch, check_records,
                            circuit_breaker_loss, coefficients, masked_cosine, rerouting_step, retain_loss,
                            truncated_layers)
from imprint.safety.circuit_breakers import embedding_adversary, response_loss

VOCAB = 100


def tiny_llama(n_layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model


def small_config(**overrides):
    options = dict(target_layers=(1, 2), lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                   lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   alpha=2.0, max_steps=10, batch_size=4, lr=5e-3, max_length=12)
    options.update(overrides)
    return CircuitBreakerConfig(**options)


def batch(low, high, rows=4, seq=12, seed=0, pad_left=(0, 2, 0, 3)):
    """Token ids in [low, high) with left padding of ``pad_left[i]`` positions in row i."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    for i, pad in enumerate(pad_left[:rows]):
        ids[i, :pad] = 0
        mask[i, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


# ---------------------------------------------------------------------------------------------------
# Brute-force references in float64


def loop_retain(a, f, mask):
    total, count = 0.0, 0
    n_layers, rows, seq, _ = a.shape
    for layer in range(n_layers):
        for b in range(rows):
            for s in range(seq):
                count += 1
                if mask[b, s]:
                    total += math.sqrt(sum((float(a[layer, b, s, k]) - float(f[layer, b, s, k])) ** 2
                                           for k in range(a.shape[-1])))
    return total / count


def loop_cb(a, f, mask):
    total, count = 0.0, 0
    n_layers, rows, seq, d = a.shape
    for layer in range(n_layers):
        for b in range(rows):
            for s in range(seq):
                if not mask[b, s]:
                    continue
                count += 1
                dot = sum(float(a[layer, b, s, k]) * float(f[layer, b, s, k]) for k in range(d))
                na = math.sqrt(sum(float(a[layer, b, s, k]) ** 2 for k in range(d)))
                nf = math.sqrt(sum(float(f[layer, b, s, k]) ** 2 for k in range(d)))
                total += max(dot / (na * nf), 0.0)
    return total / count


def random_pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    f = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5 * a   # both signs of the cosine
    return a, f


def test_losses_match_float64_loops():
    a, f = random_pair((3, 2, 5, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert retain_loss(a, f, mask).item() == pytest.approx(loop_retain(a, f, mask), rel=1e-12)
    assert circuit_breaker_loss(a, f, mask).item() == pytest.approx(loop_cb(a, f, mask), rel=1e-12)
    assert retain_loss(a, f, mask).dtype == torch.float64
    assert retain_loss(a, a.clone(), mask).item() == 0.0
    assert circuit_breaker_loss(a, a.clone(), mask).item() == pytest.approx(1.0)
    assert circuit_breaker_loss(a, -a, mask).item() == 0.0                  # ReLU: opposite costs nothing
    cos = masked_cosine(a, f, mask)
    assert cos.shape == (3, 2, 5) and torch.all(cos[:, 0, :2] == 0)


def test_mask_broadcast_bugs_are_caught():
    """With batch = seq = d a (b, s) mask broadcasts silently in the wrong ways too: aligned with the last
    two dims (seq, d) of (l, b, s, d), or as (b, 1, s) (over batch and d). The inputs are built so that each
    wrong broadcast gives another value, and the loss must be the one of the loops."""
    n = 4
    a, f = random_pair((2, n, n, n), seed=1)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    right_retain, right_cb = loop_retain(a, f, mask), loop_cb(a, f, mask)

    def wrong_retain(m):
        return (torch.linalg.vector_norm((a - f) * m, dim=-1).mean()).item()

    def wrong_cb(m):
        an, fn = a / a.norm(dim=-1, keepdim=True), f / f.norm(dim=-1, keepdim=True)
        return (torch.relu((an * fn * m).sum(-1)).sum() / (m.sum() * 2)).item()

    m = mask.double()
    for wrong in (m, m[:, None, :]):                       # (b, s) as (s, d); the (b, 1, s) transpose
        assert abs(wrong_retain(wrong) - right_retain) > 1e-3
        assert abs(wrong_cb(wrong) - right_cb) > 1e-3
    assert wrong_retain(m[None, :, :, None]) == pytest.approx(right_retain, rel=1e-12)   # the right one
    assert retain_loss(a, f, mask).item() == pytest.approx(right_retain, rel=1e-12)
    assert circuit_breaker_loss(a, f, mask).item() == pytest.approx(right_cb, rel=1e-12)
    assert retain_loss(a, f, mask.bool()).item() == pytest.approx(right_retain, rel=1e-12)


@pytest.mark.parametrize("junk", [1e30, float("inf"), float("nan")])
def test_padded_positions_do_not_change_the_losses(junk):
    a, f = random_pair((2, 3, 6, 5), seed=2)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    before = retain_loss(a, f, mask).item(), circuit_breaker_loss(a, f, mask).item()
    a2, f2 = a.clone(), f.clone()
    pad = ~mask.bool()
    a2[:, pad] = junk
    f2[:, pad] = -junk
    a32, f32 = a2.float(), f2.float()
    after = retain_loss(a2, f2, mask).item(), circuit_breaker_loss(a2, f2, mask).item()
    assert after == pytest.approx(before, rel=1e-12)
    after32 = retain_loss(a32, f32, mask).item(), circuit_breaker_loss(a32, f32, mask).item()
    assert after32 == pytest.approx(before, rel=1e-5)


def test_losses_refuse_bad_masks():
    a, f = random_pair((1, 2, 3, 4))
    with pytest.raises(ValueError, match="masks every position"):
        circuit_breaker_loss(a, f, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="0/1"):
        retain_loss(a, f, torch.full((2, 3), 0.5))


def test_coefficients_schedule():
    assert coefficients(0, 150, 10.0) == (0.0, 10.0)
    c_r, c_s = coefficients(1, 150, 10.0)                  # the reference's first step: 1/300
    assert c_r == pytest.approx(10 / 300) and c_s == pytest.approx(10 * (1 - 1 / 300))
    assert coefficients(150, 150, 10.0) == pytest.approx((5.0, 5.0))
    for t in range(0, 301, 7):
        c_r, c_s = coefficients(t, 150, 4.0)
        assert c_r + c_s == pytest.approx(4.0) and c_r == pytest.approx(4.0 * t / 300)
    with pytest.raises(ValueError, match="step"):
        coefficients(301, 150, 10.0)
    with pytest.raises(ValueError, match="alpha"):
        coefficients(1, 150, 0.0)


# ---------------------------------------------------------------------------------------------------
# Options and records


def test_config_defaults_and_refusals():
    config = CircuitBreakerConfig()
    assert config.target_layers == (10, 20) and config.transformed_layers == tuple(range(21))
    assert config.kept_blocks == 21 and config.alpha == 10.0 and config.max_steps == 150
    assert config.adversarial_steps == 0                     # the plain method unless asked
    assert CircuitBreakerConfig(target_layers=[20, 10]).target_layers == (10, 20)
    for field, value in [("target_layers", ()), ("target_layers", (0,)), ("target_layers", (3, 3)),
                         ("lora_rank", 0), ("lora_alpha", 0), ("lora_dropout", 1.0), ("lora_target_modules", ()),
                         ("lora_target_modules", "q_proj"), ("layers_to_transform", (25,)), ("alpha", -1.0),
                         ("max_steps", 0), ("batch_size", 0), ("lr", 0.0), ("max_length", 1),
                         ("adversarial_steps", -1), ("adversarial_lr", 0.0), ("adversarial_lr", -1e-3),
                         ("adversarial_lr", float("inf")), ("adversarial_radius", 0.0),
                         ("adversarial_radius", float("nan"))]:
        with pytest.raises(ValueError, match=field):
            CircuitBreakerConfig(**{field: value})


def test_config_check_against_a_model():
    model = tiny_llama(n_layers=4)
    small_config(target_layers=(1, 3)).check(model)
    with pytest.raises(ValueError, match="target_layers.*4 decoder blocks"):
        small_config(target_layers=(2, 4)).check(model)
    with pytest.raises(ValueError, match="lora_target_modules"):
        small_config(lora_target_modules=("c_attn",)).check(model)
    with pytest.raises(ValueError, match="target_layers"):
        CircuitBreakerModel(model, small_config(target_layers=(9,)))


def test_check_records_and_batches():
    good = [{"prompt": "how do I", "response": "like this"}, {"prompt": "", "response": "a reply"}]
    assert check_records(good, "cb_records") == good
    with pytest.raises(ValueError, match="cb_records is empty"):
        check_records([], "cb_records")
    with pytest.raises(ValueError, match=r"retain_records\[1\] has a prompt but no response.*full responses"):
        check_records([good[0], {"prompt": "hi"}], "retain_records")
    with pytest.raises(ValueError, match="no response"):
        check_records([{"prompt": "hi", "response": "  "}], "retain_records")
    with pytest.raises(ValueError, match="batch_retain is empty"):
        check_batch({"input_ids": torch.zeros(0, 5, dtype=torch.long),
                     "attention_mask": torch.zeros(0, 5)}, "batch_retain")
    with pytest.raises(ValueError, match="batch_cb.*masks every position"):
        check_batch({"input_ids": torch.zeros(2, 5, dtype=torch.long),
                     "attention_mask": torch.zeros(2, 5)}, "batch_cb")


# ---------------------------------------------------------------------------------------------------
# The model


def test_adapter_off_is_the_base_model_and_layers_are_dropped_and_restored():
    base = tiny_llama()
    reference = copy.deepcopy(base).eval()
    cb = CircuitBreakerModel(base, small_config())
    assert sum(p.numel() for p in cb.trainable_parameters()) > 0
    with torch.no_grad():                                   # a nonzero adapter
        for name, p in cb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    cb.model.eval()
    data = batch(3, VOCAB)
    ids, mask = data["input_ids"], data["attention_mask"]
    with torch.no_grad():
        full = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        off = cb.logits(ids, mask, adapter=False)
        on = cb.logits(ids, mask, adapter=True)
        assert torch.equal(off, full.logits)
        assert not torch.allclose(on, full.logits)
        kept = cb.hidden_states(ids, mask, adapter=False)          # blocks 0..2 of 4
        assert kept.shape == (4, 4, 12, 32)
        for layer in range(3):
            assert torch.equal(kept[layer], full.hidden_states[layer])
        assert torch.allclose(kept[3], reference.model.norm(full.hidden_states[3]))   # last: normed
        target = cb.hidden_states(ids, mask, adapter=False, layers=[1, 2])
        assert torch.equal(target, kept[1:3])
    assert len(cb.model.get_base_model().model.layers) == 4
    with pytest.raises(RuntimeError, match="boom"), truncated_layers(cb.model, 1):
        assert len(cb.model.get_base_model().model.layers) == 1
        raise RuntimeError("boom")
    assert len(cb.model.get_base_model().model.layers) == 4
    lora_blocks = {int(n.split("layers.")[1].split(".")[0]) for n, _ in cb.model.named_parameters() if "lora_" in n}
    assert lora_blocks == {0, 1, 2}                          # 0..max(target_layers)


def test_rerouting_lowers_the_target_cosine_and_keeps_the_retain_states():
    torch.manual_seed(0)
    base = tiny_llama()
    reference = copy.deepcopy(base).eval()
    config = small_config(lr=1e-2)
    cb = CircuitBreakerModel(base, config)
    optimizer = cb.optimizer()
    batch_cb, batch_retain = batch(50, VOCAB, seed=1), batch(3, 50, seed=2)     # disjoint token sets
    parts = [rerouting_step(cb, batch_cb, batch_retain, config, step, optimizer)
             for step in range(1, config.max_steps + 1)]
    # the adapter starts at B = 0: adapted = frozen, cosine 1, retain distance 0
    assert parts[0].cb_cosine == pytest.approx(1.0, abs=1e-5) and parts[0].retain == pytest.approx(0.0, abs=1e-5)
    for p in parts:
        assert p.total == pytest.approx(p.c_retain * p.retain + p.c_circuit_breaker * p.circuit_breaker, rel=1e-5)
    cb.model.eval()

    def measure(data):
        """Mean cosine at the target layers, and the retain distance relative to the frozen states' norm."""
        ids, mask = data["input_ids"], data["attention_mask"]
        layers = list(config.target_layers)
        a = cb.hidden_states(ids, mask, layers=layers)
        f = cb.hidden_states(ids, mask, adapter=False, layers=layers)
        cos = float(masked_cosine(a, f, mask).sum() / (mask.sum() * len(layers)))
        return cos, float(retain_loss(a, f, mask) / retain_loss(f, torch.zeros_like(f), mask))

    with torch.no_grad():
        cos_cb, moved_cb = measure(batch_cb)
        cos_retain, moved_retain = measure(batch_retain)
        # measured: cb cosine 0.16 (distance 4.1 x the norm), retain cosine 0.92 (distance 0.39 x the norm)
        assert cos_cb < 0.5 and cos_retain > 0.85
        assert moved_retain < 0.6 and moved_retain < 0.2 * moved_cb
        ids, mask = batch_retain["input_ids"], batch_retain["attention_mask"]
        assert torch.equal(cb.logits(ids, mask, adapter=False), reference(input_ids=ids, attention_mask=mask).logits)


def test_generate_and_the_merged_save_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(n_layers=3)
    reference = copy.deepcopy(base).eval()
    cb = CircuitBreakerModel(base, small_config(target_layers=(1,)))
    with torch.no_grad():
        for name, p in cb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    prompt = torch.tensor([[5, 17, 33, 8]])
    off = cb.generate(prompt, max_new_tokens=6, adapter=False)
    assert torch.equal(off, reference.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
    on = cb.generate(prompt, max_new_tokens=6)
    assert on.shape == (1, 10) and torch.equal(on[:, :4], prompt)
    data = batch(3, VOCAB, rows=2)
    with torch.no_grad():
        before = cb.logits(data["input_ids"], data["attention_mask"])
    merged = cb.save_merged(tmp_path / "merged")
    assert cb.merged and not any("lora_" in n for n, _ in merged.named_parameters())
    # eager as the original: under SDPA the rows of padded positions (every key masked) differ
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert len(loaded.model.layers) == 3
    with torch.no_grad():
        after = loaded(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    assert torch.allclose(after, before, atol=1e-5)
    assert torch.equal(loaded.generate(input_ids=prompt, max_new_tokens=6, do_sample=False), on)
    with pytest.raises(RuntimeError, match="merged"):
        cb.hidden_states(data["input_ids"], data["attention_mask"], adapter=False)


def test_rerouting_step_refuses_bad_batches():
    config = small_config()
    cb = CircuitBreakerModel(tiny_llama(), config)
    optimizer = cb.optimizer()
    empty = {"input_ids": torch.zeros(0, 12, dtype=torch.long), "attention_mask": torch.zeros(0, 12)}
    with pytest.raises(ValueError, match="batch_cb is empty"):
        rerouting_step(cb, empty, batch(3, 50), config, 1, optimizer)
    with pytest.raises(ValueError, match="batch_retain is empty"):
        rerouting_step(cb, batch(50, VOCAB), empty, config, 1, optimizer)
    with pytest.raises(ValueError, match="step"):
        rerouting_step(cb, batch(50, VOCAB), batch(3, 50), config, 21, optimizer)


# ---------------------------------------------------------------------------------------------------
# The embedding-space adversary (the resistant variant)


RESPONSE = 5  # the last positions of every row are its response


def with_responses(data, n=RESPONSE):
    response = torch.zeros_like(data["attention_mask"])
    response[:, -n:] = 1
    return dict(data, response_mask=response)


def adapted_llama(config, seed=0):
    """A tiny Llama with the adapter of ``config``, its LoRA initialised from ``seed`` and B nonzero (so that
    the adapted model differs from the frozen one)."""
    torch.manual_seed(seed)
    cb = CircuitBreakerModel(tiny_llama(seed=seed), config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in cb.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return cb


def trainable_state(cb):
    return {n: p.detach().clone() for n, p in cb.model.named_parameters() if p.requires_grad}


def loop_response_loss(cb, data):
    """The mean cross-entropy of the response tokens, one row and one token at a time, from a forward pass
    on the token ids (adapter on, eval mode)."""
    total, count = 0.0, 0
    for row in range(data["input_ids"].shape[0]):
        ids, mask = data["input_ids"][row:row + 1], data["attention_mask"][row:row + 1]
        log_p = torch.log_softmax(cb.logits(ids, mask)[0].double(), dim=-1)
        for t in range(1, ids.shape[1]):
            if data["response_mask"][row, t]:
                total -= float(log_p[t - 1, ids[0, t]])
                count += 1
    return total / count


def test_the_response_loss_is_the_cross_entropy_of_the_response_tokens():
    config = small_config()
    cb = adapted_llama(config)
    cb.model.eval()
    data = with_responses(batch(3, VOCAB, seed=4))
    with torch.no_grad():
        embeds = cb.model.get_input_embeddings()(data["input_ids"])
        got = response_loss(cb, embeds, data["attention_mask"], data["input_ids"], data["response_mask"])
        assert float(got) == pytest.approx(loop_response_loss(cb, data), rel=1e-5)


def test_without_adversarial_steps_the_step_is_the_plain_one():
    """adversarial_steps = 0: the response mask, adversarial_lr and adversarial_radius change nothing, the
    adversary's fields are NaN, and the step is the plain loss computed here by hand followed by AdamW."""
    plain = small_config()
    other = small_config(adversarial_steps=0, adversarial_lr=0.5, adversarial_radius=3.0)
    batch_cb, batch_retain = batch(50, VOCAB, seed=1), batch(3, 50, seed=2)
    runs = []
    for config, data in ((plain, batch_cb), (other, with_responses(batch_cb))):
        cb = adapted_llama(config)
        optimizer = cb.optimizer()
        parts = [rerouting_step(cb, data, batch_retain, config, step, optimizer) for step in (1, 2)]
        runs.append((parts, trainable_state(cb)))
    (parts_a, state_a), (parts_b, state_b) = runs
    assert [dataclasses.astuple(p)[:6] for p in parts_a] == [dataclasses.astuple(p)[:6] for p in parts_b]
    assert all(math.isnan(p.adversary_before) and math.isnan(p.adversary_after) for p in parts_a + parts_b)
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)

    cb = adapted_llama(plain)                               # the first step by hand
    optimizer = torch.optim.AdamW(cb.trainable_parameters(), lr=plain.lr, weight_decay=0.0)
    c_r, c_s = coefficients(1, plain.max_steps, plain.alpha)
    layers, n = list(plain.target_layers), plain.kept_blocks
    ids, mask = batch_cb["input_ids"], batch_cb["attention_mask"]
    r_ids, r_mask = batch_retain["input_ids"], batch_retain["attention_mask"]
    cb.model.eval()
    with torch.no_grad():
        frozen_r = cb.hidden_states(r_ids, r_mask, adapter=False, n_blocks=n)
        frozen_cb = cb.hidden_states(ids, mask, adapter=False, layers=layers, n_blocks=n)
    cb.model.train()
    loss = (0.0 + c_r * retain_loss(cb.hidden_states(r_ids, r_mask, n_blocks=n), frozen_r, r_mask)
            + c_s * circuit_breaker_loss(cb.hidden_states(ids, mask, layers=layers, n_blocks=n), frozen_cb, mask))
    loss.backward()
    optimizer.step()
    assert float(loss.detach()) == parts_a[0].total
    first = adapted_llama(plain)
    rerouting_step(first, batch_cb, batch_retain, plain, 1, first.optimizer())
    mine, theirs = trainable_state(cb), trainable_state(first)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_adversary_lowers_the_response_loss_inside_its_bound_and_leaves_the_weights():
    config = small_config(adversarial_steps=6, adversarial_lr=0.02, adversarial_radius=0.05)
    cb = adapted_llama(config)
    cb.model.train()
    data = with_responses(batch(50, VOCAB, seed=1))
    before = trainable_state(cb)
    found = embedding_adversary(cb, data, config)
    assert cb.model.training                                 # its mode is put back
    assert all(torch.equal(before[n], p) for n, p in cb.model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in cb.trainable_parameters())
    assert found.loss_after < found.loss_before              # it attacks
    cb.model.eval()
    assert found.loss_before == pytest.approx(loop_response_loss(cb, data), rel=1e-5)
    delta = found.delta
    assert delta.shape == (*data["input_ids"].shape, 32)
    assert float(delta.abs().max()) <= config.adversarial_radius + 1e-7
    request = (data["attention_mask"].bool() & ~data["response_mask"].bool())
    assert torch.all(delta[~request] == 0)                   # answers and padding are never perturbed
    assert float(delta[request].abs().max()) == pytest.approx(config.adversarial_radius)
    with torch.no_grad():                                    # the loss it reports is the one at its delta
        embeds = cb.model.get_input_embeddings()(data["input_ids"]) + delta
        again = response_loss(cb, embeds, data["attention_mask"], data["input_ids"], data["response_mask"])
    assert float(again) == pytest.approx(found.loss_after, rel=1e-6)


def test_the_resistant_step_reroutes_the_perturbed_inputs_with_the_plain_gradient():
    """The step with the adversary inside equals the step given the adversary's delta, and its parameter
    gradient is the plain loss's on the perturbed embeddings, computed here on a model the adversary
    never ran on."""
    config = small_config(adversarial_steps=3, adversarial_lr=0.02, adversarial_radius=0.05)
    batch_cb, batch_retain = with_responses(batch(50, VOCAB, seed=1)), batch(3, 50, seed=2)
    fixed = adapted_llama(config)
    found = embedding_adversary(fixed, batch_cb, config)
    got_fixed = rerouting_step(fixed, batch_cb, batch_retain, config, 1, fixed.optimizer(), delta=found.delta)
    inner = adapted_llama(config)
    got = rerouting_step(inner, batch_cb, batch_retain, config, 1, inner.optimizer())
    assert (got.adversary_before, got.adversary_after) == (found.loss_before, found.loss_after)
    assert math.isnan(got_fixed.adversary_before)
    assert dataclasses.astuple(got)[:6] == dataclasses.astuple(got_fixed)[:6]
    a, b = trainable_state(fixed), trainable_state(inner)
    assert all(torch.equal(a[n], b[n]) for n in a)

    cb = adapted_llama(config)
    c_r, c_s = coefficients(1, config.max_steps, config.alpha)
    layers, n = list(config.target_layers), config.kept_blocks
    mask, r_ids, r_mask = batch_cb["attention_mask"], batch_retain["input_ids"], batch_retain["attention_mask"]
    with torch.no_grad():
        embeds = cb.model.get_input_embeddings()(batch_cb["input_ids"]) + found.delta
        cb.model.eval()
        frozen_r = cb.hidden_states(r_ids, r_mask, adapter=False, n_blocks=n)
        frozen_cb = cb.hidden_states(None, mask, adapter=False, layers=layers, n_blocks=n, inputs_embeds=embeds)
        cb.model.train()
    part_cb = circuit_breaker_loss(cb.hidden_states(None, mask, layers=layers, n_blocks=n, inputs_embeds=embeds),
                                   frozen_cb, mask)
    loss = c_r * retain_loss(cb.hidden_states(r_ids, r_mask, n_blocks=n), frozen_r, r_mask) + c_s * part_cb
    loss.backward()
    assert float(part_cb) == pytest.approx(got.circuit_breaker, rel=1e-6)
    plain_part = rerouting_step(adapted_llama(small_config()), batch_cb, batch_retain, small_config(), 1,
                                torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)).circuit_breaker
    assert abs(plain_part - got.circuit_breaker) > 1e-4      # the perturbation changes the term
    grads = {name: p.grad for name, p in cb.model.named_parameters() if p.requires_grad}
    for name, p in inner.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[name], rtol=1e-5, atol=1e-7), name


def test_the_resistant_step_refuses_a_batch_without_its_responses():
    config = small_config(adversarial_steps=2)
    cb = CircuitBreakerModel(tiny_llama(), config)
    optimizer = cb.optimizer()
    data, retain = batch(50, VOCAB), batch(3, 50)
    with pytest.raises(ValueError, match="response_mask"):
        rerouting_step(cb, data, retain, config, 1, optimizer)
    padded = with_responses(data, n=12)                      # marks the left padding of rows 1 and 3
    with pytest.raises(ValueError, match="marks padded positions"):
        rerouting_step(cb, padded, retain, config, 1, optimizer)
    whole = data["attention_mask"].clone()
    whole[[0, 2], :2] = 0                                    # row 1 is all response
    with pytest.raises(ValueError, match="every token of row 1"):
        embedding_adversary(cb, dict(data, response_mask=whole), config)
    first = with_responses(data)
    first["response_mask"][0, 0] = 1
    with pytest.raises(ValueError, match="first position"):
        embedding_adversary(cb, first, config)
    with pytest.raises(ValueError, match="delta of shape"):
        rerouting_step(cb, with_responses(data), retain, config, 1, optimizer, delta=torch.zeros(4, 12, 8))
    assert all(p.grad is None for p in cb.trainable_parameters())
