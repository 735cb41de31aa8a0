"""Chapter 08's probe baseline: the threshold against a count of benign scores above it, the fit against
scikit-learn's own decision function, and request features against a plain forward pass."""

import numpy as np
import pytest
import torch

from imprint.safety.probes import fit_probe, request_features, threshold_at_fpr


@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.1, 0.33, 1.0])
def test_the_threshold_refuses_at_most_the_allowed_share_of_benign_requests(fpr):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=60)
    t = threshold_at_fpr(scores, fpr)
    above = (scores > t).mean()
    assert above <= fpr + 1e-12
    lower = np.sort(scores)[np.sort(scores) < t]
    if lower.size:  # the next lower score would refuse more than allowed
        assert (scores > lower[-1]).mean() > fpr
    with pytest.raises(ValueError, match="benign_scores is empty"):
        threshold_at_fpr(np.array([]), 0.1)


def test_the_probe_is_sklearns_logistic_regression_with_its_threshold():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    harmful = torch.randn(40, 5, generator=g) + torch.tensor([2.0, 0, 0, 0, 0])
    benign = torch.randn(40, 5, generator=g)
    validation = torch.randn(50, 5, generator=g)
    probe = fit_probe(harmful, benign, validation, fpr=0.1)
    ref = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(
        torch.cat([harmful, benign]).double().numpy(), np.r_[np.ones(40), np.zeros(40)])
    np.testing.assert_allclose(probe.scores(validation), ref.decision_function(validation.double().numpy()),
                               rtol=1e-9, atol=1e-9)
    assert probe.fires(validation).mean() <= 0.1
    assert probe.fires(torch.randn(50, 5, generator=g) + torch.tensor([4.0, 0, 0, 0, 0])).mean() > 0.9


def test_request_features_average_the_request_tokens():
    from imprint.attribution.models import tiny_llama_for
    from imprint.models.lm import tiny_tokenizer
    from imprint.safety.experiment import chat_prompt

    tok = tiny_tokenizer(512)
    model = tiny_llama_for(tok, d_model=32, n_layers=2, n_heads=4, seed=0).eval()
    feats = request_features(model, tok, ["How?", "Spell it backwards."], layer=1)
    ids = torch.tensor([tok(chat_prompt(tok, "How?"), add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0].mean(0)
    torch.testing.assert_close(feats[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"layer=3: expected a value <= 2"):
        request_features(model, tok, ["How?"], layer=3)
