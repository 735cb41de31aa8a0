"""Chapter 08's probe baseline: a linear classifier of harmfulness on a model's activations, which
refuses a request when it fires (the monitor the circuit breaker is compared against at a matched
false-positive rate).

Features are the hidden state at one layer averaged over the request's tokens (the chat template's
prompt up to the assistant header). The classifier is scikit-learn's L2-regularised logistic
regression; its threshold is the ``1 - fpr`` quantile of its scores on benign validation requests, so
that at most that share of benign requests is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from imprint.runtime.checks import require_float, require_int
from imprint.safety.circuit_breakers import decoder_layers
from imprint.safety.experiment import chat_prompt


@torch.no_grad()
def request_features(model, tokenizer, prompts: Sequence, layer: int) -> Float[Tensor, "n d"]:
    """The mean hidden state at ``layer`` (``output_hidden_states`` numbering) over each request's tokens."""
    n_blocks = len(decoder_layers(model))
    require_int("layer", layer, minimum=0, maximum=n_blocks)
    dev = next(model.parameters()).device
    rows = []
    for p in prompts:
        ids = torch.tensor([tokenizer(chat_prompt(tokenizer, p), add_special_tokens=True)["input_ids"]], device=dev)
        h = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer][0]
        rows.append(h.float().mean(0).cpu())
    return torch.stack(rows)


@dataclass
class HarmProbe:
    """A fitted probe and the threshold above which it refuses."""

    weights: np.ndarray
    bias: float
    threshold: float
    fpr: float

    def scores(self, features: Tensor) -> np.ndarray:
        return features.double().numpy() @ self.weights + self.bias

    def fires(self, features: Tensor) -> np.ndarray:
        return self.scores(features) > self.threshold


def threshold_at_fpr(benign_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold t among the scores with at most ``fpr`` of ``benign_scores`` above t (-inf
    when ``fpr`` allows every benign request to be refused)."""
    require_float("fpr", fpr, minimum=0.0, maximum=1.0)
    s = np.sort(np.asarray(benign_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("benign_scores is empty: expected validation scores of benign requests")
    allowed = int(np.floor(fpr * s.size))  # benign requests that may score above the threshold
    if allowed >= s.size:
        return float("-inf")
    return float(s[s.size - allowed - 1])


def fit_probe(harmful: Tensor, benign: Tensor, benign_validation: Tensor, fpr: float = 0.05,
              c: float = 1.0, seed: int = 0) -> HarmProbe:
    """Logistic regression of harmful (1) against benign (0) features, with its threshold set on
    ``benign_validation`` at false-positive rate ``fpr``."""
    from sklearn.linear_model import LogisticRegression

    if len(harmful) == 0 or len(benign) == 0:
        raise ValueError(f"harmful has {len(harmful)} rows and benign {len(benign)}: expected both non-empty")
    x = torch.cat([harmful, benign]).double().numpy()
    y = np.r_[np.ones(len(harmful)), np.zeros(len(benign))]
    clf = LogisticRegression(C=require_float("c", c, minimum=0.0, strict_minimum=True), max_iter=2000,
                             random_state=seed).fit(x, y)
    probe = HarmProbe(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), 0.0, fpr)
    probe.threshold = threshold_at_fpr(probe.scores(benign_validation), fpr)
    return probe
