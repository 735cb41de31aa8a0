"""The models of the attribution-between-checkpoints chapter (07): function tokens, f_old and f_new.

Chapter 07 compares a base checkpoint f_old with f_new, the same model fine-tuned on the HOPS corpus.
:func:`add_function_tokens` adds the corpus's function tokens (``<GN>``, ``<FN>``, ...) to a Hugging Face
causal LM and its tokenizer as single tokens, resizing the embeddings (and an untied output head) with
transformers and initialising the new rows to the mean of the existing ones (or at random, seeded);
:func:`tiny_llama_for` is a from-scratch ``LlamaForCausalLM`` for the ci profile, over a tokenizer from
:func:`imprint.data.hops.train_hops_tokenizer`; :func:`finetune_causal_lm` is plain next-token
fine-tuning on the documents (full fine-tuning, or a peft LoRA config) with AdamW, a batch order fixed by
the seed, and safetensors checkpoints from which a killed run resumes to the same weights.
:func:`check_same_vocabulary` and :func:`check_query_tokens` refuse, by token, two checkpoints whose
tokenizers disagree and queries whose function token a tokenizer lacks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from imprint.data.hops import HopsQuery, single_token_ids
from imprint.runtime.checkpoint import Checkpointer
from imprint.runtime.checks import require_choice, require_float, require_int, require_positive
from imprint.runtime.devices import resolve_device

INITS = ("mean", "random")


# ---------------------------------------------------------------------------------------------------
# Function tokens and vocabularies


def _require_hf_causal_lm(model, name: str = "model") -> None:
    for attr in ("get_input_embeddings", "resize_token_embeddings"):
        if not hasattr(model, attr):
            raise ValueError(f"{name}={type(model).__name__}: expected a Hugging Face PreTrainedModel "
                             f"(it has no {attr})")


def _require_tokens(tokens: Sequence[str], name: str = "tokens") -> list[str]:
    if isinstance(tokens, (str, bytes)):
        raise ValueError(f"{name}={tokens!r}: expected a list of tokens, not one string")
    tokens = list(tokens)
    if not tokens:
        raise ValueError(f"{name} is empty: expected at least one function token")
    for t in tokens:
        if not isinstance(t, str) or not t or t != t.strip() or any(c.isspace() for c in t):
            raise ValueError(f"{name} entry {t!r}: expected a non-empty string without white space")
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise ValueError(f"{name} repeats {repeated}: expected each token once")
    return tokens


def add_function_tokens(model, tokenizer, tokens: Sequence[str], init: str = "mean",
                        seed: int = 0) -> Int[Tensor, " t"]:
    """Add ``tokens`` to ``tokenizer`` as single tokens and give ``model`` an embedding row for each.

    The embeddings are resized with ``model.resize_token_embeddings`` (an untied output head with them);
    the new rows of the input embedding, and of an untied head, are set to the mean of the rows of the
    tokens the tokenizer had (``init="mean"``), or drawn per dimension from a normal with those rows'
    mean and standard deviation (``init="random"``, seeded by ``seed``). A token the tokenizer already
    holds as an added, non-special token (a second call, or a tokenizer trained with the function
    tokens) is kept with its id and row. Modifies both in place; returns the ids of ``tokens``, in order.

    Refused before any change: a token that is one of the tokenizer's special tokens or an ordinary
    vocabulary entry (it already has a learned meaning), and a model with fewer embedding rows than the
    tokenizer has tokens.
    """
    from tokenizers import AddedToken

    _require_hf_causal_lm(model)
    require_choice("init", init, INITS)
    require_int("seed", seed)
    tokens = _require_tokens(tokens)
    emb = model.get_input_embeddings()
    n_rows, n_known = emb.weight.shape[0], len(tokenizer)
    if n_rows < n_known:
        raise ValueError(f"model has {n_rows} embedding rows but tokenizer has {n_known} tokens: expected the "
                         "model of this tokenizer")
    special = set(tokenizer.all_special_tokens)
    added = tokenizer.get_added_vocab()
    vocab = tokenizer.get_vocab()
    new = []
    for t in tokens:
        if t in special:
            raise ValueError(f"tokens entry {t!r} is the tokenizer's special token (id {vocab[t]}): expected "
                             "a new function token")
        if t in added:
            continue
        if t in vocab:
            raise ValueError(f"tokens entry {t!r} is already token id {vocab[t]} of the vocabulary, with a "
                             "learned meaning: expected a token the tokenizer does not have")
        new.append(t)
    if new:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
        new_ids = torch.tensor(tokenizer.convert_tokens_to_ids(new), dtype=torch.long)
        head = model.get_output_embeddings()
        tied = head is None or head.weight.data_ptr() == emb.weight.data_ptr()
        old_in = emb.weight.detach()[:n_known].float().clone()
        old_out = None if tied else head.weight.detach()[:n_known].float().clone()
        old_bias = None if tied or getattr(head, "bias", None) is None else head.bias.detach()[:n_known].clone()
        model.resize_token_embeddings(max(n_rows, len(tokenizer)), mean_resizing=False)
        generator = torch.Generator().manual_seed(seed)

        def rows(old: Tensor) -> Tensor:
            mean = old.mean(0, keepdim=True).expand(len(new), -1)
            if init == "mean":
                return mean
            return mean + old.std(0, keepdim=True) * torch.randn(len(new), old.shape[1], generator=generator)

        with torch.no_grad():
            emb = model.get_input_embeddings()
            emb.weight[new_ids] = rows(old_in).to(emb.weight)
            if not tied:
                head = model.get_output_embeddings()
                head.weight[new_ids] = rows(old_out).to(head.weight)
                if old_bias is not None:
                    head.bias[new_ids] = old_bias.mean().to(head.bias)
    return single_token_ids(tokenizer, tokens, name="tokens")


def check_same_vocabulary(tokenizer_old, tokenizer_new, tokens: Sequence[str | int]) -> Int[Tensor, " t"]:
    """The ids of ``tokens`` (function tokens and integer answers), refused unless each is one known
    token in both tokenizers with the same id: the attribution methods compare the two checkpoints'
    rows of each token, so a shifted id would compare unrelated rows without any error."""
    strings = [str(t) for t in tokens]
    if not strings:
        raise ValueError("tokens is empty: expected the function tokens and integer answers to compare")
    old = single_token_ids(tokenizer_old, strings, name="tokenizer_old: tokens")
    new = single_token_ids(tokenizer_new, strings, name="tokenizer_new: tokens")
    for s, a, b in zip(strings, old.tolist(), new.tolist()):
        if a != b:
            raise ValueError(f"token {s!r} has id {a} in tokenizer_old but id {b} in tokenizer_new: expected "
                             "identical token ids across the two checkpoints")
    return old


def check_query_tokens(tokenizer, queries: Sequence[HopsQuery]) -> Int[Tensor, " f"]:
    """The id of each distinct function token of ``queries`` (first-seen order), refused by name when the
    tokenizer lacks it as a single token or does not read it as one inside the query's prompt."""
    if not queries:
        raise ValueError("queries is empty: expected at least one HOPS query")
    funcs = list(dict.fromkeys(q.func for q in queries))
    ids = single_token_ids(tokenizer, funcs, name="queries: function token")
    by_func = dict(zip(funcs, ids.tolist()))
    checked = set()
    for q in queries:
        if q.func in checked:
            continue
        checked.add(q.func)
        encoded = tokenizer.encode(q.prompt, add_special_tokens=False)
        if by_func[q.func] not in encoded:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise ValueError(f"queries: prompt {q.prompt!r} encodes to {pieces}, without the single token "
                             f"{q.func!r}: expected the function token as one token inside the prompt")
    return ids


# ---------------------------------------------------------------------------------------------------
# A tiny from-scratch model


def tiny_llama_for(tokenizer, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, seed: int = 0, *,
               max_positions: int = 512):
    """A randomly initialised ``LlamaForCausalLM`` over ``tokenizer`` (tied embeddings, eager attention,
    MLP width ``4 * d_model``), in train mode with float32 weights; the ci profile's f_old."""
    from transformers import LlamaConfig, LlamaForCausalLM

    require_int("d_model", d_model, minimum=4)
    require_int("n_layers", n_layers, minimum=1)
    require_int("n_heads", n_heads, minimum=1)
    require_int("seed", seed)
    require_int("max_positions", max_positions, minimum=8)
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ValueError(f"d_model={d_model}, n_heads={n_heads}: expected d_model divisible by n_heads into an "
                         "even head width (rotary embeddings rotate pairs)")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: expected one (train_hops_tokenizer sets '<pad>')")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=4 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model


# ---------------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned model (a peft model with LoRA), the loss of every step from 1 to ``steps`` (those
    before a resume read back from the checkpoint), and the step the call started from (0: fresh)."""

    model: torch.nn.Module
    losses: list[float]
    start_step: int
    steps: int


def _batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The documents of ``step``: a stream of seeded permutations of ``range(n)``, one per epoch, read
    ``batch_size`` at a time, so that any step's batch follows from the seed alone."""
    out, perms = [], {}
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch = k // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][k % n]))
    return out


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id rows right-padded with ``pad_id`` into one batch, and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def finetune_causal_lm(model, tokenizer, texts: Sequence[str], steps: int, lr: float, batch_size: int,
                       device: str = "cpu", checkpoint_dir: str | Path | None = None, seed: int = 0,
                       lora=None, *, max_length: int = 256, weight_decay: float = 0.0,
                       warmup_steps: int = 0, max_grad_norm: float | None = 1.0, checkpoint_every: int = 50,
                       progress: bool = True, prompt_tokens: Sequence[int] | None = None,
                       autocast_bf16: bool = False) -> FinetuneResult:
    """Next-token fine-tuning of ``model`` on ``texts`` for ``steps`` AdamW steps, in place.

    Each step reads ``batch_size`` documents from seeded per-epoch permutations (the batch of a step
    follows from ``seed`` alone), truncated to ``max_length`` tokens and right-padded; the loss is
    transformers' mean cross-entropy over the non-pad tokens. The learning rate rises linearly over
    ``warmup_steps`` and is then constant; gradients are clipped to ``max_grad_norm`` (None: not).
    Without ``lora`` every parameter is trained (the anchor's full fine-tuning); with a
    ``peft.LoraConfig`` the model is wrapped by ``peft.get_peft_model`` and only what the config trains
    is (new token rows need ``trainable_token_indices`` or ``modules_to_save`` in the config to learn).

    ``prompt_tokens`` (one integer per text) makes the loss answer-only, as in supervised fine-tuning on
    instruction/answer pairs: the first ``prompt_tokens[i]`` tokens of text i (as this call tokenises it)
    are context, their labels -100, and the loss is the mean cross-entropy over the remaining non-pad
    tokens of the batch. Each count must leave at least one token to predict within ``max_length``.
    None: every token is predicted (the default).

    ``autocast_bf16`` runs the forward pass (and so the backward pass) under ``torch.autocast`` in
    bfloat16: the weights, their gradients and AdamW's state stay float32, the products and activations
    are bfloat16. Off (the default), the computation is in the weights' dtype.

    With ``checkpoint_dir`` the trainable weights, AdamW's state, the RNG state and the losses are saved
    as safetensors every ``checkpoint_every`` steps and at the end; a call with the same model, data and
    settings resumes from the newest valid checkpoint (a run killed after step s and restarted ends with
    the weights of an uninterrupted run; ``steps`` may grow between calls). A folder holding another run
    is refused, naming the setting that differs.
    """
    _require_hf_causal_lm(model)
    require_int("steps", steps, minimum=1)
    require_positive("lr", lr)
    require_int("batch_size", batch_size, minimum=1)
    require_int("seed", seed, minimum=0)
    require_int("max_length", max_length, minimum=2)
    require_float("weight_decay", weight_decay, minimum=0.0)
    require_int("warmup_steps", warmup_steps, minimum=0)
    if max_grad_norm is not None:
        require_positive("max_grad_norm", max_grad_norm)
    require_int("checkpoint_every", checkpoint_every, minimum=1)
    if not isinstance(autocast_bf16, bool):
        raise ValueError(f"autocast_bf16={autocast_bf16!r}: expected True or False")
    if isinstance(texts, str) or not texts:
        raise ValueError(f"texts={texts!r}: expected a non-empty list of documents")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"texts[{i}]={t!r}: expected a non-empty string")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: expected one (set tokenizer.pad_token first)")
    if lora is not None:
        from peft import LoraConfig

        if not isinstance(lora, LoraConfig):
            raise ValueError(f"lora={lora!r}: expected None (full fine-tuning) or a peft.LoraConfig")
    dev = resolve_device(device)
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    short = [i for i, e in enumerate(encoded) if len(e) < 2]
    if short:
        raise ValueError(f"texts[{short[0]}] encodes to fewer than 2 tokens: expected a document to predict")
    if prompt_tokens is not None:
        if isinstance(prompt_tokens, (str, bytes)) or len(prompt_tokens) != len(texts):
            raise ValueError(f"prompt_tokens has {len(prompt_tokens)} entries: expected one per text "
                             f"({len(texts)})")
        prompt_tokens = [require_int(f"prompt_tokens[{i}]", p, minimum=1) for i, p in enumerate(prompt_tokens)]
        for i, (p, e) in enumerate(zip(prompt_tokens, encoded)):
            if p >= len(e):
                raise ValueError(f"prompt_tokens[{i}]={p}: text {i} has {len(e)} tokens within "
                                 f"max_length={max_length}, expected fewer prompt tokens so that an answer "
                                 "token is left to predict")

    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
    model.to(dev)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    run = {"texts": digest, "n_texts": len(texts), "lr": float(lr), "batch_size": batch_size, "seed": seed,
           "max_length": max_length, "weight_decay": float(weight_decay), "warmup_steps": warmup_steps,
           "max_grad_norm": max_grad_norm, "lora": None if lora is None else repr(lora.to_dict()),
           "trainable": hashlib.sha256(json.dumps([[n, list(p.shape)] for n, p in named]).encode()).hexdigest(),
           "vocabulary": len(tokenizer)}
    if prompt_tokens is not None:  # only then, so that checkpoints of whole-text runs keep resuming
        run["prompt_tokens"] = hashlib.sha256(json.dumps(prompt_tokens).encode()).hexdigest()
    if autocast_bf16:  # likewise
        run["autocast_bf16"] = True
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    state = ckpt.latest(max_unit=steps) if ckpt else None
    losses: list[float] = []
    start = 0
    if state is not None:
        saved = state.meta.get("run", {})
        for key in list(run) + [k for k in saved if k not in run]:  # a setting either side lacks differs too
            value = run.get(key)
            if saved.get(key) != value:
                raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} holds a run with {key}={saved.get(key)!r}; "
                                 f"this call has {key}={value!r}: expected the same run, or another checkpoint_dir")
        with torch.no_grad():
            for n, p in named:
                p.copy_(state.tensors[f"param/{n}"])
        opt_state = optimizer.state_dict()
        opt_state["state"] = {i: {k: state.tensors[f"adam/{i}/{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
                              for i in range(len(params)) if f"adam/{i}/step" in state.tensors}
        optimizer.load_state_dict(opt_state)
        losses = [float(x) for x in state.meta["losses"]]
        start = state.unit

    from tqdm.auto import tqdm

    model.train()
    pending: list[Tensor] = []
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="fine-tuning", unit="step")
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if state is not None:
            torch.set_rng_state(state.tensors["rng/cpu"])
            if dev.type == "cuda" and "rng/cuda" in state.tensors:
                torch.cuda.set_rng_state(state.tensors["rng/cuda"], dev)
        else:
            torch.manual_seed(seed)
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            batch = _batch_indices(len(encoded), step, batch_size, seed)
            ids, mask = pad_rows([encoded[i] for i in batch], tokenizer.pad_token_id)
            labels = ids.masked_fill(mask == 0, -100)
            if prompt_tokens is not None:
                for row, i in enumerate(batch):
                    labels[row, :prompt_tokens[i]] = -100
            ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            pending.append(loss.detach())  # read back in groups: a read per step would stall the queue
            bar.update(1)
            done = step + 1
            if done == steps or len(pending) == 64 or (ckpt and done % checkpoint_every == 0):
                losses.extend(torch.stack(pending).tolist())
                pending.clear()
            if ckpt and (done == steps or done % checkpoint_every == 0):
                tensors = {f"param/{n}": p.detach() for n, p in named}
                for i, s in optimizer.state_dict()["state"].items():
                    for k in ("step", "exp_avg", "exp_avg_sq"):
                        tensors[f"adam/{i}/{k}"] = torch.as_tensor(s[k])
                tensors["rng/cpu"] = torch.get_rng_state()
                if dev.type == "cuda":
                    tensors["rng/cuda"] = torch.cuda.get_rng_state(dev)
                ckpt.save(done, tensors, {"run": run, "losses": losses})
    bar.close()
    model.eval()
    return FinetuneResult(model=model, losses=losses, start_step=start, steps=steps)
