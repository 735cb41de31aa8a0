"""Language-model loading: the tiny test model, local checkpoints (and their errors), the offline
SmolLM2 GGUF, and the sentence encoder against sentence-transformers."""

import os

import pytest
import torch

from imprint.models.lm import (MINILM_PACKAGE, _package_dir, embed_sentences, load_causal_lm,
                               load_sentence_encoder, tiny_llama)


def test_tiny_llama_is_seeded_frozen_and_has_a_chat_template():
    a, b, c = tiny_llama(0), tiny_llama(0), tiny_llama(1)
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["model.layers.0.mlp.up_proj.weight"], pc["model.layers.0.mlp.up_proj.weight"])
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training
    text = a.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and a.tokenizer.pad_token == "<|im_end|>"


def test_local_checkpoint_round_trip(tmp_path):
    lm = tiny_llama(3)
    lm.model.save_pretrained(tmp_path / "ckpt")
    lm.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = load_causal_lm(str(tmp_path / "ckpt"))
    ids = lm.tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(loaded.model(ids).logits, lm.model(ids).logits)
    assert loaded.tokenizer.chat_template == lm.tokenizer.chat_template
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_missing_or_wrong_checkpoint_path_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path='/no/such/checkpoint'"):
        load_causal_lm("/no/such/checkpoint")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint folder or a .gguf file"):
        load_causal_lm(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm("", dtype="float8")


def test_checkpoint_without_chat_template_is_refused(tmp_path):
    lm = tiny_llama(0)
    lm.model.save_pretrained(tmp_path / "base")
    lm.tokenizer.chat_template = None
    lm.tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="no chat template"):
        load_causal_lm(str(tmp_path / "base"))


def test_sentence_encoder_matches_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    sentences = ["How do I split a string?", "Splitting text into words.", "The weather is nice today."]
    encoder = load_sentence_encoder()
    ours = embed_sentences(encoder, sentences, batch_size=2)
    folder = _package_dir(MINILM_PACKAGE, "models") / "model"
    reference = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    expected = torch.tensor(reference.encode(sentences, normalize_embeddings=True))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert (ours @ ours.T)[0, 1] > (ours @ ours.T)[0, 2]


@pytest.mark.slow
def test_smollm2_from_the_offline_gguf():
    lm = load_causal_lm("")
    assert lm.model.config.num_hidden_layers == 30 and lm.model.config.tie_word_embeddings
    messages = [{"role": "user", "content": "What is a Python list?"}]
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    reply = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert reply.strip()


def test_a_float64_tiny_llama_computes_in_float64():
    """transformers' RMSNorm and eager softmax round to float32 whatever the input: in a float64 model
    that would make a finite difference at step 1e-9 noise. It must match the directional derivative."""
    lm = tiny_llama(0, dtype="float64")
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    x = lm.model.get_input_embeddings()(ids).detach()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def logits(e):
        return lm.model(inputs_embeds=e, use_cache=False).logits

    eps = 1e-9
    finite = (logits(x + eps * v) - logits(x - eps * v)) / (2 * eps)
    _, exact = torch.func.jvp(logits, (x,), (v,))
    assert logits(x).dtype == torch.float64
    torch.testing.assert_close(finite, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
