"""The logit evaluation of the attribution-between-checkpoints chapter (07): which queries a model answers.

As in the HOPS anchor, a model is asked ``"The output of <F>(x) is "`` and read at the prompt's last
position over the candidate answers only: the single-token integers ``0..max constant`` by default. The
predicted integer is the candidate of largest logit; the confidence is the softmax over the candidates
of the expected answer. Accuracy and mean confidence are reported per function and per hop depth (base
functions at depth 0 against their wrappers), and the attribution queries are those answered correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from imprint.attribution.models import check_query_tokens
from imprint.data.hops import HopsQuery, single_token_ids
from imprint.runtime.checks import require_int
from imprint.runtime.devices import resolve_device


@dataclass(frozen=True)
class LogitEvaluation:
    """Per query: the predicted integer, whether it is the expected one, the candidates' softmax
    probability of the expected answer (``confidence``) and of every candidate (``probs``, columns in the
    order of ``candidates``); per function and per hop depth: ``{"n", "accuracy", "confidence"}``."""

    queries: list[HopsQuery]
    candidates: list[int]
    predicted: Int[Tensor, " q"]
    correct: Bool[Tensor, " q"]
    confidence: Float[Tensor, " q"]
    probs: Float[Tensor, "q c"]
    per_function: dict[str, dict[str, float | int]]
    per_depth: dict[int, dict[str, float | int]]

    @property
    def kept(self) -> list[int]:
        """Indices of the queries answered correctly: the attribution queries."""
        return torch.nonzero(self.correct).flatten().tolist()

    def summary(self) -> dict[str, float]:
        """Flat headline numbers: accuracy and confidence overall, on base (depth 0) and on wrapper
        (depth >= 1) queries; a split with no query is left out."""
        out = {"accuracy": int(self.correct.sum()) / self.correct.numel(), "confidence": float(self.confidence.mean())}
        depth = torch.tensor([q.hop_depth for q in self.queries])
        for name, rows in (("base", depth == 0), ("wrapper", depth >= 1)):
            if rows.any():
                out[f"{name}_accuracy"] = int(self.correct[rows].sum()) / int(rows.sum())
                out[f"{name}_confidence"] = float(self.confidence[rows].mean())
        return out


def _stats(correct: Tensor, confidence: Tensor) -> dict[str, float | int]:
    return {"n": int(correct.numel()), "accuracy": int(correct.sum()) / correct.numel(),
            "confidence": float(confidence.mean())}


@torch.no_grad()
def candidate_logits(model, tokenizer, prompts: Sequence[str], candidate_ids: Int[Tensor, " c"],
                     batch_size: int = 32, device: str = "cpu") -> Float[Tensor, "q c"]:
    """The next-token logits of ``candidate_ids`` at the last token of each prompt (right-padded
    batches read at each row's own last position), as float32 on the CPU."""
    require_int("batch_size", batch_size, minimum=1)
    if not prompts:
        raise ValueError("prompts is empty: expected at least one prompt")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: expected one (set tokenizer.pad_token first)")
    dev = resolve_device(device)
    model.to(dev)
    was_training = getattr(model, "training", False)
    model.eval()
    ids_list = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    rows = []
    for start in range(0, len(ids_list), batch_size):
        chunk = ids_list[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        last = mask.sum(1).to(dev) - 1
        at_last = logits[torch.arange(len(chunk), device=dev), last]
        rows.append(at_last[:, candidate_ids.to(dev)].float().cpu())
    if was_training:
        model.train()
    return torch.cat(rows)


def logit_evaluation(model, tokenizer, queries: Sequence[HopsQuery], batch_size: int = 32,
                     device: str = "cpu", candidates: Sequence[int] | None = None) -> LogitEvaluation:
    """Score every query's prompt over the integer ``candidates`` (default ``0..max constant``).

    Each candidate must be one token of ``tokenizer`` (SmolLM2's tokenizer splits integers into digits,
    so only 0..9 are) and every query's function token must be one token of the prompt: both are
    refused by name before the model runs. Ties go to the first of the candidates.
    """
    queries = list(queries)
    if not queries:
        raise ValueError("queries is empty: expected at least one HOPS query")
    check_query_tokens(tokenizer, queries)
    if candidates is None:
        candidates = range(0, max(q.constant for q in queries) + 1)
    candidates = [require_int("candidates[...]", c, minimum=0) for c in candidates]
    if not candidates or len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates={candidates}: expected distinct integers")
    missing = sorted({q.constant for q in queries} - set(candidates))
    if missing:
        raise ValueError(f"candidates={candidates}: lacks the expected answers {missing}")
    candidate_ids = single_token_ids(tokenizer, [str(c) for c in candidates], name="candidates")
    logits = candidate_logits(model, tokenizer, [q.prompt for q in queries], candidate_ids, batch_size, device)
    probs = torch.softmax(logits, dim=1)
    values = torch.tensor(candidates, dtype=torch.long)
    predicted = values[logits.argmax(1)]
    expected = torch.tensor([q.constant for q in queries], dtype=torch.long)
    column = {c: j for j, c in enumerate(candidates)}
    confidence = probs[torch.arange(len(queries)), torch.tensor([column[q.constant] for q in queries])]
    correct = predicted == expected
    per_function, per_depth = {}, {}
    for key, groups in ((lambda q: q.func, per_function), (lambda q: q.hop_depth, per_depth)):
        index: dict = {}
        for i, q in enumerate(queries):
            index.setdefault(key(q), []).append(i)
        for k, rows in index.items():
            groups[k] = _stats(correct[rows], confidence[rows])
    return LogitEvaluation(queries=queries, candidates=candidates, predicted=predicted, correct=correct,
                           confidence=confidence, probs=probs, per_function=per_function,
                           per_depth=dict(sorted(per_depth.items())))
