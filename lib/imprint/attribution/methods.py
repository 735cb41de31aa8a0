"""The attribution methods of chapter 07: which training documents changed f_old into the f_new that answers
a query.

Every method reads hidden states at layer ℓ (numbered as ``output_hidden_states``: 0 the embedding output,
the last one after the final norm), pooled over positions by a weight row per text (:class:`Encoded`): a
query ``"The output of <F>(x) is "`` is read at its last prompt token, the position that predicts the
answer; a document at the positions that predict its next token, their mean (``"mean"``) or the last
of them (``"last"``). The loss of a query is the cross-entropy of its answer token; that of a document the
mean next-token cross-entropy over the document.

* **Δh similarity**: Δh = h_new − h_old per layer; score cos(Δh_q, Δh_z), per layer and aggregated over
  layers (:func:`aggregate_layers`: mean, mean of the top k, or convex weights fitted on validation queries
  by :func:`fit_layer_weights`).
* **Activation-gradient similarity**: g = ∂L/∂h at f_new; score cos(g_q, g_z).
* **Attribution-weighted change**: a = Δh ⊙ g per position, pooled: the first-order share of each
  coordinate in L_new − L_old; score cos(a_q, a_z). Its integrated-gradients variant
  (:func:`integrated_attribution`) averages g over K points of the straight path from f_old's states at ℓ
  to f_new's, with f_new's layers above ℓ, so the coordinates sum to the loss change along the path.
* **Gated cross-checkpoint patching** (:func:`gated_patching_scores`): for document z, the top p% of the
  coordinates of |a_z| at ℓ gate which coordinates of f_new's state on the query are written into f_old's
  forward pass on the query; the score is the change of the answer's logit margin over the other
  candidates, patched minus unpatched f_old.
* **Difference probes** (:func:`difference_probes`): soft prompts optimised so that f_new and f_old
  disagree most on the next token (KL divergence), whose Δh then retrieves documents like a query's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from imprint.attribution.hooks import capture_hidden, n_hidden_layers, replace_hidden
from imprint.attribution.models import check_query_tokens
from imprint.data.hops import HopsDocument, HopsQuery, single_token_ids
from imprint.runtime.checks import require_choice, require_float, require_int, require_positive
from imprint.runtime.devices import resolve_device

DOCUMENT_POOLINGS = ("mean", "last")
AGGREGATIONS = ("mean", "topk", "weights")


# ---------------------------------------------------------------------------------------------------
# Texts as token batches with a loss and a pooling


@dataclass(frozen=True)
class Encoded:
    """Right-padded token ids of n texts; ``targets[i, s]`` is the token position s predicts (−100: none)
    and ``weights[i]`` pools the positions of text i (rows sum to 1)."""

    ids: Int[Tensor, "n s"]
    mask: Int[Tensor, "n s"]
    targets: Int[Tensor, "n s"]
    weights: Float[Tensor, "n s"]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: Tensor | slice) -> "Encoded":
        """Some texts, trimmed to their longest row."""
        mask = self.mask[index]
        width = max(int(mask.sum(1).max()), 1)
        return Encoded(self.ids[index][:, :width], mask[:, :width], self.targets[index][:, :width],
                       self.weights[index][:, :width])


def _pack(rows: list[list[int]], targets: list[list[int]], weights: list[list[float]], pad_id: int) -> Encoded:
    width = max(len(r) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    tgt = torch.full((n, width), -100, dtype=torch.long)
    w = torch.zeros((n, width), dtype=torch.float32)
    for i, (r, t, p) in enumerate(zip(rows, targets, weights)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        tgt[i, :len(t)] = torch.tensor(t)
        w[i, :len(p)] = torch.tensor(p)
    return Encoded(ids, mask, tgt, w)


def encode_queries(tokenizer, queries: Sequence[HopsQuery]) -> Encoded:
    """Each prompt (with the tokenizer's special tokens, as the logit evaluation reads it) followed by its
    answer token; the last prompt position predicts the answer and is the one pooled."""
    queries = list(queries)
    if not queries:
        raise ValueError("queries is empty: expected at least one HOPS query")
    check_query_tokens(tokenizer, queries)
    answers = single_token_ids(tokenizer, [q.completion for q in queries], name="completion")
    rows, targets, weights = [], [], []
    for q, a in zip(queries, answers.tolist()):
        prompt = tokenizer.encode(q.prompt, add_special_tokens=True)
        rows.append(prompt + [a])
        targets.append([-100] * (len(prompt) - 1) + [a])
        weights.append([0.0] * (len(prompt) - 1) + [1.0])
    return _pack(rows, targets, weights, tokenizer.pad_token_id)


def encode_documents(tokenizer, documents: Sequence[HopsDocument | str], pooling: str = "mean",
                     max_length: int = 256) -> Encoded:
    """Each document truncated to ``max_length`` tokens; every position but the last predicts the next
    token; ``pooling`` averages those positions (``"mean"``) or takes the last of them (``"last"``)."""
    require_choice("pooling", pooling, DOCUMENT_POOLINGS)
    require_int("max_length", max_length, minimum=2)
    documents = list(documents)
    if not documents:
        raise ValueError("documents is empty: expected at least one document")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: expected one (set tokenizer.pad_token first)")
    rows, targets, weights = [], [], []
    for i, doc in enumerate(documents):
        text = doc if isinstance(doc, str) else doc.text
        ids = tokenizer.encode(text, add_special_tokens=True)[:max_length]
        if len(ids) < 2:
            raise ValueError(f"documents[{i}] encodes to fewer than 2 tokens: expected a document to predict")
        n = len(ids) - 1
        rows.append(ids)
        targets.append(ids[1:])
        weights.append([1.0 / n] * n if pooling == "mean" else [0.0] * (n - 1) + [1.0])
    return _pack(rows, targets, weights, tokenizer.pad_token_id)


def per_text_loss(logits: Float[Tensor, "n s v"], targets: Int[Tensor, "n s"]) -> Float[Tensor, " n"]:
    """Mean cross-entropy over each row's predicting positions."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100,
                                           reduction="none")
    counts = (targets != -100).sum(1).clamp_min(1)
    return ce.sum(1) / counts


def _check_layers(model, layers: Sequence[int]) -> list[int]:
    top = n_hidden_layers(model)
    if isinstance(layers, int) or not layers:
        raise ValueError(f"layers={layers!r}: expected a non-empty list of layer indices in 0..{top}")
    layers = [require_int("layers[...]", layer, minimum=0, maximum=top) for layer in layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers={layers}: expected each layer once")
    return layers


def _check_pair(model_old, model_new) -> None:
    v_old = model_old.get_input_embeddings().weight.shape
    v_new = model_new.get_input_embeddings().weight.shape
    if v_old != v_new:
        raise ValueError(f"model_old has embeddings {tuple(v_old)} and model_new {tuple(v_new)}: expected two "
                         "checkpoints of one model over one vocabulary")
    if n_hidden_layers(model_old) != n_hidden_layers(model_new):
        raise ValueError("model_old and model_new have different depths: expected two checkpoints of one model")


def _grad_root(hidden: Tensor) -> Tensor:
    """Let the graph start at the embedding output even when no parameter requires a gradient."""
    return hidden if hidden.requires_grad else hidden.detach().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------
# Δh, ∂L/∂h and Δh ⊙ g in one pass per batch


@dataclass(frozen=True)
class ChangeFeatures:
    """Pooled per-layer features of n texts (``layers`` in order, on the CPU, float32): Δh, g = ∂L/∂h at
    f_new, a = Δh ⊙ g (pooled after the product) and h_new; and each text's loss under both models."""

    layers: list[int]
    delta: Float[Tensor, "l n d"]
    grad: Float[Tensor, "l n d"]
    attribution: Float[Tensor, "l n d"]
    hidden_new: Float[Tensor, "l n d"]
    loss_old: Float[Tensor, " n"]
    loss_new: Float[Tensor, " n"]

    def kind(self, name: str) -> Float[Tensor, "l n d"]:
        require_choice("kind", name, FEATURE_KINDS)
        return getattr(self, FEATURE_KINDS[name])


FEATURE_KINDS = {"delta_h": "delta", "activation_gradient": "grad", "attribution": "attribution",
                 "hidden_new": "hidden_new"}


def change_features(model_old, model_new, encoded: Encoded, layers: Sequence[int], batch_size: int = 32,
                    device: str = "cpu") -> ChangeFeatures:
    """Δh, ∂L/∂h, Δh ⊙ ∂L/∂h and h_new at ``layers`` for every text of ``encoded``: one forward pass of
    f_old and one forward and backward pass of f_new per batch, all layers at once.

    The gradient of a batch's summed losses with respect to a row's states is that row's own gradient
    (rows interact only through padding, which the attention mask removes); the models' parameters get
    no gradient.
    """
    _check_pair(model_old, model_new)
    layers = _check_layers(model_new, layers)
    require_int("batch_size", batch_size, minimum=1)
    dev = resolve_device(device)
    for m in (model_old, model_new):
        m.to(dev).eval()
    order = torch.argsort(encoded.mask.sum(1), descending=True)
    chunks = {k: [] for k in ("delta", "grad", "attribution", "hidden_new", "loss_old", "loss_new")}
    for start in range(0, len(encoded), batch_size):
        batch = encoded.rows(order[start:start + batch_size])
        ids, mask = batch.ids.to(dev), batch.mask.to(dev)
        targets, w = batch.targets.to(dev), batch.weights.to(dev)
        with torch.no_grad(), capture_hidden(model_old, layers) as old:
            loss_old = per_text_loss(model_old(input_ids=ids, attention_mask=mask).logits, targets)
        with torch.enable_grad(), replace_hidden(model_new, 0, _grad_root), \
                capture_hidden(model_new, layers, detach=False) as new:
            loss_new = per_text_loss(model_new(input_ids=ids, attention_mask=mask).logits, targets)
            states = [new.states[layer] for layer in layers]
            grads = torch.autograd.grad(loss_new.sum(), states, allow_unused=True)
        for layer, h_new, g in zip(layers, states, grads):
            h_new = h_new.detach().float()
            g = torch.zeros_like(h_new) if g is None else g.float()
            d = h_new - old.states[layer].float()
            pool = lambda x: torch.einsum("bs,bsd->bd", w, x).cpu()  # noqa: E731
            chunks["delta"].append((layer, pool(d)))
            chunks["grad"].append((layer, pool(g)))
            chunks["attribution"].append((layer, pool(d * g)))
            chunks["hidden_new"].append((layer, pool(h_new)))
        chunks["loss_old"].append(loss_old.float().cpu())
        chunks["loss_new"].append(loss_new.detach().float().cpu())
    inverse = torch.argsort(order)

    def stack(name):
        per_layer = {layer: [] for layer in layers}
        for layer, x in chunks[name]:
            per_layer[layer].append(x)
        return torch.stack([torch.cat(per_layer[layer])[inverse] for layer in layers])

    return ChangeFeatures(layers=layers, delta=stack("delta"), grad=stack("grad"),
                          attribution=stack("attribution"), hidden_new=stack("hidden_new"),
                          loss_old=torch.cat(chunks["loss_old"])[inverse],
                          loss_new=torch.cat(chunks["loss_new"])[inverse])


# ---------------------------------------------------------------------------------------------------
# Integrated gradients along h_old -> h_new


@dataclass(frozen=True)
class IntegratedAttribution:
    """Pooled IG attributions at one layer, and per text the sum of its unpooled attributions over every
    position and coordinate (``total``) beside the loss change it approximates (``path_change``: f_new's
    layers above ℓ read at h_new minus at h_old)."""

    layer: int
    attribution: Float[Tensor, "n d"]
    total: Float[Tensor, " n"]
    path_change: Float[Tensor, " n"]


def integrated_attribution(model_old, model_new, encoded: Encoded, layer: int, steps: int = 8,
                           batch_size: int = 32, device: str = "cpu") -> IntegratedAttribution:
    """(h_new − h_old) ⊙ mean_k ∂L/∂h at h_old + α_k (h_new − h_old), α_k = (k − ½)/K, k = 1..``steps``
    (the midpoint rule), with the whole sequence's states at ``layer`` on the path and f_new's layers above
    it; pooled per text as :func:`change_features` pools."""
    _check_pair(model_old, model_new)
    layer = _check_layers(model_new, [layer])[0]
    require_int("steps", steps, minimum=1)
    require_int("batch_size", batch_size, minimum=1)
    dev = resolve_device(device)
    for m in (model_old, model_new):
        m.to(dev).eval()
    order = torch.argsort(encoded.mask.sum(1), descending=True)
    attrs, totals, changes = [], [], []
    for start in range(0, len(encoded), batch_size):
        batch = encoded.rows(order[start:start + batch_size])
        ids, mask = batch.ids.to(dev), batch.mask.to(dev)
        targets, w = batch.targets.to(dev), batch.weights.to(dev)
        with torch.no_grad():
            with capture_hidden(model_old, [layer]) as old:
                model_old(input_ids=ids, attention_mask=mask)
            with capture_hidden(model_new, [layer]) as new:
                loss_end = per_text_loss(model_new(input_ids=ids, attention_mask=mask).logits, targets)
            h_old, h_new = old.states[layer], new.states[layer]
            with replace_hidden(model_new, layer, lambda h: h_old):
                loss_start = per_text_loss(model_new(input_ids=ids, attention_mask=mask).logits, targets)
        d = h_new - h_old
        g_sum = torch.zeros_like(d, dtype=torch.float32)
        for k in range(steps):
            point = (h_old + (k + 0.5) / steps * d).detach().requires_grad_(True)
            with torch.enable_grad(), replace_hidden(model_new, layer, lambda h: point):
                loss = per_text_loss(model_new(input_ids=ids, attention_mask=mask).logits, targets)
                (g,) = torch.autograd.grad(loss.sum(), [point])
            g_sum += g.float()
        product = d.float() * g_sum / steps
        product = product * mask[..., None]
        attrs.append(torch.einsum("bs,bsd->bd", w, product).cpu())
        totals.append(product.sum((1, 2)).cpu())
        changes.append((loss_end - loss_start).float().cpu())
    inverse = torch.argsort(order)
    return IntegratedAttribution(layer=layer, attribution=torch.cat(attrs)[inverse],
                                 total=torch.cat(totals)[inverse], path_change=torch.cat(changes)[inverse])


# ---------------------------------------------------------------------------------------------------
# Scores and their aggregation over layers


def similarity_scores(queries: Float[Tensor, "l q d"], documents: Float[Tensor, "l n d"],
                      normalise: bool = True) -> Float[Tensor, "l q n"]:
    """Per layer, the cosine (``normalise``) or dot product of every query's feature with every
    document's; a zero feature has cosine 0 with everything."""
    if queries.ndim != 3 or documents.ndim != 3 or queries.shape[0] != documents.shape[0] \
            or queries.shape[2] != documents.shape[2]:
        raise ValueError(f"queries {tuple(queries.shape)} and documents {tuple(documents.shape)}: expected "
                         "(layers, q, d) and (layers, n, d) with the same layers and width")
    q, z = queries.float(), documents.float()
    if normalise:
        q = torch.nn.functional.normalize(q, dim=-1)
        z = torch.nn.functional.normalize(z, dim=-1)
    return torch.bmm(q, z.transpose(1, 2))


def _standardise(per_layer: Tensor) -> Tensor:
    """Each layer's scores of a query in units of their spread over the documents."""
    mean = per_layer.mean(-1, keepdim=True)
    std = per_layer.std(-1, keepdim=True).clamp_min(1e-12)
    return (per_layer - mean) / std


def aggregate_layers(per_layer: Float[Tensor, "l q n"], how: str = "mean", k: int = 3,
                     weights: Float[Tensor, " l"] | None = None) -> Float[Tensor, "q n"]:
    """One score per (query, document) from per-layer scores standardised per query and layer: their mean,
    the mean of the ``k`` largest, or a weighted sum with ``weights`` (:func:`fit_layer_weights`)."""
    require_choice("how", how, AGGREGATIONS)
    z = _standardise(per_layer.float())
    if how == "mean":
        return z.mean(0)
    if how == "topk":
        k = require_int("k", k, minimum=1, maximum=z.shape[0])
        return z.topk(k, dim=0).values.mean(0)
    if weights is None or weights.shape != (z.shape[0],):
        raise ValueError(f"weights={None if weights is None else tuple(weights.shape)}: expected one weight "
                         f"per layer ({z.shape[0]}) with how='weights'")
    return torch.einsum("l,lqn->qn", weights.to(z), z)


def fit_layer_weights(per_layer: Float[Tensor, "l q n"], relevant: Bool[Tensor, "_q _n"], steps: int = 300,
                      lr: float = 0.1, temperature: float = 1.0) -> Float[Tensor, " l"]:
    """Convex layer weights w = softmax(θ) that maximise, on these (validation) queries, the listwise
    likelihood of the relevant documents: mean over relevant (q, j) of log softmax_j(Σ_ℓ w_ℓ z_ℓqj / τ),
    z the per-query standardised scores; Adam from uniform weights."""
    require_int("steps", steps, minimum=1)
    require_positive("lr", lr)
    require_positive("temperature", temperature)
    if relevant.shape != per_layer.shape[1:]:
        raise ValueError(f"relevant has shape {tuple(relevant.shape)}: expected {tuple(per_layer.shape[1:])}")
    if not relevant.any(1).all():
        raise ValueError("relevant has a query without any relevant document: expected at least one each")
    z = _standardise(per_layer.float()).detach()
    rel = relevant.to(z.device, torch.float32)
    theta = torch.zeros(z.shape[0], device=z.device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        s = torch.einsum("l,lqn->qn", torch.softmax(theta, 0), z) / temperature
        loss = -((torch.log_softmax(s, dim=1) * rel).sum(1) / rel.sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(theta.detach(), 0).cpu()


# ---------------------------------------------------------------------------------------------------
# Gated cross-checkpoint patching


def attribution_gates(attribution: Float[Tensor, "n d"], percent: float | int) -> Bool[Tensor, "n d"]:
    """Per document, the ceil(``percent``% of d) coordinates of largest |a| (at least one)."""
    require_float("percent", percent, minimum=0.0, maximum=100.0, strict_minimum=True)
    n, d = attribution.shape
    top = max(1, math.ceil(percent / 100.0 * d))
    index = attribution.abs().topk(top, dim=1).indices
    gates = torch.zeros(n, d, dtype=torch.bool)
    gates[torch.arange(n)[:, None], index] = True
    return gates


def answer_margins(logits: Float[Tensor, "b c"], answer: int) -> Float[Tensor, " b"]:
    """The answer's logit minus the largest logit of the other candidates (column ``answer``)."""
    others = torch.cat([logits[:, :answer], logits[:, answer + 1:]], 1)
    return logits[:, answer] - others.max(1).values


@torch.no_grad()
def gated_patching_scores(model_old, model_new, tokenizer, queries: Sequence[HopsQuery],
                          gates: Bool[Tensor, "n d"], layer: int, candidates: Sequence[int],
                          batch_size: int = 512, device: str = "cpu") -> Float[Tensor, "q n"]:
    """For every query and gate row (one per document): f_old's forward pass on the query with the gated
    coordinates of its state at ``layer`` and the last prompt position set to f_new's, read as the
    answer's margin over the other ``candidates``; minus f_old's own margin. One batch of gate rows per
    forward pass."""
    _check_pair(model_old, model_new)
    layer = _check_layers(model_new, [layer])[0]
    require_int("batch_size", batch_size, minimum=1)
    queries = list(queries)
    if not queries:
        raise ValueError("queries is empty: expected at least one HOPS query")
    check_query_tokens(tokenizer, queries)
    candidates = [int(c) for c in candidates]
    missing = sorted({q.constant for q in queries} - set(candidates))
    if missing:
        raise ValueError(f"candidates={candidates}: lacks the expected answers {missing}")
    width = model_new.get_input_embeddings().weight.shape[1]
    if gates.ndim != 2 or gates.shape[1] != width or gates.dtype != torch.bool:
        raise ValueError(f"gates has shape {tuple(gates.shape)} and dtype {gates.dtype}: expected a boolean "
                         f"(documents, {width}) matrix")
    candidate_ids = single_token_ids(tokenizer, [str(c) for c in candidates], name="candidates")
    column = {c: j for j, c in enumerate(candidates)}
    dev = resolve_device(device)
    for m in (model_old, model_new):
        m.to(dev).eval()
    gates = gates.to(dev)
    out = torch.empty(len(queries), gates.shape[0])
    for i, q in enumerate(queries):
        ids = torch.tensor([tokenizer.encode(q.prompt, add_special_tokens=True)], device=dev)
        pos = ids.shape[1] - 1
        with capture_hidden(model_new, [layer]) as new:
            model_new(input_ids=ids)
        target = new.states[layer][0, pos]
        base = model_old(input_ids=ids).logits[:, pos, candidate_ids.to(dev)].float()
        m_old = answer_margins(base, column[q.constant])
        for start in range(0, gates.shape[0], batch_size):
            g = gates[start:start + batch_size]

            def patch(h, g=g):
                h = h.clone()
                h[:, pos] = torch.where(g, target.to(h.dtype), h[:, pos])
                return h

            with replace_hidden(model_old, layer, patch):
                logits = model_old(input_ids=ids.expand(g.shape[0], -1)).logits[:, pos, candidate_ids.to(dev)]
            logits = logits.float()
            out[i, start:start + g.shape[0]] = (answer_margins(logits, column[q.constant]) - m_old).cpu()
    return out


# ---------------------------------------------------------------------------------------------------
# Difference probes


@dataclass(frozen=True)
class Probes:
    """Optimised soft prompts (p, m, d), their next-token KL(f_new ‖ f_old) before and after, and their
    pooled Δh at ``layers`` (read at the last probe position)."""

    embeddings: Float[Tensor, "p m d"]
    kl_start: Float[Tensor, " p"]
    kl_end: Float[Tensor, " p"]
    layers: list[int]
    delta: Float[Tensor, "l p d"]


def _next_token_kl(model_old, model_new, embeds: Tensor) -> Tensor:
    logp_new = torch.log_softmax(model_new(inputs_embeds=embeds).logits[:, -1].float(), -1)
    logp_old = torch.log_softmax(model_old(inputs_embeds=embeds).logits[:, -1].float(), -1)
    return (logp_new.exp() * (logp_new - logp_old)).sum(-1)


def difference_probes(model_old, model_new, layers: Sequence[int], n_probes: int = 16, length: int = 8,
                      steps: int = 200, lr: float = 0.05, seed: int = 0, device: str = "cpu",
                      init_ids: Int[Tensor, " v"] | None = None) -> Probes:
    """``n_probes`` soft prompts of ``length`` vectors, started at the embeddings of tokens drawn (seeded)
    from ``init_ids`` (default: the whole vocabulary), moved by Adam to maximise the next-token
    KL(f_new ‖ f_old) at their last position, each vector kept at the mean norm of the embedding rows;
    then their Δh at ``layers``."""
    _check_pair(model_old, model_new)
    layers = _check_layers(model_new, layers)
    require_int("n_probes", n_probes, minimum=1)
    require_int("length", length, minimum=1)
    require_int("steps", steps, minimum=0)
    require_positive("lr", lr)
    dev = resolve_device(device)
    for m in (model_old, model_new):
        m.to(dev).eval()
    table = model_new.get_input_embeddings().weight.detach()
    radius = table.float().norm(dim=1).mean()
    pool = torch.arange(table.shape[0]) if init_ids is None else init_ids.cpu()
    if pool.numel() == 0:
        raise ValueError("init_ids is empty: expected token ids to start the probes from")
    gen = torch.Generator().manual_seed(seed)
    start_ids = pool[torch.randint(pool.numel(), (n_probes, length), generator=gen)]
    x = table[start_ids.to(table.device)].float().to(dev).clone().requires_grad_(True)
    dtype = table.dtype

    def project(v):
        return v * (radius / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    with torch.no_grad():
        kl_start = _next_token_kl(model_old, model_new, x.to(dtype)).cpu()
    opt = torch.optim.Adam([x], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = -_next_token_kl(model_old, model_new, x.to(dtype)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(project(x))
    with torch.no_grad():
        embeds = x.detach().to(dtype)
        kl_end = _next_token_kl(model_old, model_new, embeds).cpu()
        inner = [layer for layer in layers if layer > 0]  # state 0 is the probe itself, the same in both
        states = {}
        if inner:
            with capture_hidden(model_old, inner) as old:
                model_old(inputs_embeds=embeds)
            with capture_hidden(model_new, inner) as new:
                model_new(inputs_embeds=embeds)
            states = {layer: (new.states[layer][:, -1] - old.states[layer][:, -1]).float().cpu() for layer in inner}
        zero = torch.zeros(n_probes, embeds.shape[-1])
        delta = torch.stack([states.get(layer, zero) for layer in layers])
    return Probes(embeddings=embeds.float().cpu(), kl_start=kl_start, kl_end=kl_end, layers=layers, delta=delta)
