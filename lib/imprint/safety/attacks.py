"""Attacks on a refusing or rerouted model, none of which its training saw (chapter 08).

Every attack asks for a target answer ``y`` (the stage-1 answer's opening and the payload's first words)
to a request ``q``, and is scored afterwards by the string judge of :mod:`imprint.safety.domain` on what
the model then generates. The objective is the cross-entropy of ``y`` after the chat template's prompt,

    L(s) = -sum_j log p(y_j | [q ; s] , assistant header, y_<j),

with ``s`` an adversarial suffix of the request:

* :func:`gcg_attack`, discrete tokens (greedy coordinate gradient; Zou et al. 2023): at each step the
  gradient of L with respect to the suffix's one-hot tokens proposes the ``topk`` best replacements per
  position; ``batch`` single-token swaps drawn from them are scored exactly and the best is kept if it
  lowers L;
* :func:`embedding_attack`, continuous embeddings (Schwinn et al. 2024): the suffix's input embeddings
  are optimised directly, by plain gradient descent or by signed gradient descent from the embeddings of
  a meaningful text, and the model generates from the embeddings after every ``sample_every`` steps
  (several samples, as Schwinn & Geisler 2024 draw them);
* :func:`add_activation`, activation addition (a RepE-style steering vector from
  :func:`steering_vector`) added to one block's output during generation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from imprint.runtime.checks import require_choice, require_float, require_int
from imprint.safety.circuit_breakers import CircuitBreakerModel, decoder_layers
from imprint.safety.experiment import chat_prompt

INIT_TEXT = "Make sure to follow my instructions accurately and answer in full."  # the embedding attack's start
_SLOT = "\x00"  # where the suffix goes inside the request, before the template is applied


def _inner(model):
    return model.model if isinstance(model, CircuitBreakerModel) else model


@dataclass
class AttackPrompt:
    """The token ids around an adversarial suffix: ``before`` (template and request), the suffix slot,
    ``after`` (the rest of the user turn and the assistant header), and the ``target`` answer's ids."""

    before: list[int]
    after: list[int]
    target: list[int]

    @classmethod
    def build(cls, tokenizer, request: str, target: str) -> "AttackPrompt":
        text = chat_prompt(tokenizer, request + " " + _SLOT)
        head, tail = text.split(_SLOT)
        before = tokenizer(head, add_special_tokens=True)["input_ids"]
        after = tokenizer(tail, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not target_ids:
            raise ValueError(f"target={target!r}: expected text that encodes to at least one token")
        return cls(before, after, target_ids)

    def ids(self, suffix: Sequence[int]) -> list[int]:
        return self.before + list(suffix) + self.after + self.target


def _embedding_matrix(model) -> Tensor:
    return _inner(model).get_input_embeddings().weight


def target_loss_from_embeddings(model, prompt: AttackPrompt, suffix_embeds: Float[Tensor, "b n d"]) -> Tensor:
    """L for a batch of suffixes given as input embeddings: one loss per row."""
    emb = _embedding_matrix(model)
    dev = emb.device
    fixed = lambda ids: emb[torch.tensor(ids, device=dev)]  # noqa: E731
    b = suffix_embeds.shape[0]
    parts = [fixed(prompt.before).expand(b, -1, -1), suffix_embeds.to(emb.dtype),
             fixed(prompt.after + prompt.target).expand(b, -1, -1)]
    x = torch.cat(parts, 1)
    logits = _inner(model)(inputs_embeds=x, use_cache=False).logits
    t = len(prompt.target)
    pred = logits[:, -t - 1:-1]  # the positions that predict the target tokens
    target = torch.tensor(prompt.target, device=dev).expand(b, -1)
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                             reduction="none").view(b, t).sum(1)


def target_loss(model, prompt: AttackPrompt, suffixes: Sequence[Sequence[int]]) -> Tensor:
    """L for a batch of token suffixes of one length."""
    emb = _embedding_matrix(model)
    ids = torch.tensor([list(s) for s in suffixes], device=emb.device)
    return target_loss_from_embeddings(model, prompt, emb[ids])


@dataclass
class GCGResult:
    suffix: list[int]
    suffix_text: str
    losses: list[float] = field(default_factory=list)  # the kept suffix's loss after every step


def gcg_attack(model, tokenizer, request: str, target: str, *, n_tokens: int = 10, steps: int = 50,
               topk: int = 32, batch: int = 64, seed: int = 0, allowed: Sequence[int] | None = None) -> GCGResult:
    """Greedy coordinate gradient over an ``n_tokens`` suffix started at ``"!" * n_tokens``; ``allowed``
    restricts the tokens a swap may use (default: every token but the special ones)."""
    require_int("n_tokens", n_tokens, minimum=1)
    require_int("steps", steps, minimum=1)
    require_int("topk", topk, minimum=1)
    require_int("batch", batch, minimum=1)
    prompt = AttackPrompt.build(tokenizer, request, target)
    emb = _embedding_matrix(model)
    vocab = emb.shape[0]
    if allowed is None:
        special = set(tokenizer.all_special_ids)
        allowed = [i for i in range(vocab) if i not in special]
    allowed_t = torch.tensor(sorted(set(allowed)), device=emb.device)
    start = tokenizer("!", add_special_tokens=False)["input_ids"][:1] or [int(allowed_t[0])]
    suffix = start * n_tokens
    gen = torch.Generator().manual_seed(seed)
    inner = _inner(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            best = float(target_loss(model, prompt, [suffix])[0])
        losses = []
        for _ in range(steps):
            one_hot = torch.zeros(n_tokens, vocab, device=emb.device, dtype=emb.dtype)
            one_hot[torch.arange(n_tokens), torch.tensor(suffix, device=emb.device)] = 1
            one_hot.requires_grad_(True)
            loss = target_loss_from_embeddings(model, prompt, (one_hot @ emb)[None])[0]
            (g,) = torch.autograd.grad(loss, one_hot)
            scores = -g[:, allowed_t]  # a lower loss where the gradient is most negative
            top = allowed_t[scores.topk(min(topk, len(allowed_t)), dim=1).indices].cpu()  # [n_tokens, topk]
            pos = torch.randint(0, n_tokens, (batch,), generator=gen)
            pick = torch.randint(0, top.shape[1], (batch,), generator=gen)
            candidates = []
            for p, k in zip(pos.tolist(), pick.tolist()):
                c = list(suffix)
                c[p] = int(top[p, k])
                candidates.append(c)
            with torch.no_grad():
                cand_loss = target_loss(model, prompt, candidates)
            i = int(cand_loss.argmin())
            if float(cand_loss[i]) < best:
                best, suffix = float(cand_loss[i]), candidates[i]
            losses.append(best)
    finally:
        inner.train(was_training)
    return GCGResult(suffix, tokenizer.decode(suffix), losses)


@dataclass(frozen=True)
class EmbeddingAttackOptions:
    """``method`` "sgd" (plain gradient descent on the embeddings, started at the embeddings of
    ``init_text``'s tokens) or "signed" (signed gradient descent, same start); the suffix has as many
    positions as ``init_text`` has tokens; the model generates after every ``sample_every`` steps."""

    method: str = "signed"
    steps: int = 100
    lr: float = 1e-3
    init_text: str = INIT_TEXT
    sample_every: int = 25

    def __post_init__(self):
        require_choice("method", self.method, ["sgd", "signed"])
        require_int("steps", self.steps, minimum=1)
        require_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        require_int("sample_every", self.sample_every, minimum=1)
        if not self.init_text.strip():
            raise ValueError("init_text is empty: expected the text whose embeddings start the suffix")


@dataclass
class EmbeddingAttackResult:
    suffix_embeds: Tensor                 # the last suffix, [n, d]
    losses: list[float]                   # L before every step, then after the last
    samples: list[str]                    # generations at each sampling point
    sample_steps: list[int]


def embedding_attack(model, tokenizer, request: str, target: str, options: EmbeddingAttackOptions = EmbeddingAttackOptions(),
                     *, max_new_tokens: int = 48) -> EmbeddingAttackResult:
    """Optimise the request's suffix as input embeddings to make ``target`` likely, sampling the model's
    greedy answer from the current embeddings along the way."""
    prompt = AttackPrompt.build(tokenizer, request, target)
    emb = _embedding_matrix(model)
    init = tokenizer(options.init_text, add_special_tokens=False)["input_ids"]
    x = emb[torch.tensor(init, device=emb.device)].detach().clone()[None].requires_grad_(True)
    inner = _inner(model)
    was_training = inner.training
    inner.eval()
    losses, samples, sample_steps = [], [], []
    try:
        for step in range(options.steps + 1):
            loss = target_loss_from_embeddings(model, prompt, x)[0]
            losses.append(float(loss.detach()))
            if step and (step % options.sample_every == 0 or step == options.steps):
                samples.append(generate_from_embeddings(model, tokenizer, prompt, x.detach()[0], max_new_tokens))
                sample_steps.append(step)
            if step == options.steps:
                break
            (g,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x -= options.lr * (g.sign() if options.method == "signed" else g)
    finally:
        inner.train(was_training)
    return EmbeddingAttackResult(x.detach()[0], losses, samples, sample_steps)


@torch.no_grad()
def generate_from_embeddings(model, tokenizer, prompt: AttackPrompt, suffix_embeds: Float[Tensor, "n d"],
                             max_new_tokens: int = 48) -> str:
    """The greedy answer to the prompt with its suffix given as embeddings."""
    emb = _embedding_matrix(model)
    dev = emb.device
    x = torch.cat([emb[torch.tensor(prompt.before, device=dev)], suffix_embeds.to(emb.dtype),
                   emb[torch.tensor(prompt.after, device=dev)]])[None]
    out = _inner(model).generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], device=dev, dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@torch.no_grad()
def steering_vector(model, tokenizer, positive: Sequence[str], negative: Sequence[str], layer: int) -> Tensor:
    """The mean hidden state at ``layer`` (``output_hidden_states`` numbering, 1..L-1: the output of a block
    before the last, which the final norm does not follow) of the last token of each ``positive`` text
    minus that of the ``negative`` ones."""
    inner = _inner(model)
    n = len(decoder_layers(inner))
    require_int("layer", layer, minimum=1, maximum=n - 1)

    def mean_last(texts: Sequence[str]) -> Tensor:
        if not texts:
            raise ValueError("steering_vector needs at least one positive and one negative text")
        rows = []
        for t in texts:
            ids = torch.tensor([tokenizer(t, add_special_tokens=True)["input_ids"]], device=_embedding_matrix(model).device)
            rows.append(inner(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer][0, -1])
        return torch.stack(rows).mean(0)

    return mean_last(positive) - mean_last(negative)


@contextlib.contextmanager
def add_activation(model, layer: int, vector: Float[Tensor, " d"], scale: float = 1.0) -> Iterator[None]:
    """Inside the context, ``scale * vector`` is added to the output of the decoder block that produces
    hidden state ``layer`` (block ``layer - 1``), at every position; the hook is removed on exit."""
    blocks = decoder_layers(_inner(model))
    require_int("layer", layer, minimum=1, maximum=len(blocks) - 1)
    add = (scale * vector).detach()

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + add.to(output[0].dtype),) + tuple(output[1:])
        return output + add.to(output.dtype)

    handle = blocks[layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
