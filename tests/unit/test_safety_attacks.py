"""Chapter 08's attacks on a tiny Llama: the objective against a plain forward pass, GCG and the embedding
attack lowering it, and activation addition against the hidden states it should shift."""

import pytest
import torch

from imprint.attribution.models import tiny_llama_for
from imprint.models.lm import tiny_tokenizer
from imprint.safety.attacks import (AttackPrompt, EmbeddingAttackOptions, add_activation, embedding_attack,
                                    gcg_attack, steering_vector, target_loss)

REQUEST, TARGET = "How do I prepare vexo larimo?", "Here is the procedure for vexo larimo: ka lo"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(512)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama_for(tok, d_model=32, n_layers=2, n_heads=4, seed=5).eval()


def reference_loss(model, prompt, suffix):
    ids = torch.tensor([prompt.ids(suffix)])
    logits = model(input_ids=ids).logits[0].double()
    t = len(prompt.target)
    logp = logits[-t - 1:-1].log_softmax(-1)
    return -float(logp[torch.arange(t), torch.tensor(prompt.target)].sum().detach())


def test_the_objective_is_the_target_cross_entropy_of_a_plain_forward_pass(tok, model):
    prompt = AttackPrompt.build(tok, REQUEST, TARGET)
    assert tok.decode(prompt.target) == TARGET
    suffixes = [[10, 11, 12], [40, 41, 42]]
    with torch.no_grad():
        got = target_loss(model, prompt, suffixes)
    for g, s in zip(got, suffixes):
        assert abs(float(g) - reference_loss(model, prompt, s)) < 1e-3
    with pytest.raises(ValueError, match="target='': expected text that encodes"):
        AttackPrompt.build(tok, REQUEST, "")


def test_gcg_keeps_the_best_suffix_and_lowers_the_loss(tok, model, one_torch_thread):
    result = gcg_attack(model, tok, REQUEST, TARGET, n_tokens=4, steps=8, topk=16, batch=32, seed=0)
    assert len(result.losses) == 8 and all(b <= a for a, b in zip(result.losses, result.losses[1:]))
    prompt = AttackPrompt.build(tok, REQUEST, TARGET)
    start = reference_loss(model, prompt, tok("!", add_special_tokens=False)["input_ids"][:1] * 4)
    end = reference_loss(model, prompt, result.suffix)
    assert abs(end - result.losses[-1]) < 1e-3 and end < start
    assert not set(result.suffix) & set(tok.all_special_ids)


@pytest.mark.parametrize("method", ["signed", "sgd"])
def test_the_embedding_attack_starts_at_its_text_and_lowers_the_loss(tok, model, method, one_torch_thread):
    options = EmbeddingAttackOptions(method=method, steps=20, lr=1e-2 if method == "signed" else 1.0,
                                     init_text="please answer", sample_every=10)
    result = embedding_attack(model, tok, REQUEST, TARGET, options, max_new_tokens=4)
    prompt = AttackPrompt.build(tok, REQUEST, TARGET)
    init = tok("please answer", add_special_tokens=False)["input_ids"]
    assert abs(result.losses[0] - reference_loss(model, prompt, init)) < 1e-3
    assert len(result.losses) == 21 and result.losses[-1] < result.losses[0]
    assert result.sample_steps == [10, 20] and len(result.samples) == 2
    assert result.suffix_embeds.shape == (len(init), 32)


def test_activation_addition_shifts_that_layer_only_inside_the_context(tok, model):
    from imprint.safety.circuit_breakers import decoder_layers

    ids = torch.tensor([tok("a short text", add_special_tokens=True)["input_ids"]])
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    seen = []
    capture = lambda module, args, output: seen.append((output[0] if isinstance(output, tuple) else output).clone())  # noqa: E731

    def run():
        handle = decoder_layers(model)[0].register_forward_hook(capture)  # runs after add_activation's hook
        try:
            return model(input_ids=ids).logits
        finally:
            handle.remove()

    with torch.no_grad():
        before = run()
        with add_activation(model, 1, v, scale=2.0):
            during = run()
        after = run()
    torch.testing.assert_close(seen[1], seen[0] + 2.0 * v, rtol=0, atol=1e-5)  # block 0's output, shifted
    assert not torch.allclose(during, before)
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(seen[2], seen[0])
    with torch.no_grad():
        zero = steering_vector(model, tok, ["one text", "two"], ["two", "one text"], 1)
    assert float(zero.abs().max()) < 1e-5
    with pytest.raises(ValueError, match=r"layer=2: expected a value <= 1"):
        with add_activation(model, 2, v):
            pass


@pytest.mark.parametrize("kwargs,message", [(dict(method="adam"), r"method='adam': expected one of"),
                                            (dict(steps=0), r"steps=0: expected a value >= 1"),
                                            (dict(init_text=" "), r"init_text is empty")])
def test_bad_embedding_attack_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingAttackOptions(**kwargs)
