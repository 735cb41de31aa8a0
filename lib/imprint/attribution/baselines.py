"""Baselines of the attribution-between-checkpoints chapter (07): which documents made f_new answer a query.

Every function returns a float32 ``(queries, documents)`` score matrix on the CPU, higher meaning more
relevant, so that any of them can be read by the same retrieval metrics as the chapter's methods.

* Text only: :func:`random_scores` (the floor), :func:`bm25_token_scores` (Okapi BM25 over the model
  tokenizer's tokens), :func:`edit_distance_scores` (minus the normalised Levenshtein distance between
  token-id sequences, by a dynamic programme vectorised over the documents) and
  :func:`embedding_scores` (cosine of all-MiniLM-L6-v2 sentence embeddings). The text of a query is its
  prompt followed by its completion; that of a document, its ``.text``.
* From f_new: :func:`hidden_state_scores` (cosine between hidden states of one layer, the query read at
  its last prompt token, the position that predicts the answer), :func:`gradient_cosine_scores`
  (TrackStar-style: cosine of randomly projected per-example loss gradients, with chapter 03's factored
  projections) and :func:`ekfac_scores` (influence functions with an EK-FAC approximation of the
  Gauss-Newton Hessian, through ``kronfluence``).

The query's loss is the cross-entropy of its completion tokens given the prompt; a document's loss is
the mean next-token cross-entropy over its tokens (the fine-tuning loss of one document). Gradient
scores are positive when a descent step on the document lowers the query's loss.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from imprint.attribution.models import pad_rows
from imprint.data.hops import HopsDocument, HopsQuery
from imprint.runtime.checks import require_choice, require_float, require_int
from imprint.runtime.devices import resolve_device

IGNORE_INDEX = -100
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


# ---------------------------------------------------------------------------------------------------
# Checks and encodings


def _require_texts(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"{name}={texts!r}: expected a list of texts, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: expected at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}]={t!r}: expected a string")
    return texts


def _require_queries(queries: Sequence[HopsQuery]) -> list[HopsQuery]:
    if isinstance(queries, (str, bytes)):
        raise ValueError(f"queries={queries!r}: expected a list of HopsQuery, not one string")
    queries = list(queries)
    if not queries:
        raise ValueError("queries is empty: expected at least one HOPS query")
    for i, q in enumerate(queries):
        if not (hasattr(q, "prompt") and hasattr(q, "completion")):
            raise ValueError(f"queries[{i}]={q!r}: expected a HopsQuery (with .prompt and .completion)")
        if not q.completion:
            raise ValueError(f"queries[{i}] has an empty completion: expected the answer to take the loss on")
    return queries


def _document_texts(documents: Sequence[HopsDocument | str]) -> list[str]:
    """The texts of ``documents`` (HopsDocument, or anything with ``.text``, or plain strings)."""
    if isinstance(documents, (str, bytes)):
        raise ValueError(f"documents={documents!r}: expected a list of documents, not one string")
    documents = list(documents)
    if not documents:
        raise ValueError("documents is empty: expected at least one document")
    texts = []
    for i, d in enumerate(documents):
        text = d if isinstance(d, str) else getattr(d, "text", None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"documents[{i}]={d!r}: expected a HopsDocument (or a string) with a non-empty text")
        texts.append(text)
    return texts


def query_texts(queries: Sequence[HopsQuery]) -> list[str]:
    """The text of each query for the text baselines: its prompt followed by its completion."""
    return [q.prompt + q.completion for q in _require_queries(queries)]


def _require_tokenizer(tokenizer, name: str = "tokenizer") -> None:
    if not hasattr(tokenizer, "encode"):
        raise ValueError(f"{name}={type(tokenizer).__name__}: expected a Hugging Face tokenizer (with .encode)")


def _require_model_tokenizer(model, tokenizer) -> None:
    if not hasattr(model, "get_input_embeddings"):
        raise ValueError(f"model={type(model).__name__}: expected a Hugging Face causal LM")
    _require_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: expected one (set tokenizer.pad_token first)")


def _encode_queries(tokenizer, queries: Sequence[HopsQuery]) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt then completion (encoded apart, as the logit evaluation reads the prompt),
    and the number of prompt tokens of each."""
    rows, n_prompt = [], []
    for i, q in enumerate(queries):
        prompt = tokenizer.encode(q.prompt, add_special_tokens=True)
        completion = tokenizer.encode(q.completion, add_special_tokens=False)
        if not prompt or not completion:
            raise ValueError(f"queries[{i}]: prompt {q.prompt!r} or completion {q.completion!r} encodes to no "
                             "token: expected both to have tokens")
        rows.append(prompt + completion)
        n_prompt.append(len(prompt))
    return rows, n_prompt


def _encode_documents(tokenizer, texts: Sequence[str], max_length: int, minimum: int) -> list[list[int]]:
    rows = [tokenizer.encode(t, add_special_tokens=True)[:max_length] for t in texts]
    short = [i for i, r in enumerate(rows) if len(r) < minimum]
    if short:
        raise ValueError(f"documents[{short[0]}] encodes to fewer than {minimum} tokens: expected "
                         f"{'a token to predict' if minimum > 1 else 'a token'}")
    return rows


def _lm_batch(rows: Sequence[Sequence[int]], n_prompt: Sequence[int] | None, pad_id: int
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (aligned with the ids, -100 where no
    loss: padding, and the prompt of a query)."""
    ids, mask = pad_rows(rows, pad_id)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    if n_prompt is not None:
        for i, k in enumerate(n_prompt):
            labels[i, :k] = IGNORE_INDEX
    return ids, mask, labels


def _cosine(a: Tensor, b: Tensor) -> Float[Tensor, "q n"]:
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return (a @ b.T).float().cpu()


class _EvalMode:
    """The model in eval mode inside the block, its mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.training = getattr(self.model, "training", False)
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.training:
            self.model.train()
        return False


# ---------------------------------------------------------------------------------------------------
# Text baselines


def random_scores(n_queries: int, n_documents: int, seed: int) -> Float[Tensor, "q n"]:
    """Independent standard normal scores, seeded: the chance level of every retrieval metric."""
    require_int("n_queries", n_queries, minimum=1)
    require_int("n_documents", n_documents, minimum=1)
    require_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_queries, n_documents, generator=generator, dtype=torch.float32)


def tokenizer_tokens(tokenizer):
    """A function from a text to the tokenizer's token strings (no special tokens added)."""
    _require_tokenizer(tokenizer)

    def tokenize(text: str) -> list[str]:
        return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))

    return tokenize


def bm25_token_scores(queries_text: Sequence[str], documents_text: Sequence[str], tokenizer
                      ) -> Float[Tensor, "q n"]:
    """Okapi BM25 (:func:`imprint.gradients.similarity.bm25_scores`) with the model tokenizer's tokens as
    terms: a function token such as ``<FN>`` is one term, as the model sees it."""
    from imprint.gradients.similarity import bm25_scores

    queries_text = _require_texts("queries_text", queries_text)
    documents_text = _require_texts("documents_text", documents_text)
    return bm25_scores(queries_text, documents_text, tokenize=tokenizer_tokens(tokenizer)).float()


def levenshtein_to_many(query: Sequence[int], documents: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Levenshtein distance from ``query`` to each row of ``documents`` (padded, ``lengths`` real tokens).

    The dynamic programme runs over the query's tokens only: with ``E[j] = min(D[i-1, j] + 1,
    D[i-1, j-1] + [a_i != b_j])`` (and ``E[0] = i``), row ``i`` is ``D[i, j] = min_{k <= j} E[k] + (j - k)
    = j + cummin_k (E[k] - k)``, a cumulative minimum along the documents' axis for all documents at once.
    Padding sits right of every document's end, so it never reaches the column read at ``lengths``.
    """
    n, width = documents.shape
    cols = np.arange(width + 1, dtype=np.int64)
    row = np.broadcast_to(cols, (n, width + 1)).copy()          # D[0, j] = j
    for i, a in enumerate(query, start=1):
        cost = (documents != a).astype(np.int64)                  # (n, width): [a_i != b_j], j = 1..width
        e = np.empty_like(row)
        e[:, 0] = i
        e[:, 1:] = np.minimum(row[:, 1:] + 1, row[:, :-1] + cost)
        row = cols + np.minimum.accumulate(e - cols, axis=1)
    return row[np.arange(n), lengths]


def edit_distance_scores(queries_text: Sequence[str], documents_text: Sequence[str], tokenizer
                         ) -> Float[Tensor, "q n"]:
    """Minus the Levenshtein distance between token-id sequences over the longer length (0: identical,
    -1: nothing in common), for every query and document (:func:`levenshtein_to_many`)."""
    queries_text = _require_texts("queries_text", queries_text)
    documents_text = _require_texts("documents_text", documents_text)
    _require_tokenizer(tokenizer)
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in documents_text]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    padded = np.full((len(docs), max(1, int(lengths.max()))), -1, dtype=np.int64)   # -1 is no token id
    for j, d in enumerate(docs):
        padded[j, :len(d)] = d
    out = np.empty((len(queries_text), len(docs)), dtype=np.float64)
    for i, text in enumerate(queries_text):
        query = tokenizer.encode(text, add_special_tokens=False)
        distance = levenshtein_to_many(query, padded, lengths)
        out[i] = -distance / np.maximum(np.maximum(lengths, len(query)), 1)
    return torch.from_numpy(out).float()


def embedding_scores(queries_text: Sequence[str], documents_text: Sequence[str], encoder,
                     batch_size: int = 32) -> Float[Tensor, "q n"]:
    """Cosine of the sentence embeddings of ``encoder`` (an :class:`imprint.models.lm.SentenceEncoder`,
    :func:`imprint.models.lm.load_sentence_encoder`: all-MiniLM-L6-v2 by default)."""
    from imprint.models.lm import embed_sentences

    queries_text = _require_texts("queries_text", queries_text)
    documents_text = _require_texts("documents_text", documents_text)
    require_int("batch_size", batch_size, minimum=1)
    if not (hasattr(encoder, "model") and hasattr(encoder, "tokenizer")):
        raise ValueError(f"encoder={type(encoder).__name__}: expected a SentenceEncoder "
                         "(imprint.models.lm.load_sentence_encoder)")
    return _cosine(embed_sentences(encoder, queries_text, batch_size),
                   embed_sentences(encoder, documents_text, batch_size))


# ---------------------------------------------------------------------------------------------------
# Hidden states of f_new


def _n_layers(model) -> int:
    from imprint.attribution.hooks import _modules

    return len(_modules(model)) - 1


@torch.no_grad()
def _pooled_states(model, rows: Sequence[Sequence[int]], pad_id: int, layer: int, pooling: str, dev,
                   batch_size: int) -> Tensor:
    from imprint.attribution.hooks import capture_hidden, position_weights

    chunks = []
    for lo in range(0, len(rows), batch_size):
        ids, mask = pad_rows(rows[lo:lo + batch_size], pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        with capture_hidden(model, [layer], weights=position_weights(mask, pooling)) as cap:
            model(input_ids=ids, attention_mask=mask)
        chunks.append(cap.states[layer].double().cpu())
    return torch.cat(chunks)


def hidden_state_scores(model, tokenizer, queries: Sequence[HopsQuery], documents: Sequence[HopsDocument | str],
                        layer: int, pooling: str = "last", device: str = "cpu", batch_size: int = 16, *,
                        max_length: int = 256) -> Float[Tensor, "q n"]:
    """Cosine between f_new's hidden states at ``layer`` (0: embeddings, ..., L: after the final norm, as
    :func:`imprint.attribution.hooks.capture_hidden` numbers them).

    A query is read at the last token of its prompt (the position whose next-token logits give the
    answer); a document at its last token (``pooling="last"``) or averaged over its tokens (``"mean"``),
    truncated to ``max_length`` tokens.
    """
    queries = _require_queries(queries)
    texts = _document_texts(documents)
    _require_model_tokenizer(model, tokenizer)
    n = _n_layers(model)
    require_int("layer", layer, minimum=0, maximum=n)
    require_choice("pooling", pooling, ["last", "mean"])
    require_int("batch_size", batch_size, minimum=1)
    require_int("max_length", max_length, minimum=1)
    dev = resolve_device(device)
    prompts = [tokenizer.encode(q.prompt, add_special_tokens=True) for q in queries]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"queries[{empty[0]}]: prompt encodes to no token")
    docs = _encode_documents(tokenizer, texts, max_length, minimum=1)
    model.to(dev)
    with _EvalMode(model):
        q = _pooled_states(model, prompts, tokenizer.pad_token_id, layer, "last", dev, batch_size)
        d = _pooled_states(model, docs, tokenizer.pad_token_id, layer, pooling, dev, batch_size)
    return _cosine(q, d)


# ---------------------------------------------------------------------------------------------------
# Projected gradients of f_new (TrackStar-style)


def _gradient_features(model, rows, n_prompt, pad_id: int, dev, batch_size: int, projection) -> Tensor:
    """Per-example loss gradients, projected (``projection``) or exact (``None``), concatenated over the
    weights in model order: ``(n, features)`` float64 on the CPU."""
    from imprint.gradients.per_example import per_example_gradients_factored, projected_gradients

    chunks = []
    for lo in range(0, len(rows), batch_size):
        prompts = None if n_prompt is None else n_prompt[lo:lo + batch_size]
        ids, _, labels = _lm_batch(rows[lo:lo + batch_size], prompts, pad_id)
        ids, labels = ids.to(dev), labels.to(dev)
        if projection is None:
            grads = per_example_gradients_factored(model, ids, labels)
            parts = [grads[name].flatten(1) for name in grads]
        else:
            (per_weight,) = projected_gradients(model, ids, labels, projection).values()
            parts = [per_weight[name] for name in projection.param_names]
        chunks.append(torch.cat([p.double().cpu() for p in parts], dim=1))
    return torch.cat(chunks)


def gradient_cosine_scores(model, tokenizer, queries: Sequence[HopsQuery], documents: Sequence[HopsDocument | str],
                           proj_dim: int | None = 1024, seed: int = 0, device: str = "cpu", batch_size: int = 8, *,
                           param_names: Sequence[str] | None = None, kind: str = "rademacher",
                           max_length: int = 256) -> Float[Tensor, "q n"]:
    """Cosine between unit-normalised, randomly projected per-example loss gradients (TrackStar without
    its optimizer-state correction).

    The gradients are those of every linear and embedding weight (``param_names`` to choose), projected
    weight by weight with chapter 03's factored Kronecker projections
    (:class:`imprint.gradients.per_example.GradientProjection`, seeded by ``seed``: ``proj_dim`` entries
    per weight, so the feature has ``proj_dim`` times the number of weights) and concatenated; the cosine
    then estimates that of the full gradients (Johnson-Lindenstrauss). ``proj_dim=None`` uses the exact
    gradients (small models only). Query: loss of the completion given the prompt; document: mean
    next-token loss, truncated to ``max_length`` tokens.
    """
    from imprint.gradients.per_example import GradientProjection
    from imprint.gradients.projection import KINDS

    queries = _require_queries(queries)
    texts = _document_texts(documents)
    _require_model_tokenizer(model, tokenizer)
    if proj_dim is not None:
        require_int("proj_dim", proj_dim, minimum=1)
    require_int("seed", seed, minimum=0)
    require_int("batch_size", batch_size, minimum=1)
    require_int("max_length", max_length, minimum=2)
    require_choice("kind", kind, KINDS)
    dev = resolve_device(device)
    q_rows, n_prompt = _encode_queries(tokenizer, queries)
    d_rows = _encode_documents(tokenizer, texts, max_length, minimum=2)
    model.to(dev)
    projection = None
    if proj_dim is not None:
        projection = GradientProjection(model, [proj_dim], seed, kind, param_names, dev)
    elif param_names is not None:
        raise ValueError("param_names is given with proj_dim=None: the exact path takes every weight matrix")
    with _EvalMode(model):
        q = _gradient_features(model, q_rows, n_prompt, tokenizer.pad_token_id, dev, batch_size, projection)
        d = _gradient_features(model, d_rows, None, tokenizer.pad_token_id, dev, batch_size, projection)
    return _cosine(q, d)


# ---------------------------------------------------------------------------------------------------
# EK-FAC influence (kronfluence)


def decoder_linear_modules(model) -> list[str]:
    """Names of the ``nn.Linear`` modules inside the decoder blocks (attention and MLP projections): the
    modules EK-FAC tracks by default (the output head's vocabulary-sized covariance is left out)."""
    from imprint.attribution.hooks import _modules

    _modules(model)   # refuses a model that is not a Hugging Face decoder
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_ids = {id(m) for m in base.get_decoder().layers}
    blocks = [name + "." for name, m in model.named_modules() if id(m) in block_ids]
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name.startswith(b) for b in blocks)]


def mlp_linear_modules(model) -> list[str]:
    """The MLP projections of :func:`decoder_linear_modules` (names containing ``mlp``): the modules
    influence studies of LLMs usually track."""
    return [name for name in decoder_linear_modules(model) if ".mlp." in name]


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows, n_prompt):
        self.rows, self.n_prompt = rows, n_prompt

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"ids": self.rows[i], "n_prompt": 0 if self.n_prompt is None else self.n_prompt[i]}


def _collate_for(pad_id: int):
    def collate(items):
        ids, mask, labels = _lm_batch([it["ids"] for it in items], [it["n_prompt"] for it in items], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


def _per_example_mean_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over each row's targets (``targets`` already shifted; -100: no loss)."""
    mask = targets != IGNORE_INDEX
    token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.clamp(min=0).flatten(),
                                              reduction="none").view(targets.shape)
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1)


def _lm_task(modules: list[str]):
    from kronfluence.task import Task

    class LMTask(Task):
        """Train loss: each document's mean next-token loss (labels sampled from the model for the true
        Fisher), summed over the batch; measurement: each query's loss on its completion, summed."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), dim=-1)
                    drawn = torch.multinomial(probs.flatten(0, 1), 1).view(targets.shape)
                targets = torch.where(targets != IGNORE_INDEX, drawn, targets)
            return _per_example_mean_loss(logits, targets).sum()

        def compute_measurement(self, batch, model) -> Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            return _per_example_mean_loss(logits, batch["labels"][:, 1:]).sum()

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


def ekfac_scores(model, tokenizer, queries: Sequence[HopsQuery], documents: Sequence[HopsDocument | str],
                 output_dir: str | Path, *, strategy: str = "ekfac", damping: float | None = None,
                 modules: Sequence[str] | None = None, device: str = "cpu", batch_size: int = 8,
                 query_batch_size: int = 8, seed: int = 0, empirical_fisher: bool = False,
                 max_length: int = 256, progress: bool = False,
                 query_low_rank: int | None = None) -> Float[Tensor, "q n"]:
    """Influence of every document on every query, ``g_q^T (G + damping)^-1 g_d``, with ``kronfluence``.

    ``G`` is the Fisher (labels sampled from the model; ``empirical_fisher=True``: the documents' own
    tokens) of the documents' loss, approximated per tracked module by ``strategy``: ``"ekfac"`` (the
    default), ``"kfac"``, ``"diagonal"``, or ``"identity"`` (no preconditioning: plain gradient dot
    products). ``damping`` None is kronfluence's heuristic, 0.1 times the mean eigenvalue. ``modules``
    are the tracked ``nn.Linear`` modules (default :func:`decoder_linear_modules`). The model is copied
    (kronfluence wraps its modules and freezes its weights); the caller's model is left as it was.

    Factors and scores are written under ``output_dir``, named by a digest of the model's weights, the
    documents and the settings (and, for the scores, the queries): a killed run restarted with the same
    arguments reuses the factors it had finished, and a different model or corpus never reads them.

    kronfluence passes over every document once per batch of ``query_batch_size`` queries; holding a
    large batch of preconditioned query gradients takes ``query_low_rank`` (kronfluence's
    ``query_gradient_low_rank``: each query's gradient of a module replaced by its rank-r SVD
    approximation; None: exact).
    """
    queries = _require_queries(queries)
    texts = _document_texts(documents)
    _require_model_tokenizer(model, tokenizer)
    if output_dir is None or str(output_dir) == "":
        raise ValueError("output_dir is empty: expected a folder for kronfluence's factors and scores")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir={str(output_dir)!r}: expected a directory, found a file")
    require_choice("strategy", strategy, STRATEGIES)
    if damping is not None:
        damping = require_float("damping", damping, minimum=0.0)
    require_int("batch_size", batch_size, minimum=1)
    require_int("query_batch_size", query_batch_size, minimum=1)
    require_int("seed", seed, minimum=0)
    require_int("max_length", max_length, minimum=2)
    if query_low_rank is not None:
        require_int("query_low_rank", query_low_rank, minimum=1)
    if not isinstance(empirical_fisher, bool):
        raise ValueError(f"empirical_fisher={empirical_fisher!r}: expected True or False")
    known = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = decoder_linear_modules(model) if modules is None else list(modules)
    if not modules or isinstance(modules, str):
        raise ValueError(f"modules={modules!r}: expected a non-empty list of nn.Linear module names")
    unknown = [m for m in modules if m not in known]
    if unknown:
        raise ValueError(f"modules: {unknown[:3]} are not nn.Linear modules of the model")
    dev = resolve_device(device)
    q_rows, n_prompt = _encode_queries(tokenizer, queries)
    d_rows = _encode_documents(tokenizer, texts, max_length, minimum=2)

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    factor_key = {"weights": _weights_digest(model), "documents": d_rows, "strategy": strategy, "modules": modules,
                  "seed": seed, "empirical_fisher": empirical_fisher}
    factors_name = f"{strategy}-{_digest(factor_key)}"
    score_key = {"factors": factors_name, "queries": q_rows, "n_prompt": n_prompt, "damping": damping,
                 "query_low_rank": query_low_rank}
    scores_name = f"scores-{_digest(score_key)}"

    task = _lm_task(modules)
    analysed = prepare_model(copy.deepcopy(model).to(dev), task)
    analyzer = Analyzer(analysis_name="ekfac", model=analysed, task=task, cpu=dev.type == "cpu",
                        log_level=logging.WARNING, disable_tqdm=not progress, output_dir=str(output_dir))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_collate_for(tokenizer.pad_token_id)))
    train, query = _ListDataset(d_rows, None), _ListDataset(q_rows, n_prompt)
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher)
    score_args = ScoreArguments(damping_factor=damping, query_gradient_low_rank=query_low_rank)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), warnings.catch_warnings():
        # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated by torch, in every phase
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
        torch.manual_seed(seed)
        analyzer.fit_all_factors(factors_name=factors_name, dataset=train, per_device_batch_size=batch_size,
                                 factor_args=factor_args)
        analyzer.compute_pairwise_scores(scores_name=scores_name, factors_name=factors_name, query_dataset=query,
                                         train_dataset=train, per_device_query_batch_size=query_batch_size,
                                         per_device_train_batch_size=batch_size, score_args=score_args)
    scores = analyzer.load_pairwise_scores(scores_name)["all_modules"]
    return scores.float().cpu()
