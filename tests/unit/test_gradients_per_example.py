"""Per-example SFT gradients (torch.func and the factored hook path) against a loop of single-example
backward passes, in float64 on a tiny Llama; projections and exact Gram blocks against brute force."""

import pytest
import torch

from imprint.data.text import InstructionExample, encode_chat_examples
from imprint.gradients.per_example import (FormedGradients, GradientProjection, capture_factors, capture_rows,
                                           factor_gram, gram_costs, factor_sites, group_name, materialise_gradients,
                                           parameter_groups, per_example_gradients, per_example_gradients_factored,
                                           per_example_gradients_loop, projected_features, projected_gradients,
                                           sft_loss_per_example, weight_matrix_names, weight_stacks)
from imprint.models.lm import tiny_llama

EXAMPLES = [
    InstructionExample("a", "What does len do?", "Return the number of items in a container.", "test"),
    InstructionExample("b", "Explain str.split.", "Split the string at sep; with no sep, split on runs of "
                       "whitespace and drop empty strings from the result.", "test"),
    InstructionExample("c", "What is a tuple?", "An immutable sequence.", "test"),
    InstructionExample("d", "Describe the pass statement.", "pass is a null operation: when it is executed, "
                       "nothing happens.", "test"),
]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def lm(request):
    return tiny_llama(0, dtype="float64", tie_word_embeddings=request.param)


@pytest.fixture(scope="module")
def encoding(lm):
    enc = encode_chat_examples(lm.tokenizer, EXAMPLES, max_length=128)
    assert len(set(enc.lengths.tolist())) > 1  # the batch really is padded
    return enc


@pytest.fixture(scope="module")
def reference(lm, encoding):
    names = weight_matrix_names(lm.model)
    return per_example_gradients_loop(lm.model, encoding.input_ids, encoding.labels, names, encoding.lengths)


def test_loss_matches_transformers_loss_on_a_single_example(lm, encoding):
    width = int(encoding.lengths[1])
    ids, labels = encoding.input_ids[1:2, :width], encoding.labels[1:2, :width]
    out = lm.model(input_ids=ids, labels=labels, use_cache=False)
    # transformers computes its loss in float32
    torch.testing.assert_close(sft_loss_per_example(out.logits, labels)[0].float(), out.loss.float())


def test_loss_counts_only_answer_tokens(lm, encoding):
    logits = lm.model(input_ids=encoding.input_ids, use_cache=False).logits
    base = sft_loss_per_example(logits, encoding.labels)
    changed = logits.clone()
    prompt = (encoding.labels == -100)
    prompt[:, -1] = False
    shifted_prompt = torch.zeros_like(prompt)
    shifted_prompt[:, :-1] = prompt[:, 1:]  # logits at t predict token t + 1
    changed[shifted_prompt] += torch.randn_like(changed[shifted_prompt])
    torch.testing.assert_close(sft_loss_per_example(changed, encoding.labels), base)


def test_vmap_gradients_equal_single_example_loop(lm, encoding, reference):
    vmapped = per_example_gradients(lm.model, encoding.input_ids, encoding.labels, list(reference))
    for name, ref in reference.items():
        torch.testing.assert_close(vmapped[name], ref, rtol=1e-9, atol=1e-12)


def test_vmap_gradients_of_norm_weights(lm, encoding):
    names = ["model.layers.0.input_layernorm.weight", "model.norm.weight"]
    ref = per_example_gradients_loop(lm.model, encoding.input_ids, encoding.labels, names, encoding.lengths)
    vmapped = per_example_gradients(lm.model, encoding.input_ids, encoding.labels, names, chunk_size=2)
    for name in names:
        torch.testing.assert_close(vmapped[name], ref[name], rtol=1e-9, atol=1e-12)


def test_factored_gradients_equal_single_example_loop(lm, encoding, reference):
    factored = per_example_gradients_factored(lm.model, encoding.input_ids, encoding.labels, list(reference))
    assert set(factored) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(factored[name], ref, rtol=1e-9, atol=1e-12)


def test_weight_gradients_are_not_accumulated(lm, encoding):
    capture_factors(lm.model, encoding.input_ids, encoding.labels)
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


def test_projected_gradients_equal_projection_of_loop_gradients(lm, encoding, reference):
    projection = GradientProjection(lm.model, [4, 16], seed=3, param_names=list(reference))
    fast = projected_gradients(lm.model, encoding.input_ids, encoding.labels, projection)
    slow = projection.project_gradients(reference)
    for k in (4, 16):
        for name in reference:
            assert fast[k][name].shape == (len(EXAMPLES), k)
            torch.testing.assert_close(fast[k][name], slow[k][name], rtol=1e-9, atol=1e-12)


def test_projected_features_are_independent_of_batching(lm, encoding):
    projection = GradientProjection(lm.model, [8], seed=0)
    whole = projected_features(lm.model, encoding, 0, 4, projection, batch_size=4)
    split = [projected_features(lm.model, encoding, lo, lo + 2, projection, batch_size=1) for lo in (0, 2)]
    for key, value in whole.items():
        torch.testing.assert_close(torch.cat([s[key] for s in split]), value, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["materialise", "ghost", "auto"])
def test_exact_gram_equals_brute_force(lm, encoding, reference, method):
    flat = torch.cat([g.flatten(1) for g in reference.values()], dim=1)
    sites = factor_sites(lm.model)
    keys = capture_rows(lm.model, encoding, 0, 4, sites, batch_size=3)
    queries = capture_rows(lm.model, encoding, 1, 3, sites, batch_size=1)
    dots, sq_keys, sq_queries = factor_gram(keys, queries, max_elements=500, method=method)  # row chunks
    total = sum(dots.values())
    torch.testing.assert_close(total, flat @ flat[1:3].T, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(sum(sq_keys.values()), flat.square().sum(1), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(sum(sq_queries.values()), flat[1:3].square().sum(1), rtol=1e-9, atol=1e-14)
    for name, ref in reference.items():
        torch.testing.assert_close(dots[name], ref.flatten(1) @ ref[1:3].flatten(1).T, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("max_elements", [500, 4096, 10 ** 9], ids=["rows", "weights", "whole"])
def test_gram_with_formed_key_gradients_equals_brute_force(lm, encoding, reference, max_elements):
    """Formed in chunks of one row of one weight, of two weights' rows (32 x 32 weights against two queries),
    or whole stacks."""
    sites = factor_sites(lm.model)
    keys = capture_rows(lm.model, encoding, 0, 4, sites, batch_size=3)
    queries = capture_rows(lm.model, encoding, 1, 3, sites, batch_size=1)
    names = weight_matrix_names(lm.model)
    formed = materialise_gradients(keys, names[::2], max_elements=max_elements)  # every other weight
    for name in names[::2]:
        torch.testing.assert_close(formed[name], reference[name].flatten(1), rtol=1e-9, atol=1e-14)
    hollow = keys.without(names[::2])  # the formed weights' factors are released
    assert hollow.n == keys.n and all(hollow.output_grads[s.module_name].shape[1] == 0
                                      for s in sites if s.param_name in names[::2])
    dots, sq_keys, sq_queries = factor_gram(hollow, queries, max_elements=max_elements, a_gradients=formed)
    for name, ref in reference.items():
        torch.testing.assert_close(dots[name], ref.flatten(1) @ ref[1:3].flatten(1).T, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(sq_keys[name], ref.flatten(1).square().sum(1), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(sq_queries[name], ref[1:3].flatten(1).square().sum(1), rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="a_gradients"):
        factor_gram(keys, queries, a_gradients={"not.a.weight": formed[names[0]]})
    with pytest.raises(ValueError, match=r"a_gradients\[.*expected"):
        factor_gram(keys, queries, a_gradients={names[0]: formed[names[0]][:2]})


def test_stacked_gradients_of_weights_of_one_shape(lm, encoding, reference):
    keys = capture_rows(lm.model, encoding, 0, 4, factor_sites(lm.model), batch_size=3)
    names = weight_matrix_names(lm.model)
    stacks = weight_stacks(keys, names)
    assert sorted(n for stack in stacks for n in stack) == sorted(names)
    assert all(len({tuple(reference[n].shape) for n in stack}) == 1 for stack in stacks)
    tied = lm.model.config.tie_word_embeddings
    assert ["model.embed_tokens.weight"] in stacks  # two sites when tied, an embedding site when not
    assert max(map(len, stacks)) >= 4  # the same projections of both layers (q and o are both 32 x 32)
    for stack in stacks:
        formed = keys.stacked_gradients(stack, slice(1, 3))
        for j, name in enumerate(stack):
            torch.testing.assert_close(formed[j], reference[name][1:3].flatten(1), rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="one shape"):
        keys.stacked_gradients(["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"])
    if tied:
        with pytest.raises(ValueError, match="one linear site"):
            keys.stacked_gradients(["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"])


def test_formed_gradients_are_a_mapping_of_the_stacks(lm, encoding, reference):
    keys = capture_rows(lm.model, encoding, 0, 4, factor_sites(lm.model), batch_size=3)
    names = weight_matrix_names(lm.model)
    formed = materialise_gradients(keys, names, max_elements=10 ** 9)  # whole stacks in one chunk
    assert isinstance(formed, FormedGradients) and sorted(formed) == sorted(names) and len(formed) == len(names)
    assert len(formed.stacks) < len(names)
    for group, stack, sqnorms in formed.stacks:
        assert stack.shape[:2] == (len(group), 4) and sqnorms.dtype == torch.float64
        for j, name in enumerate(group):
            torch.testing.assert_close(formed[name], reference[name].flatten(1), rtol=1e-9, atol=1e-14)
            torch.testing.assert_close(sqnorms[j], reference[name].flatten(1).square().sum(1), rtol=1e-9, atol=1e-14)
    plain = {n: reference[n].flatten(1) for n in names[:2]}
    alone = FormedGradients.of(plain, {n: reference[n].shape[2] for n in plain})
    assert [g for g, _, _ in alone.stacks] == [[n] for n in plain]
    for name, value in plain.items():
        assert alone[name] is value or alone[name].data_ptr() == value.data_ptr()  # a view, not a copy


def test_gram_costs_prefer_ghost_for_short_sequences(lm, encoding):
    sites = factor_sites(lm.model)
    few = capture_rows(lm.model, encoding, 0, 2, sites, batch_size=2)
    costs = gram_costs(few, few, "model.layers.0.mlp.up_proj.weight", max_elements=1 << 20)
    assert set(costs) == {"materialise", "ghost"} and all(c > 0 for c in costs.values())
    # the ghost cost grows with the square of the sequence length, materialising only linearly
    long = capture_rows(lm.model, encoding.__class__(encoding.input_ids.repeat(1, 3)[:, :300],
                                                     encoding.labels.repeat(1, 3)[:, :300],
                                                     torch.full((4,), 300)), 0, 2, sites, batch_size=2)
    long_costs = gram_costs(long, long, "model.layers.0.mlp.up_proj.weight", max_elements=1 << 20)
    assert long_costs["ghost"] / costs["ghost"] > long_costs["materialise"] / costs["materialise"]


def test_parameter_groups_by_layer_and_module():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.mlp.up_proj.weight", "model.layers.11.mlp.up_proj.weight", "lm_head.weight"]
    layers = parameter_groups(names, "layer")
    assert list(layers) == ["embed_tokens", "layers.00", "layers.11", "lm_head"]
    assert layers["layers.00"] == names[1:3]
    assert group_name(names[2], "module") == "layers.0.mlp.up_proj"
    assert parameter_groups(names, "model") == {"model": names}


def test_sites_of_a_tied_model(lm):
    sites = factor_sites(lm.model)
    embed = [s for s in sites if s.param_name == "model.embed_tokens.weight"]
    tied = lm.model.config.tie_word_embeddings
    assert [s.kind for s in embed] == (["embedding", "linear"] if tied else ["embedding"])


def test_bad_inputs_fail_before_compute(lm, encoding):
    labels = encoding.labels.clone()
    labels[2] = -100
    with pytest.raises(ValueError, match="no answer token"):
        per_example_gradients_factored(lm.model, encoding.input_ids, labels)
    with pytest.raises(ValueError, match="not the weight of a linear or embedding layer"):
        factor_sites(lm.model, ["model.norm.weight"])
    with pytest.raises(ValueError, match="not parameters of the model"):
        per_example_gradients(lm.model, encoding.input_ids, encoding.labels, ["no.such.weight"])
    with pytest.raises(ValueError, match="proj_dims"):
        GradientProjection(lm.model, [0], seed=0)
    with pytest.raises(ValueError, match="proj_dims"):
        GradientProjection(lm.model, [], seed=0)


def test_concatenated_factors_keep_shared_inputs_shared(lm, encoding):
    factors = capture_rows(lm.model, encoding, 0, 4, factor_sites(lm.model), batch_size=2)
    attention = [factors.inputs[f"model.layers.0.self_attn.{m}_proj"] for m in "qkv"]
    assert attention[0] is attention[1] is attention[2]
    assert factors.inputs["model.layers.0.mlp.gate_proj"] is factors.inputs["model.layers.0.mlp.up_proj"]
    assert factors.inputs["model.layers.0.self_attn.o_proj"] is not attention[0]
