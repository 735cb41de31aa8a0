"""Chapter 07's attribution methods against references: Δh, ∂L/∂h and Δh ⊙ g from padded batches against
one unpadded text at a time through ``output_hidden_states`` in float64; integrated gradients against
their completeness (the attributions sum to the loss change along the path); gated patching against the
output head applied by hand and against one gate row at a time; scores, layer aggregation and fitted
weights against direct computations; difference probes that raise the KL they maximise."""

import copy

import pytest
import torch

from imprint.attribution.hooks import n_hidden_layers, replace_hidden
from imprint.attribution.methods import (aggregate_layers, answer_margins, attribution_gates, change_features,
                                         difference_probes, encode_documents, encode_queries,
                                         fit_layer_weights, gated_patching_scores, integrated_attribution,
                                         per_text_loss, similarity_scores)
from imprint.attribution.models import tiny_llama_for
from imprint.data.hops import (generate_hops_documents, hops_queries, hops_spec, spec_functions,
                               train_hops_tokenizer)


@pytest.fixture(scope="module")
def setup():
    spec = hops_spec(2, docs_per_base=8, docs_per_wrapper=4)
    docs = generate_hops_documents(spec)
    tok = train_hops_tokenizer([d.text for d in docs], spec.function_tokens, max_integer=30)
    old = tiny_llama_for(tok, d_model=16, n_layers=2, n_heads=2, seed=0).double().eval()
    new = copy.deepcopy(old)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    queries = hops_queries(spec_functions(spec), inputs=[3, 14, 27])
    return spec, docs, tok, old, new, queries


def reference_features(old, new, ids, targets, weights, layer):
    """One text, no padding: Δh, g and Δh ⊙ g pooled, from output_hidden_states and autograd."""
    ids, targets, weights = ids[None], targets[None], weights[None]
    with torch.no_grad():
        h_old = old(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    out = new(input_ids=ids, output_hidden_states=True)
    h_new = out.hidden_states[layer]
    loss = per_text_loss(out.logits, targets).sum()
    (g,) = torch.autograd.grad(loss, [h_new])
    d = h_new.detach() - h_old
    pool = lambda x: torch.einsum("bs,bsd->bd", weights.to(x), x)[0]  # noqa: E731
    return pool(d), pool(g), pool(d * g)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_change_features_equal_one_text_at_a_time(setup, pooling):
    _, docs, tok, old, new, queries = setup
    for enc in (encode_documents(tok, docs[:5], pooling=pooling), encode_queries(tok, queries[:4])):
        layers = [0, 1, n_hidden_layers(new)]
        feats = change_features(old, new, enc, layers, batch_size=3)
        assert feats.delta.shape == (3, len(enc), 16)
        for i in range(len(enc)):
            n = int(enc.mask[i].sum())
            for j, layer in enumerate(layers):
                d, g, a = reference_features(old, new, enc.ids[i, :n], enc.targets[i, :n], enc.weights[i, :n], layer)
                torch.testing.assert_close(feats.delta[j, i], d.float(), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(feats.grad[j, i], g.float(), rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(feats.attribution[j, i], a.float(), rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in new.parameters())


def test_query_encoding_predicts_the_answer_from_the_last_prompt_token(setup):
    _, _, tok, _, _, queries = setup
    enc = encode_queries(tok, queries[:2])
    for i, q in enumerate(queries[:2]):
        n = int(enc.mask[i].sum())
        prompt = tok.encode(q.prompt, add_special_tokens=True)
        assert enc.ids[i, :n].tolist() == prompt + [tok.convert_tokens_to_ids(q.completion)]
        assert enc.targets[i, n - 2] == enc.ids[i, n - 1] and (enc.targets[i, :n - 2] == -100).all()
        assert enc.weights[i, n - 2] == 1 and enc.weights[i].sum() == 1


def test_integrated_gradients_are_complete(setup):
    _, docs, tok, old, new, queries = setup
    enc = encode_documents(tok, docs[:4])
    ig = integrated_attribution(old, new, enc, layer=1, steps=32, batch_size=2)
    half = integrated_attribution(old, new, enc, layer=1, steps=16, batch_size=4)
    assert ig.path_change.abs().min() > 1e-4
    torch.testing.assert_close(half.path_change, ig.path_change)
    # the midpoint rule's error falls as 1/K^2: 4x per doubling, up to float32 accumulation
    error = ((ig.total - ig.path_change) / ig.path_change).abs()
    error_half = ((half.total - half.path_change) / half.path_change).abs()
    assert error.max() < 5e-3 and (error < error_half / 3).all()
    # one step is the plain product at the midpoint, not the endpoint gradient: the sums differ
    coarse = integrated_attribution(old, new, enc, layer=1, steps=1, batch_size=4)
    assert not torch.allclose(coarse.total, ig.total, rtol=1e-3)
    same = integrated_attribution(old, old, enc, layer=1, steps=2)
    assert same.attribution.abs().max() == 0


def test_patching_every_coordinate_at_the_top_reads_f_new_state_through_f_old_head(setup):
    _, _, tok, old, new, queries = setup
    top = n_hidden_layers(new)
    q = queries[0]
    candidates = list(range(0, 31))
    gates = torch.tensor([[True] * 16, [False] * 16])
    scores = gated_patching_scores(old, new, tok, [q], gates, layer=top, candidates=candidates, batch_size=2)
    ids = torch.tensor([tok.encode(q.prompt, add_special_tokens=True)])
    cand = torch.tensor([tok.convert_tokens_to_ids(str(c)) for c in candidates])
    with torch.no_grad():
        h_new = new(input_ids=ids, output_hidden_states=True).hidden_states[top][0, -1]
        patched = old.lm_head(h_new)[cand].float()[None]
        plain = old(input_ids=ids).logits[0, -1, cand].float()[None]
    expected = answer_margins(patched, q.constant) - answer_margins(plain, q.constant)
    torch.testing.assert_close(scores[0, 0], expected[0], rtol=1e-5, atol=1e-6)
    assert scores[0, 1] == 0


def test_patching_rows_are_independent_of_their_batch(setup):
    _, _, tok, old, new, queries = setup
    gen = torch.Generator().manual_seed(0)
    gates = torch.rand(5, 16, generator=gen) < 0.3
    together = gated_patching_scores(old, new, tok, queries[:2], gates, layer=1, candidates=range(31), batch_size=5)
    alone = gated_patching_scores(old, new, tok, queries[:2], gates, layer=1, candidates=range(31), batch_size=1)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert together.abs().max() > 0


def test_gates_pick_the_largest_magnitudes():
    a = torch.tensor([[0.1, -3.0, 2.0, 0.0], [1.0, 1.5, -0.2, 0.3]])
    assert attribution_gates(a, 50).tolist() == [[False, True, True, False], [True, True, False, False]]
    assert attribution_gates(a, 1).sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="percent"):
        attribution_gates(a, 0)


def test_scores_and_aggregations_match_direct_computation():
    gen = torch.Generator().manual_seed(0)
    q, z = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 5, 6, generator=gen)
    s = similarity_scores(q, z)
    for layer in range(3):
        for i in range(4):
            for j in range(5):
                expected = torch.nn.functional.cosine_similarity(q[layer, i], z[layer, j], dim=0)
                torch.testing.assert_close(s[layer, i, j], expected)
    torch.testing.assert_close(similarity_scores(q, z, normalise=False), torch.einsum("lqd,lnd->lqn", q, z))
    zs = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)
    torch.testing.assert_close(aggregate_layers(s), zs.mean(0))
    torch.testing.assert_close(aggregate_layers(s, "topk", k=2), zs.sort(0).values[1:].mean(0))
    w = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(aggregate_layers(s, "weights", weights=w), (w[:, None, None] * zs).sum(0))
    with pytest.raises(ValueError, match="weights"):
        aggregate_layers(s, "weights")


def test_fitted_weights_find_the_informative_layer():
    gen = torch.Generator().manual_seed(0)
    q, n = 40, 30
    relevant = torch.zeros(q, n, dtype=torch.bool)
    relevant[torch.arange(q), torch.arange(q) % n] = True
    noise = torch.randn(4, q, n, generator=gen)
    noise[2] += 3.0 * relevant
    w = fit_layer_weights(noise, relevant)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and w.argmax() == 2 and w[2] > 0.7
    with pytest.raises(ValueError, match="relevant"):
        fit_layer_weights(noise, relevant[:, :5])


def test_difference_probes_raise_the_kl_they_maximise(setup):
    _, _, _, old, new, _ = setup
    probes = difference_probes(old, new, layers=[1, 2], n_probes=4, length=3, steps=60, lr=0.1, seed=0)
    assert probes.delta.shape == (2, 4, 16) and probes.embeddings.shape == (4, 3, 16)
    assert (probes.kl_start >= 0).all() and probes.kl_end.mean() > 1.5 * probes.kl_start.mean()
    radius = new.get_input_embeddings().weight.detach().float().norm(dim=1).mean()
    torch.testing.assert_close(probes.embeddings.norm(dim=-1), torch.full((4, 3), float(radius)), rtol=1e-4, atol=1e-5)


def test_replace_hidden_is_removed_after_an_exception(setup):
    _, _, tok, old, _, queries = setup
    ids = torch.tensor([tok.encode(queries[0].prompt)])
    before = old(input_ids=ids).logits
    with pytest.raises(RuntimeError):
        with replace_hidden(old, 1, lambda h: h * 0):
            raise RuntimeError("boom")
    torch.testing.assert_close(old(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match="replace returned shape"):
        with replace_hidden(old, 1, lambda h: h[:, :1]):
            old(input_ids=ids)


def test_methods_refuse_bad_input_by_name(setup):
    spec, docs, tok, old, new, queries = setup
    enc = encode_documents(tok, docs[:2])
    with pytest.raises(ValueError, match="layers"):
        change_features(old, new, enc, [0, 99])
    with pytest.raises(ValueError, match="pooling"):
        encode_documents(tok, docs[:2], pooling="max")
    other = tiny_llama_for(train_hops_tokenizer(["a b c"], ["<GN>"], max_integer=3), d_model=16, n_heads=2)
    with pytest.raises(ValueError, match="model_old"):
        change_features(other, new, enc, [0])
    with pytest.raises(ValueError, match="gates"):
        gated_patching_scores(old, new, tok, queries[:1], torch.ones(2, 8, dtype=torch.bool), 1, range(31))
    with pytest.raises(ValueError, match="candidates"):
        gated_patching_scores(old, new, tok, queries[:1], torch.ones(2, 16, dtype=torch.bool), 1, [0, 1])
