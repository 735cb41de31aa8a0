"""One cell of the gradient-similarity chapter (03): fine-tune, take per-layer gradients, retrieve, score.

:func:`run_cell` is the experiment for one model: it fine-tunes SmolLM2 on the training examples with
the supervised fine-tuning loss (answer tokens only; :func:`finetune_on_examples`, full weights or a
merged LoRA adapter, or not at all for the model as shipped), measures each training example's loss at
the resulting weights, fills a resumable gradient store of the training examples against every variant
(:func:`gradient_scores`) and returns the per-layer score matrices. The rest of this module scores
them:

* :func:`retrieval_per_query` and :func:`retrieval_summary`: recall@k and reciprocal rank of each query's
  source (``imprint.attribution.metrics``), with bootstrap intervals; :func:`chance_levels` gives the
  chance value of each with its standard error over the same number of queries;
* :func:`split_half_choice`: the layer group chosen on one half of the queries, reported on the other;
* :func:`text_baselines` (BM25 and MiniLM on the answer, the instruction, or both),
  :func:`reciprocal_rank_fusion` and :func:`complementarity`;
* :func:`paraphrase_filter`: which paraphrases say what their original says (MiniLM cosine within
  bounds, a length ratio, no meta-commentary, not code alone);
* :func:`tokenizer_fingerprint` and :func:`check_variants_tokenizer`: a checkpoint whose tokenizer is
  not the one the variants were encoded with is refused before any gradient.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from imprint.attribution.metrics import rank_order, ranking_metrics, summarise
from imprint.data.text import ChatEncoding, InstructionExample, encode_chat_examples
from imprint.gradients.per_example import (GradientProjection, factor_sites, parameter_groups, sft_loss_per_example,
                                           weight_matrix_names)
from imprint.gradients.pipeline import EXACT_SHARED, exact_gram, exact_rows, features, projected_gram, projected_rows
from imprint.gradients.similarity import bm25_scores, pairwise_scores
from imprint.gradients.store import GradientStore, check_range, fill_partitions
from imprint.runtime.checks import require_choice, require_float, require_int

FINETUNE_MODES = ("full", "lora", "none")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT_FIELDS = ("answer", "instruction", "both")


# ---------------------------------------------------------------------------------------------------
# Fine-tuning on the training examples


@dataclass(frozen=True)
class FinetuneOptions:
    """How :func:`finetune_on_examples` trains: ``mode`` full, lora (rank ``lora_rank``, scale
    ``lora_alpha / lora_rank``, every attention and MLP projection) or none (the model as shipped)."""

    mode: str = "full"
    steps: int = 10
    lr: float = 1e-4
    batch_size: int = 8
    warmup_steps: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self):
        require_choice("finetune", self.mode, FINETUNE_MODES)
        require_int("finetune_steps", self.steps, minimum=1)
        require_float("finetune_lr", self.lr, minimum=0.0)
        if self.lr <= 0:
            raise ValueError(f"finetune_lr={self.lr!r}: expected a learning rate above 0")
        require_int("finetune_batch_size", self.batch_size, minimum=1)
        require_int("finetune_warmup_steps", self.warmup_steps, minimum=0)
        require_int("lora_rank", self.lora_rank, minimum=1)
        require_float("lora_alpha", self.lora_alpha, minimum=0.0)
        require_int("seed", self.seed, minimum=0)
        require_int("checkpoint_every", self.checkpoint_every, minimum=1)


def require_answers(examples: Sequence[InstructionExample], name: str = "data_path") -> None:
    """Refuse, naming ``name``, training examples without an answer: the loss is on answer tokens only."""
    if len(examples) == 0:
        raise ValueError(f"{name}: no training examples; expected instruction/answer pairs")
    for i, e in enumerate(examples):
        if not isinstance(e.answer, str) or not e.answer.strip():
            raise ValueError(f"{name}: training example {i} (id {e.id!r}) has no answer; the fine-tuning loss "
                             "is taken on answer tokens only, so every example needs one")
        if not isinstance(e.instruction, str) or not e.instruction.strip():
            raise ValueError(f"{name}: training example {i} (id {e.id!r}) has no instruction")


def sft_texts(tokenizer, examples: Sequence[InstructionExample], max_length: int) -> tuple[list[str], list[int]]:
    """Each example as its chat-template text and its number of prompt tokens, as ``finetune_causal_lm``
    tokenises them: the tokens after the prompt are those :func:`encode_chat_examples` labels."""
    require_answers(examples)
    enc = encode_chat_examples(tokenizer, examples, max_length)
    texts, prompts = [], []
    for i, e in enumerate(examples):
        n = int(enc.lengths[i])
        ids = enc.input_ids[i, :n].tolist()
        prompt = int((enc.labels[i, :n] == -100).sum())
        text = tokenizer.decode(ids, skip_special_tokens=False)
        again = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if again != ids:
            raise ValueError(f"example {i} (id {e.id!r}): its chat text does not tokenise back to the same tokens; "
                             "expected a tokenizer whose decode and encode round-trip")
        texts.append(text)
        prompts.append(prompt)
    return texts, prompts


def finetune_on_examples(model: nn.Module, tokenizer, examples: Sequence[InstructionExample], options: FinetuneOptions,
                         max_length: int, checkpoint_dir: str | Path | None, device: str = "cpu",
                         progress: bool = False) -> tuple[nn.Module, list[float]]:
    """A fine-tuned copy of ``model`` (``model`` itself untouched) and the loss of every step.

    Supervised fine-tuning: the loss is the cross-entropy over answer tokens only
    (``finetune_causal_lm(prompt_tokens=...)``). A LoRA adapter is merged into the weights afterwards, so
    that the per-example gradients are those of plain weight matrices either way. Checkpoints go to
    ``checkpoint_dir`` and a restarted call resumes from them. ``mode="none"``: ``model`` and no losses.
    """
    from imprint.attribution.models import finetune_causal_lm

    if options.mode == "none":
        return model, []
    texts, prompts = sft_texts(tokenizer, examples, max_length)
    lora = None
    if options.mode == "lora":
        from peft import LoraConfig

        lora = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS), bias="none")
    trained = copy.deepcopy(model)
    result = finetune_causal_lm(trained, tokenizer, texts, options.steps, options.lr, options.batch_size, device=device,
                                checkpoint_dir=checkpoint_dir, seed=options.seed, lora=lora, max_length=max_length,
                                warmup_steps=options.warmup_steps, checkpoint_every=options.checkpoint_every,
                                progress=progress, prompt_tokens=prompts)
    out = result.model.merge_and_unload() if lora is not None else result.model
    out.requires_grad_(False)
    out.eval()
    return out, result.losses


@torch.no_grad()
def example_losses(model: nn.Module, encoding: ChatEncoding, batch_size: int = 8) -> Float[Tensor, " n"]:
    """Each example's answer-token loss at ``model`` (float64, on the CPU)."""
    require_int("batch_size", batch_size, minimum=1)
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(encoding), batch_size):
        batch = encoding.select(lo, min(lo + batch_size, len(encoding)))
        logits = model(input_ids=batch.input_ids.to(device)).logits
        out.append(sft_loss_per_example(logits, batch.labels.to(device)).double().cpu())
    return torch.cat(out)


def finetune_digest(options: FinetuneOptions, train_fingerprint: str, model_name: str, max_length: int) -> str:
    """A short digest of everything that determines a fine-tuned model (its checkpoint folder's name)."""
    spec = {"options": asdict(options), "train": train_fingerprint, "model": model_name, "max_length": max_length}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# Tokenizers


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary, special tokens and chat template: equal means same encodings."""
    spec = {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(map(str, tokenizer.all_special_tokens)),
            "template": getattr(tokenizer, "chat_template", None) or ""}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def check_variants_tokenizer(tokenizer, record: str | Path, name: str = "model_path") -> str:
    """Refuse, naming ``name``, a tokenizer other than the one ``record`` (a JSON file next to the variant
    cache) says the variants were made with; the first call writes the record. Returns the fingerprint."""
    from imprint.runtime import atomic_write_json

    mine = tokenizer_fingerprint(tokenizer)
    path = Path(record)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("tokenizer") != mine:
            raise ValueError(f"{name}: this checkpoint's tokenizer ({mine[:12]}) is not the one the variants in "
                             f"{path.parent} were made with ({str(saved.get('tokenizer'))[:12]}, model "
                             f"{saved.get('model')!r}); expected the same tokenizer, or another work_dir")
    else:
        atomic_write_json(path, {"tokenizer": mine, "model": getattr(tokenizer, "name_or_path", "")})
    return mine


# ---------------------------------------------------------------------------------------------------
# Paraphrase quality

_META = re.compile(r"\b(paraphras\w*|rephras\w*|rewrit\w*|in other words|here is|here's|sure[,!]|certainly[,!]|"
                   r"as an ai|i hope this|let me know|the (?:text|question|original) (?:is|asks|says))\b", re.I)
_CODE = re.compile(r"```.*?```|`[^`]*`", re.S)


def is_meta_commentary(text: str) -> bool:
    """Whether a rewrite talks about the rewriting (or to the reader) instead of just saying the text."""
    return bool(_META.search(text))


def is_code_only(text: str, min_words: int = 3) -> bool:
    """Whether a rewrite has fewer than ``min_words`` words of prose outside code spans and code lines."""
    prose = _CODE.sub(" ", text)
    lines = [ln for ln in prose.splitlines() if not re.match(r"\s*(>>>|\.\.\.|def |class |import |[\w.]+\(.*\)\s*$)", ln)]
    return len(re.findall(r"[A-Za-z]{2,}", " ".join(lines))) < min_words


@dataclass(frozen=True)
class ParaphraseFilter:
    """Per example: kept or not, the first reason it was dropped ("" if kept), the MiniLM cosine of
    the (instruction, answer) texts and the answer's length ratio (paraphrase over original, characters)."""

    kept: Tensor
    reasons: list[str]
    cosine: Tensor
    length_ratio: Tensor
    bounds: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"kept": int(self.kept.sum()), "dropped": int((~self.kept).sum())}
        for r in ("cosine below", "cosine above", "length ratio", "meta-commentary", "code only"):
            out[r] = sum(x == r for x in self.reasons)
        return out


def paraphrase_filter(originals: Sequence[InstructionExample], paraphrased: Sequence[InstructionExample], encoder,
                      min_cosine: float, max_cosine: float, max_length_ratio: float) -> ParaphraseFilter:
    """Keep a paraphrase when its MiniLM cosine to the original lies in ``[min_cosine, max_cosine]``
    (a rewrite that says something else, or one that hardly rewrites), its answer's length is within a
    factor ``max_length_ratio`` of the original's, and neither its instruction nor its answer is
    meta-commentary or code alone (unless the original's was)."""
    from imprint.models.lm import embed_sentences

    require_float("paraphrase_min_cosine", min_cosine, minimum=-1.0, maximum=1.0)
    require_float("paraphrase_max_cosine", max_cosine, minimum=-1.0, maximum=1.0)
    if min_cosine > max_cosine:
        raise ValueError(f"paraphrase_min_cosine={min_cosine} > paraphrase_max_cosine={max_cosine}: expected "
                         "lower bound <= upper bound")
    require_float("paraphrase_max_length_ratio", max_length_ratio, minimum=1.0)
    if len(originals) != len(paraphrased):
        raise ValueError(f"paraphrased has {len(paraphrased)} examples: expected one per original ({len(originals)})")
    a = embed_sentences(encoder, [f"{e.instruction}\n{e.answer}" for e in originals])
    b = embed_sentences(encoder, [f"{e.instruction}\n{e.answer}" for e in paraphrased])
    cosine = (a * b).sum(1).double()
    ratio = torch.tensor([max(len(p.answer), 1) / max(len(o.answer), 1) for o, p in zip(originals, paraphrased)],
                         dtype=torch.float64)
    reasons = []
    for i, (o, p) in enumerate(zip(originals, paraphrased)):
        if cosine[i] < min_cosine:
            reasons.append("cosine below")
        elif cosine[i] > max_cosine:
            reasons.append("cosine above")
        elif not 1 / max_length_ratio <= ratio[i] <= max_length_ratio:
            reasons.append("length ratio")
        elif any(is_meta_commentary(x) and not is_meta_commentary(y)
                 for x, y in [(p.instruction, o.instruction), (p.answer, o.answer)]):
            reasons.append("meta-commentary")
        elif is_code_only(p.answer) and not is_code_only(o.answer):
            reasons.append("code only")
        else:
            reasons.append("")
    kept = torch.tensor([r == "" for r in reasons])
    return ParaphraseFilter(kept, reasons, cosine, ratio,
                            {"min_cosine": min_cosine, "max_cosine": max_cosine, "max_length_ratio": max_length_ratio})


# ---------------------------------------------------------------------------------------------------
# Gradients of one model


@dataclass
class GradientScores:
    """Score matrices of one model, ``scores[(setting, representation, computation)][group]`` (variants x
    training examples, on the CPU), the training examples' whole-model gradient norms per setting, the
    stored rows analysed and the store's compute seconds."""

    scores: dict
    key_norms: dict
    rows: Tensor
    complete: bool
    seconds: float | None
    representations: list[str]
    projection: GradientProjection
    names: list[str]
    groups: dict


def gradient_scores(model: nn.Module, train_enc: ChatEncoding, variant_encs: Mapping[str, ChatEncoding],
                    store_root: str | Path, spec: Mapping, *, projection_dims: Sequence[int], projection_kind: str,
                    seed: int, exact: bool, partition_size: int, partition_start: int = 0, partition_end: int = -1,
                    batch_size: int = 8, gram_max_elements: int = 1 << 28, gram_query_block: int = 8,
                    gram_key_elements: int = -1, device: torch.device | str = "cpu",
                    headline: str | None = None) -> GradientScores:
    """Fill (or resume) the gradient store of ``model`` for the training examples against every variant,
    then group per layer and score: exact inner products when ``exact`` (with projected features at each
    dimension from the same pass), else projected ones only. ``spec`` names the configuration; a changed
    one gets a new folder under ``store_root``."""
    dev = torch.device(device)
    n = len(train_enc)
    end = n if partition_end == -1 else partition_end
    check_range(partition_start, end, n, "partition range (partition_start, partition_end)")
    names = weight_matrix_names(model)
    sites = factor_sites(model, names)
    projection = GradientProjection(model, list(projection_dims), seed, projection_kind, names, dev)
    layer_groups = parameter_groups(names, "layer")
    groups = {**layer_groups, "model": names}
    settings = list(variant_encs)
    spec = {**spec, "projection_dims": list(projection_dims), "projection_kind": projection_kind, "seed": seed,
            "rng_device": dev.type, "weights": len(names), "settings": settings}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(store_root) / f"{'exact' if exact else 'projected'}-{digest}"
    grams: dict[str, dict] = {s: {} for s in settings}
    if exact:
        store = GradientStore(root, n, spec, shared=EXACT_SHARED)
        fill_partitions(store, partition_start, end, partition_size,
                        lambda s, e: exact_rows(model, train_enc, variant_encs, s, e, sites, batch_size, projection,
                                                gram_max_elements, query_block=gram_query_block,
                                                key_elements=None if gram_key_elements == -1 else gram_key_elements),
                        desc="exact + projected")
        rows = store.stored_rows()
        stored = store.load(partial=True)
        seconds = store.seconds()
        for s in settings:
            gram = exact_gram(stored, s, names)
            gram = type(gram)({w: d[rows].to(dev) for w, d in gram.dots.items()},
                              {w: q[rows].to(dev) for w, q in gram.query_sqnorms.items()},
                              {w: v.to(dev) for w, v in gram.key_sqnorms.items()})
            grams[s]["exact"] = gram.grouped(groups)
            for k in projection_dims:
                train_f = {w: v.to(dev) for w, v in features(stored, "train/", k, names).items()}
                query_f = {w: v.to(dev) for w, v in features(stored, f"query/{s}/", k, names).items()}
                grams[s][f"k{k}"] = projected_gram(train_f, query_f).grouped(groups)
    else:
        stores = {key: GradientStore(root / key, n, {**spec, "set": key}) for key in ["train", *settings]}
        for key, enc in [("train", train_enc), *variant_encs.items()]:
            fill_partitions(stores[key], partition_start, end, partition_size,
                            lambda s, e, enc=enc: projected_rows(model, enc, s, e, projection, batch_size),
                            desc=f"projected {key}")
        rows = stores["train"].stored_rows()
        for key in settings:
            rows = rows[torch.isin(rows, stores[key].stored_rows())]
        loaded = {key: st.load(partial=True) for key, st in stores.items()}
        each = [st.seconds() for st in stores.values()]
        seconds = None if None in each else sum(each)
        for s in settings:
            for k in projection_dims:
                def take(key):
                    return torch.searchsorted(stores[key].stored_rows(), rows)
                train_f = {w: v[take("train")].to(dev) for w, v in features(loaded["train"], "", k, names).items()}
                query_f = {w: v[take(s)].to(dev) for w, v in features(loaded[s], "", k, names).items()}
                grams[s][f"k{k}"] = projected_gram(train_f, query_f).grouped(groups)
    representations = (["exact"] if exact else []) + [f"k{k}" for k in projection_dims]
    headline = headline or representations[0]
    scores, key_norms = {}, {}
    for s in settings:
        for rep, gram in grams[s].items():
            if rep == headline:
                key_norms[s] = gram.key_sqnorms["model"].sqrt().cpu()
            for comp in ("cosine", "dot"):
                scores[(s, rep, comp)] = {g: m.cpu() for g, m in gram.scores(comp).items()}
    return GradientScores(scores, key_norms, rows, len(rows) == n, seconds, representations, projection, names,
                          groups)


@dataclass
class CellResult:
    """One model's cell: the model the gradients were taken at, its fine-tuning losses (empty for the
    shipped model), each training example's answer loss at that model, and its gradient scores."""

    mode: str
    model: nn.Module
    step_losses: list[float]
    train_losses: Tensor
    gradients: GradientScores
    seconds_finetune: float
    seconds_gradients: float


def run_cell(model: nn.Module, tokenizer, train_examples: Sequence[InstructionExample], train_enc: ChatEncoding,
             variant_encs, options: FinetuneOptions, work: str | Path, spec: Mapping, *,
             max_length: int, device: str = "cpu", keep_checkpoints: bool = True, **gradient_kwargs) -> CellResult:
    """The experiment for one model: fine-tune (``options.mode``; checkpoints under ``work/finetune``),
    measure each training example's loss at the result, and score every variant against every training
    example by per-layer gradient similarity at the result (store under ``work/store``). ``variant_encs``
    is a mapping of encodings, or a function of the trained model that makes them (variants the trained
    model generates itself). ``keep_checkpoints=False`` trains without writing checkpoints (a full
    fine-tuning checkpoint of SmolLM2 with AdamW's state is 1.6 GB)."""
    digest = finetune_digest(options, spec.get("train", ""), spec.get("model", ""), max_length)
    t0 = time.time()
    ckpt = Path(work) / "finetune" / f"{options.mode}-{digest}" if options.mode != "none" and keep_checkpoints else None
    trained, step_losses = finetune_on_examples(model, tokenizer, train_examples, options, max_length, ckpt, str(device))
    seconds_finetune = time.time() - t0
    losses = example_losses(trained, train_enc, gradient_kwargs.get("batch_size", 8))
    if callable(variant_encs):
        variant_encs = variant_encs(trained)
    t0 = time.time()
    grads = gradient_scores(trained, train_enc, variant_encs, Path(work) / "store",
                            {**spec, "finetune": options.mode, "finetune_digest": digest}, device=device,
                            **gradient_kwargs)
    return CellResult(options.mode, trained, step_losses, losses, grads, seconds_finetune, time.time() - t0)


# ---------------------------------------------------------------------------------------------------
# Retrieval scores, intervals and chance


def retrieval_per_query(scores: Float[Tensor, "q n"], targets: Tensor | None = None,
                        ks: Sequence[int] = (1, 10)) -> dict[str, Tensor]:
    """Per query, ``recall@k`` (the source in the top k) and ``rr`` (1 / its rank; ties by index), with
    ``targets[i]`` the source of query i (default: query i is example i's variant)."""
    q, n = scores.shape
    targets = torch.arange(q) if targets is None else torch.as_tensor(targets)
    relevant = torch.zeros(q, n, dtype=torch.bool)
    relevant[torch.arange(q), targets] = True
    ks = [min(k, n) for k in ks]
    m = ranking_metrics(scores.double().cpu(), relevant, ks=ks)
    return {**{f"recall@{k}": m[f"recall@{min(k, n)}"] for k in (1, 10)}, "rr": m["rr"]}


def retrieval_summary(per_query: Mapping[str, Tensor], n_boot: int, seed: int,
                      clusters: Tensor | None = None) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "lo", "hi", "n"}}``: means with 95% percentile-bootstrap intervals
    (:func:`imprint.attribution.metrics.summarise`; whole clusters resampled when given)."""
    return summarise(dict(per_query), n_boot=n_boot, seed=seed, clusters=clusters)["overall"]


def chance_levels(n_candidates: int, n_queries: int, ks: Sequence[int] = (1, 10)) -> dict[str, dict[str, float]]:
    """Mean and standard error (over ``n_queries`` independent queries) of each metric when the source's
    rank is uniform on ``1..n_candidates``: rr has mean H_n / n and variance (sum 1/r^2) / n - mean^2;
    recall@k is a Bernoulli of p = k / n."""
    require_int("n_candidates", n_candidates, minimum=1)
    require_int("n_queries", n_queries, minimum=1)
    r = np.arange(1, n_candidates + 1, dtype=np.float64)
    mean_rr = float(np.mean(1 / r))
    var_rr = float(np.mean(1 / r**2) - mean_rr**2)
    out = {"rr": {"mean": mean_rr, "se": float(np.sqrt(var_rr / n_queries))}}
    for k in ks:
        p = min(k, n_candidates) / n_candidates
        out[f"recall@{k}"] = {"mean": p, "se": float(np.sqrt(p * (1 - p) / n_queries))}
    return out


def split_half_choice(per_group_rr: Mapping[str, Tensor], seed: int) -> dict:
    """Choose the group with the highest mean reciprocal rank on a seeded random half of the queries
    (``select``) and report its reciprocal ranks on the other half (``report``), so that the choice does not
    inflate the number reported. Returns ``{"group", "select_mrr", "report_rr", "report_index"}``."""
    if not per_group_rr:
        raise ValueError("per_group_rr is empty: expected one per-query rr tensor per group")
    q = len(next(iter(per_group_rr.values())))
    if q < 2:
        raise ValueError(f"{q} queries: expected at least two to split")
    perm = torch.randperm(q, generator=torch.Generator().manual_seed(seed))
    select, report = perm[: q // 2], perm[q // 2:]
    means = {g: float(v[select].mean()) for g, v in per_group_rr.items()}
    best = max(means, key=means.get)
    return {"group": best, "select_mrr": means[best], "report_rr": per_group_rr[best][report],
            "report_index": report}


# ---------------------------------------------------------------------------------------------------
# Text baselines, fusion and complementarity


def _field(e: InstructionExample, which: str) -> str:
    return {"answer": e.answer, "instruction": e.instruction, "both": f"{e.instruction}\n{e.answer}"}[which]


def text_baselines(train: Sequence[InstructionExample], queries: Sequence[InstructionExample], encoder,
                   fields: Sequence[str] = TEXT_FIELDS) -> dict[str, Tensor]:
    """``{"{bm25|minilm}/{field}": scores (queries x training examples)}`` on the answer only (what the
    gradient of the answer loss sees), the instruction only, or both joined."""
    from imprint.models.lm import embed_sentences

    out = {}
    for which in fields:
        require_choice("field", which, TEXT_FIELDS)
        docs = [_field(e, which) for e in train]
        qs = [_field(e, which) for e in queries]
        out[f"bm25/{which}"] = bm25_scores(qs, docs).double()
        out[f"minilm/{which}"] = pairwise_scores(embed_sentences(encoder, qs), embed_sentences(encoder, docs)).double()
    return out


def reciprocal_rank_fusion(score_matrices: Sequence[Tensor], k: float | int = 60.0) -> Float[Tensor, "q n"]:
    """Cormack et al.'s reciprocal-rank fusion: sum over rankings of 1 / (k + rank) (rank from 1, ties by
    index), per query and candidate."""
    if not score_matrices:
        raise ValueError("score_matrices is empty: expected at least one ranking to fuse")
    require_float("k", k, minimum=0.0)
    fused = torch.zeros(score_matrices[0].shape, dtype=torch.float64)
    for s in score_matrices:
        order = rank_order(s.double().cpu())
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, s.shape[1] + 1).expand_as(order).contiguous())
        fused += 1.0 / (k + ranks.double())
    return fused


def complementarity(rr_a: Tensor, rr_b: Tensor) -> dict[str, int]:
    """Queries whose source method a ranks first and b does not, the reverse, both and neither."""
    a, b = rr_a == 1, rr_b == 1
    return {"a_only": int((a & ~b).sum()), "b_only": int((b & ~a).sum()), "both": int((a & b).sum()),
            "neither": int((~a & ~b).sum())}


def spearman_interval(x: Tensor, y: Tensor, n_boot: int, seed: int, level: float = 0.95) -> dict[str, float]:
    """Spearman's rank correlation of x and y with a percentile-bootstrap interval over pairs."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"x has {len(x)} and y {len(y)} values: expected as many, at least three")
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boot.append(spearmanr(x[i], y[i]).statistic)
    lo, hi = (np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot else (np.nan, np.nan))
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n": len(x)}
