"""The answer-only loss of finetune_causal_lm against a masked cross-entropy computed by hand in float64."""

import copy

import pytest
import torch

from imprint.attribution.models import finetune_causal_lm
from imprint.models.lm import tiny_llama

TEXTS = ["What does len return? It returns the number of items.",
         "Name a mutable type. A list is mutable, a tuple is not.",
         "How is a dict written? With braces around key: value pairs."]


def masked_cross_entropy(model, tokenizer, texts, prompt_tokens):
    """Mean over the batch's predicted tokens of -log p(token | prefix), float64, one text at a time."""
    model = copy.deepcopy(model).double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text, p in zip(texts, prompt_tokens):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
            for t in range(max(p, 1), ids.shape[1]):  # token t is predicted from the tokens before it
                total -= float(logp[t - 1, ids[0, t]])
                count += 1
    return total / count


@pytest.fixture
def lm():
    return tiny_llama(seed=3, hidden_size=16)


def test_first_loss_is_the_masked_cross_entropy(lm, one_torch_thread):
    tok = lm.tokenizer
    prompts = [len(tok(" ".join(t.split()[:3]))["input_ids"]) for t in TEXTS]  # the first three words
    expected = masked_cross_entropy(lm.model, tok, TEXTS, prompts)
    result = finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, steps=1, lr=1e-3, batch_size=len(TEXTS),
                                progress=False, prompt_tokens=prompts)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    whole = masked_cross_entropy(lm.model, tok, TEXTS, [0] * len(TEXTS))
    assert abs(whole - expected) > 10 * 1e-5 * expected  # the tolerance above tells the two losses apart


def test_default_predicts_every_token(lm, one_torch_thread):
    tok = lm.tokenizer
    expected = masked_cross_entropy(lm.model, tok, TEXTS, [0] * len(TEXTS))
    result = finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, steps=1, lr=1e-3, batch_size=len(TEXTS),
                                progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_masked_run_resumes_and_refuses_other_masks(lm, tmp_path, one_torch_thread):
    tok = lm.tokenizer
    prompts = [5, 6, 4]
    kwargs = dict(lr=1e-3, batch_size=2, progress=False, checkpoint_every=2, prompt_tokens=prompts)
    straight = finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, steps=4, **kwargs)
    finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, steps=2, checkpoint_dir=tmp_path, **kwargs)
    resumed = finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, steps=4, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.start_step == 2
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    with pytest.raises(ValueError, match="prompt_tokens"):
        finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, steps=4, checkpoint_dir=tmp_path,
                           **{**kwargs, "prompt_tokens": [5, 6, 3]})


@pytest.mark.parametrize("bad, match", [([1, 2], "one per text"), ([1, 0, 2], r"prompt_tokens\[1\]"),
                                        ([1, 1000, 2], r"prompt_tokens\[1\]=1000")])
def test_bad_prompt_tokens_are_refused(lm, bad, match, one_torch_thread):
    with pytest.raises(ValueError, match=match):
        finetune_causal_lm(copy.deepcopy(lm.model), lm.tokenizer, TEXTS, steps=1, lr=1e-3, batch_size=2,
                           progress=False, prompt_tokens=bad)


def test_bfloat16_autocast_keeps_float32_weights_and_its_own_checkpoints(lm, tmp_path, one_torch_thread):
    tok = lm.tokenizer
    expected = masked_cross_entropy(lm.model, tok, TEXTS, [0] * len(TEXTS))
    kwargs = dict(steps=1, lr=1e-3, batch_size=len(TEXTS), progress=False)
    plain = finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, **kwargs)
    mixed = finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, autocast_bf16=True, checkpoint_dir=tmp_path,
                               **kwargs)
    assert mixed.losses[0] == pytest.approx(expected, rel=2e-2)       # bfloat16 keeps 8 bits of mantissa
    assert abs(mixed.losses[0] - plain.losses[0]) > 1e-6 * expected   # and the products did run in it
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    with pytest.raises(ValueError, match="autocast_bf16"):
        finetune_causal_lm(copy.deepcopy(lm.model), tok, TEXTS, checkpoint_dir=tmp_path, **{**kwargs, "steps": 2})
