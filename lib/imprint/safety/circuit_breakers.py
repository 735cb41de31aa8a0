"""Representation rerouting ("circuit breakers", Zou et al. 2024, arXiv 2406.04313) on a Hugging Face causal LM.

A LoRA adapter is trained so that, on harmful conversations (the *circuit-breaker* set), the hidden states
at a few target layers stop pointing where the frozen model's do (their cosine with the frozen states is
pushed to zero or below), while on benign conversations (the *retain* set) the hidden states of every layer
stay where they were (an L2 distance is kept small). The frozen model is the same weights with the adapter
switched off (``peft``'s ``disable_adapter()``), so no second copy is held.

Layers are numbered as ``output_hidden_states`` numbers them: 0 the embedding output, ℓ (0 < ℓ < L) the
output of decoder block ℓ - 1, which is the input of block ℓ, and L the final norm of block L - 1's output. A target layer ℓ therefore needs blocks 0..ℓ - 1 only; as in the reference code
(which sets ``num_hidden_layers = max(target_layers) + 1`` before loading, ``drop_layers_after``), training
keeps blocks 0..max(target_layers) and drops the rest, so the retain loss runs over the hidden states of
that truncated model, the last of them being the final norm of block max(target_layers)'s output.

The losses and the coefficient schedule follow ``compute_loss`` of the authors' training script
(``src/lorra_circuit_breaker.py``); each function's docstring says what it does and where it departs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from imprint.runtime.checks import require_float, require_int, require_range

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------
# Options


def _int_tuple(name: str, value, minimum: int = 0) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name}={value!r}: expected a sequence of integers")
    items = tuple(require_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(value))
    if not items:
        raise ValueError(f"{name}={value!r}: expected at least one layer")
    if len(set(items)) != len(items):
        raise ValueError(f"{name}={value!r}: expected distinct layers")
    return tuple(sorted(items))


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Options of a circuit-breaker run. The defaults are the authors' Llama-3-8B-Instruct run
    (``scripts/lorra_circuit_breaker_llama3_8b.sh``): target layers 10 and 20, LoRA rank 16 and alpha 16
    with dropout 0.05 on every attention and MLP projection of layers 0..20, loss coefficient α = 10,
    150 steps of batch 16 at a constant learning rate 1e-4 (AdamW, no weight decay).

    ``target_layers``: the hidden states (``output_hidden_states`` numbering, 1..L-1) whose directions
    are rerouted on the circuit-breaker set; ``layers_to_transform``: the decoder blocks that carry LoRA
    (``None``: blocks 0..max(target_layers), the reference's ``transform_layers="-1"``); ``max_length``:
    tokens per row (the reference pads retain rows to 1024 and circuit-breaker rows to 512 of request
    plus 512 of response). Sequences are stored as sorted tuples.

    The embedding-space adversary (beyond the paper; off at ``adversarial_steps = 0``, the plain method):
    before each step's losses, ``adversarial_steps`` signed-gradient steps of size ``adversarial_lr`` move a
    perturbation δ of the circuit-breaker rows' input embeddings at their request positions so as to lower
    the adapted model's cross-entropy on their response tokens (:func:`embedding_adversary`). δ stays in the
    L∞ ball of radius ``adversarial_radius``, in the units of the embedding matrix: a signed step moves every
    coordinate by exactly its size, so the evaluation's signed embedding attack, after k steps of size η,
    lies in the L∞ ball of radius k·η, and a radius of ``embed_steps × embed_lr_signed`` covers its whole
    reach in the same units."""

    target_layers: Sequence[int] = (10, 20)
    lora_rank: int = 16
    lora_alpha: float | int = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: Sequence[str] = LLAMA_PROJECTIONS
    layers_to_transform: Sequence[int] | None = None
    alpha: float = 10.0
    max_steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4
    max_length: int = 1024
    adversarial_steps: int = 0
    adversarial_lr: float = 1e-3
    adversarial_radius: float = 0.1

    def __post_init__(self):
        target = _int_tuple("target_layers", self.target_layers, minimum=1)
        object.__setattr__(self, "target_layers", target)
        require_int("lora_rank", self.lora_rank, minimum=1)
        require_float("lora_alpha", self.lora_alpha, minimum=0.0, strict_minimum=True)
        require_float("lora_dropout", self.lora_dropout, minimum=0.0)
        if not self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: expected a probability in [0, 1)")
        modules = self.lora_target_modules
        if isinstance(modules, str) or not isinstance(modules, Sequence) or not modules or not all(
                isinstance(m, str) and m for m in modules):
            raise ValueError(f"lora_target_modules={modules!r}: expected a non-empty sequence of module names")
        object.__setattr__(self, "lora_target_modules", tuple(modules))
        if self.layers_to_transform is not None:
            layers = _int_tuple("layers_to_transform", self.layers_to_transform, minimum=0)
            if layers[-1] > target[-1]:
                raise ValueError(f"layers_to_transform={self.layers_to_transform!r}: expected blocks <= "
                                 f"max(target_layers)={target[-1]}; later blocks are dropped during training "
                                 "and their adapter would get no gradient")
            object.__setattr__(self, "layers_to_transform", layers)
        require_float("alpha", self.alpha, minimum=0.0, strict_minimum=True)
        require_int("max_steps", self.max_steps, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        require_int("max_length", self.max_length, minimum=2)
        require_int("adversarial_steps", self.adversarial_steps, minimum=0)
        require_float("adversarial_lr", self.adversarial_lr, minimum=0.0, strict_minimum=True)
        require_float("adversarial_radius", self.adversarial_radius, minimum=0.0, strict_minimum=True)
        for name in ("adversarial_lr", "adversarial_radius"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a finite number")

    @property
    def transformed_layers(self) -> tuple[int, ...]:
        """The blocks that carry LoRA: ``layers_to_transform`` or 0..max(target_layers)."""
        if self.layers_to_transform is not None:
            return self.layers_to_transform
        return tuple(range(self.target_layers[-1] + 1))

    @property
    def kept_blocks(self) -> int:
        """Decoder blocks run during training: 0..max(target_layers), as the reference's truncation."""
        return self.target_layers[-1] + 1

    def check(self, model) -> None:
        """Refuse a model these options do not fit: a target layer or LoRA block beyond its depth, or LoRA
        target modules it does not have."""
        n_blocks = len(decoder_layers(model))
        if self.target_layers[-1] > n_blocks - 1:
            raise ValueError(f"target_layers={self.target_layers!r}: the model has {n_blocks} decoder blocks, "
                             f"so hidden states 1..{n_blocks - 1} can be targets (training keeps blocks "
                             "0..max(target_layers), which must exist)")
        if self.transformed_layers[-1] > n_blocks - 1:
            raise ValueError(f"layers_to_transform={self.layers_to_transform!r}: the model has {n_blocks} "
                             f"decoder blocks (0..{n_blocks - 1})")
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in self.lora_target_modules if m not in names]
        if missing:
            raise ValueError(f"lora_target_modules={self.lora_target_modules!r}: the model has no modules "
                             f"named {missing}")


# ---------------------------------------------------------------------------------------------------
# Records and batches


def check_records(records, name: str) -> list[Mapping]:
    """Refuse an empty set of conversations or one whose records lack a full response.

    Each record is a mapping with a ``"prompt"`` (may be empty: the reference also trains on responses
    without their request) and a non-empty ``"response"`` string. Rerouting acts on the representations
    of the harmful *response* tokens and retention on those of benign responses, so a set of prompts
    alone cannot train anything."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise ValueError(f"{name}={type(records).__name__}: expected a list of records "
                         "{'prompt': str, 'response': str}")
    if len(records) == 0:
        raise ValueError(f"{name} is empty: expected at least one record {{'prompt': str, 'response': str}}")
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{name}[{i}]={record!r}: expected a mapping with a 'prompt' string")
        response = record.get("response")
        if not isinstance(response, str) or not response.strip():
            raise ValueError(f"{name}[{i}] has a prompt but no response (got {response!r}): circuit-breaker "
                             "training reroutes and retains the representations of full responses, so "
                             "every record needs its response, not the prompt alone")
    return list(records)


def check_batch(batch, name: str) -> tuple[Tensor, Tensor]:
    """``batch["input_ids"]`` and ``batch["attention_mask"]``, both (batch, seq), the mask 0/1 with at
    least one token; refused otherwise, naming ``name``."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "attention_mask" not in batch:
        raise ValueError(f"{name}: expected a mapping with 'input_ids' and 'attention_mask'")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"{name}['input_ids']: expected an integer tensor (batch, seq)")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (input_ids of shape {tuple(ids.shape)}): expected at least one "
                         "row of at least one token")
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise ValueError(f"{name}['attention_mask']: expected a tensor of the shape of input_ids "
                         f"{tuple(ids.shape)}")
    _check_mask(f"{name}['attention_mask']", mask)
    return ids, mask


def _check_mask(name: str, mask: Tensor) -> None:
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name}: expected 0/1 (or boolean) values")
    if not bool(mask.any()):
        raise ValueError(f"{name} masks every position: expected at least one token")


# ---------------------------------------------------------------------------------------------------
# Losses


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32 (the reference computes its norms with ``dtype=torch.float`` under bf16)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _layer_mask(mask: Tensor, h: Tensor) -> Tensor:
    """A (batch, seq) mask as a boolean (1, batch, seq, 1), so it multiplies every layer and every hidden
    unit of one position, never the hidden dimension or the sequence."""
    if mask.shape != h.shape[1:3]:
        raise ValueError(f"mask of shape {tuple(mask.shape)}: expected (batch, seq) = {tuple(h.shape[1:3])}")
    return mask.bool()[None, :, :, None]


def _check_pair(h_adapted: Tensor, h_frozen: Tensor) -> None:
    if h_adapted.shape != h_frozen.shape:
        raise ValueError(f"h_adapted of shape {tuple(h_adapted.shape)}, h_frozen of shape "
                         f"{tuple(h_frozen.shape)}: expected the same (layers, batch, seq, d)")


def retain_loss(h_adapted: Float[Tensor, "l b s d"], h_frozen: Float[Tensor, "l b s d"],
                mask: Shaped[Tensor, "b s"]) -> Float[Tensor, ""]:
    """The mean L2 distance between adapted and frozen hidden states: the norm over the hidden dimension
    of their difference at every (layer, row, position), padded positions (mask 0) counted as 0, averaged
    over **all** layers × rows × positions, padding included.

    This is the reference's ``torch.norm(lora - orig, dim=-1).nanmean()`` after both stacks were multiplied
    by the (layers, batch, seq, 1) mask: a padded position adds 0 to the sum and 1 to the count (so padding
    dilutes the loss, as there). Departure: padded positions are zeroed with ``where`` rather than a
    product, so an ``inf`` or NaN there stays out (the product would give NaN, which ``nanmean`` would then
    drop from the count)."""
    _check_pair(h_adapted, h_frozen)
    _check_mask("mask", mask)
    keep = _layer_mask(mask, h_adapted)
    dtype = _work_dtype(h_adapted, h_frozen)
    diff = torch.where(keep, h_adapted.to(dtype) - h_frozen.to(dtype), 0.0)
    return torch.linalg.vector_norm(diff, dim=-1).mean()


def masked_cosine(h_adapted: Float[Tensor, "l b s d"], h_frozen: Float[Tensor, "l b s d"],
                  mask: Shaped[Tensor, "b s"]) -> Float[Tensor, "l b s"]:
    """Cosine over the hidden dimension at every (layer, row, position), 0 at padded positions (a zero
    vector counts as cosine 0 rather than the reference's 0/0)."""
    _check_pair(h_adapted, h_frozen)
    keep = _layer_mask(mask, h_adapted)
    dtype = _work_dtype(h_adapted, h_frozen)
    a = torch.where(keep, h_adapted.to(dtype), 0.0)
    f = torch.where(keep, h_frozen.to(dtype), 0.0)
    tiny = torch.finfo(dtype).tiny
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(tiny)
    f = f / torch.linalg.vector_norm(f, dim=-1, keepdim=True).clamp_min(tiny)
    return (a * f).sum(dim=-1)


def circuit_breaker_loss(h_adapted: Float[Tensor, "l b s d"], h_frozen: Float[Tensor, "l b s d"],
                         mask: Shaped[Tensor, "b s"]) -> Float[Tensor, ""]:
    """The mean of ReLU(cos(adapted, frozen)) over the target layers and the unpadded positions.

    As the reference: both stacks are normalised over the hidden dimension, their product masked by the
    (layers, batch, seq, 1) mask and summed over the hidden dimension (the cosine), passed through ReLU,
    summed, and divided by the mask's sum over layers × rows × positions, i.e. layers × unpadded tokens.
    The mask is the attention mask of the whole row, request and response tokens alike. The ReLU means
    a representation already orthogonal to (or opposite) the frozen one costs nothing."""
    _check_mask("mask", mask)
    cos = masked_cosine(h_adapted, h_frozen, mask)
    n_tokens = mask.bool().sum() * h_adapted.shape[0]
    return torch.relu(cos).sum() / n_tokens


def coefficients(step: int, max_steps: int, alpha: float) -> tuple[float, float]:
    """``(c_retain, c_circuit_breaker)`` at ``step``: with progress t / (2T), T = ``max_steps``,
    c_r = α t / (2T) and c_s = α (1 - t / (2T)).

    The reference's ``get_training_progress`` divides its step counter by a hard-coded 300, which is
    2 × its 150 steps; here 2T follows ``max_steps``. Its counter is incremented before use, so its first
    step has t = 1 and its last t = T: c_s falls from ≈ α to α/2 and c_r rises from ≈ 0 to α/2. Steps up to
    2T (where c_s reaches 0) are accepted."""
    max_steps = require_int("max_steps", max_steps, minimum=1)
    step = require_int("step", step, minimum=0, maximum=2 * max_steps)
    alpha = require_float("alpha", alpha, minimum=0.0, strict_minimum=True)
    progress = step / (2 * max_steps)
    return alpha * progress, alpha * (1.0 - progress)


# ---------------------------------------------------------------------------------------------------
# The model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face decoder-only LM (or of a peft model over one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"model={type(model).__name__}: expected a Hugging Face decoder-only LM whose decoder "
                         "has .layers (Llama, Mistral, OLMo2, SmolLM2, ...)")
    return layers


@contextlib.contextmanager
def truncated_layers(model, n_blocks: int) -> Iterator[None]:
    """Run ``model`` with its first ``n_blocks`` decoder blocks only inside the block; the full list is put
    back on the way out, exception or not. ``output_hidden_states`` then returns ``n_blocks + 1`` states,
    the last after the final norm (the reference loads the model with ``num_hidden_layers`` cut instead)."""
    layers = decoder_layers(model)
    require_int("n_blocks", n_blocks, minimum=1, maximum=len(layers))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    decoder.layers = torch.nn.ModuleList(list(layers)[:n_blocks])
    try:
        yield
    finally:
        decoder.layers = layers


class CircuitBreakerModel:
    """A causal LM with a LoRA adapter built from a :class:`CircuitBreakerConfig` (``peft.get_peft_model``
    wraps ``model`` in place: its weights are the frozen model, reached with the adapter disabled)."""

    def __init__(self, model, config: CircuitBreakerConfig):
        import peft

        if not isinstance(config, CircuitBreakerConfig):
            raise ValueError(f"config={config!r}: expected a CircuitBreakerConfig")
        if isinstance(model, peft.PeftModel):
            raise ValueError("model is already a peft model: expected the bare causal LM")
        config.check(model)
        lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                               target_modules=list(config.lora_target_modules),
                               layers_to_transform=list(config.transformed_layers), bias="none",
                               task_type="CAUSAL_LM")
        self.config = config
        self.model = peft.get_peft_model(model, lora)
        self.merged = False

    @property
    def n_blocks(self) -> int:
        return len(decoder_layers(self.model))

    def _live(self):
        if self.merged:
            raise RuntimeError("the adapter was merged by save_merged: this wrapper cannot train or switch it off")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the adapter at ``config.lr`` without weight decay (the reference's ``adamw_torch``,
        ``weight_decay 0``, constant schedule)."""
        self._live()
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.config.lr, weight_decay=0.0)

    def hidden_states(self, input_ids: Int[Tensor, "b s"] | None, attention_mask: Shaped[Tensor, "b s"], *,
                      adapter: bool = True, layers: Sequence[int] | None = None,
                      n_blocks: int | None = None,
                      inputs_embeds: Float[Tensor, "b s d"] | None = None) -> Float[Tensor, "l b s d"]:
        """Stacked hidden states of ``layers`` (``None``: every state the forward returns) with the adapter
        on or off, running the first ``n_blocks`` decoder blocks (``None``: ``config.kept_blocks``, the
        training truncation). ``inputs_embeds`` replaces the embeddings of ``input_ids`` (which may then be
        ``None``). Gradients flow unless the caller is under ``no_grad``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("hidden_states: expected exactly one of input_ids and inputs_embeds")
        n_blocks = self.config.kept_blocks if n_blocks is None else n_blocks
        require_int("n_blocks", n_blocks, minimum=1, maximum=self.n_blocks)
        if layers is not None:
            layers = list(layers)
            for i, layer in enumerate(layers):
                require_int(f"layers[{i}]", layer, minimum=0, maximum=n_blocks)
        if not adapter:
            self._live()
        switch = self.model.disable_adapter() if not adapter else contextlib.nullcontext()
        inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        with switch, truncated_layers(self.model, n_blocks):
            out = self.model(**inputs, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        states = out.hidden_states
        return torch.stack(states if layers is None else [states[layer] for layer in layers])

    def logits(self, input_ids: Int[Tensor, "b s"], attention_mask: Shaped[Tensor, "b s"] | None = None, *,
               adapter: bool = True) -> Float[Tensor, "b s v"]:
        """Logits of the whole model (every block) with the adapter on or off."""
        if not adapter:
            self._live()
        switch = self.model.disable_adapter() if not adapter else contextlib.nullcontext()
        with switch:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(self, input_ids: Int[Tensor, "b s"], attention_mask: Shaped[Tensor, "b s"] | None = None, *,
                 max_new_tokens: int = 32, adapter: bool = True, **kwargs) -> Int[Tensor, "b t"]:
        """``generate`` on the whole model (greedy unless ``kwargs`` say otherwise), adapter on or off, in
        eval mode; the training mode is restored after."""
        require_int("max_new_tokens", max_new_tokens, minimum=1)
        if not adapter:
            self._live()
        was_training = self.model.training
        self.model.eval()
        kwargs.setdefault("do_sample", False)
        switch = self.model.disable_adapter() if not adapter else contextlib.nullcontext()
        try:
            with switch:
                return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self.model.train(was_training)

    def save_merged(self, path, tokenizer=None):
        """Merge the adapter into the weights (``merge_and_unload``), save the plain model (and
        ``tokenizer``) with ``save_pretrained`` under ``path`` and return it; it loads back with
        ``AutoModelForCausalLM.from_pretrained(path)``. Every block is saved: the training truncation is
        only ever temporary here, so nothing has to be put back as the reference does when it saves. The
        wrapper then holds the merged model and refuses to switch the adapter off."""
        self._live()
        merged = self.model.merge_and_unload()
        merged.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        self.model = merged
        self.merged = True
        return merged


# ---------------------------------------------------------------------------------------------------
# One step


@dataclass(frozen=True)
class ReroutingLoss:
    """One step's loss and its parts (NaN for a part whose coefficient was 0 and was not computed), and the
    mean cosine between adapted and frozen states at the target layers over the circuit-breaker tokens
    (of the perturbed inputs when the adversary is on). ``adversary_before`` and ``adversary_after``: the
    adapted model's mean cross-entropy per response token of the circuit-breaker batch at δ = 0 and at the
    adversary's last δ (NaN when the adversary is off or was not run)."""

    total: float
    retain: float
    circuit_breaker: float
    c_retain: float
    c_circuit_breaker: float
    cb_cosine: float
    adversary_before: float = math.nan
    adversary_after: float = math.nan


def _check_step_inputs(model, config) -> None:
    """A live :class:`CircuitBreakerModel` and a :class:`CircuitBreakerConfig`, or an error naming which."""
    if not isinstance(model, CircuitBreakerModel):
        raise ValueError(f"model={type(model).__name__}: expected a CircuitBreakerModel")
    if not isinstance(config, CircuitBreakerConfig):
        raise ValueError(f"config={config!r}: expected a CircuitBreakerConfig")
    model._live()


def check_response_mask(batch, name: str) -> Tensor:
    """``batch["response_mask"]``, (batch, seq) 0/1: the response tokens of each row, the targets of the
    embedding adversary. It must mark unpadded positions only, at least one, never a row's first position
    (a response token is predicted from the one before it), and leave at least one request position to
    perturb in every row; refused otherwise, naming ``name``."""
    ids, mask = check_batch(batch, name)
    if "response_mask" not in batch:
        raise ValueError(f"{name}: expected a 'response_mask' (the response tokens of each row) when "
                         "adversarial_steps > 0: the adversary lowers the cross-entropy of those tokens")
    response = batch["response_mask"]
    if not isinstance(response, Tensor) or response.shape != ids.shape:
        raise ValueError(f"{name}['response_mask']: expected a tensor of the shape of input_ids {tuple(ids.shape)}")
    _check_mask(f"{name}['response_mask']", response)
    response = response.bool()
    if bool((response & ~mask.bool()).any()):
        raise ValueError(f"{name}['response_mask'] marks padded positions: expected response tokens only")
    if bool(response[:, 0].any()):
        raise ValueError(f"{name}['response_mask'] marks a row's first position: expected a token before "
                         "every response token")
    free = (mask.bool() & ~response).any(dim=1)
    if not bool(free.all()):
        row = int((~free).nonzero()[0, 0])
        raise ValueError(f"{name}['response_mask'] marks every token of row {row}: expected request positions "
                         "to perturb in every row")
    return response


def response_loss(model: CircuitBreakerModel, embeds: Float[Tensor, "b s d"], attention_mask: Shaped[Tensor, "b s"],
                  input_ids: Int[Tensor, "b s"], response_mask: Shaped[Tensor, "b s"]) -> Float[Tensor, ""]:
    """The mean cross-entropy over the response tokens of the whole model (every block, adapter on) run on
    ``embeds``: token t of a row is scored by the logits at t - 1, as the embedding attack scores its
    target answer."""
    logits = model.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
    target = response_mask.bool()[:, 1:]
    pred = logits[:, :-1][target].float()
    return torch.nn.functional.cross_entropy(pred, input_ids[:, 1:][target])


@dataclass(frozen=True)
class AdversaryResult:
    """The embedding adversary's perturbation δ of the input embeddings (0 outside the request positions)
    and the response loss at δ = 0 and at the returned δ."""

    delta: Tensor
    loss_before: float
    loss_after: float


def embedding_adversary(model: CircuitBreakerModel, batch_cb: Mapping[str, Tensor],
                        config: CircuitBreakerConfig) -> AdversaryResult:
    """The inner maximisation of the resistant variant: from δ = 0, ``config.adversarial_steps`` steps

        δ ← clip_ε(δ − η · sign(∇_δ L(e + δ))),   ε = ``adversarial_radius``, η = ``adversarial_lr``,

    where e are the input embeddings of ``batch_cb`` and L is :func:`response_loss` of the adapted model
    (adapter on, eval mode: no dropout) on its response tokens. δ is nonzero only at the request positions
    (unpadded and not in ``response_mask``: the chat template and the request, as an attacker writes the
    input before the answer, never the answer itself), and clip_ε keeps every coordinate within ±ε.
    Only δ is differentiated (``torch.autograd.grad``): no parameter gradient is stored, and no optimiser
    sees these steps. The model's training mode is restored after."""
    _check_step_inputs(model, config)
    ids, mask = check_batch(batch_cb, "batch_cb")
    response = check_response_mask(batch_cb, "batch_cb")
    free = (mask.bool() & ~response)[..., None]
    peft_model = model.model
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            embeds = peft_model.get_input_embeddings()(ids)
        delta = torch.zeros_like(embeds, requires_grad=True)
        losses = []
        for k in range(config.adversarial_steps + 1):
            last = k == config.adversarial_steps
            with torch.no_grad() if last else contextlib.nullcontext():
                loss = response_loss(model, embeds + delta, mask, ids, response)
            losses.append(float(loss.detach()))
            if last:
                break
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                step = torch.where(free, grad.sign(), 0.0)
                delta -= config.adversarial_lr * step
                delta.clamp_(-config.adversarial_radius, config.adversarial_radius)
    finally:
        peft_model.train(was_training)
    return AdversaryResult(delta.detach(), losses[0], losses[-1])


def rerouting_step(model: CircuitBreakerModel, batch_cb: Mapping[str, Tensor], batch_retain: Mapping[str, Tensor],
                   config: CircuitBreakerConfig, step: int, optimizer: torch.optim.Optimizer, *,
                   delta: Tensor | None = None) -> ReroutingLoss:
    """One optimiser step of representation rerouting, as the reference's ``compute_loss``:

    1. the coefficients at ``step`` (:func:`coefficients`; the reference's first step is 1);
    2. with the adapter disabled, in eval mode and under ``no_grad``: the frozen hidden states of every
       layer of the truncated model on the retain batch and of the target layers on the circuit-breaker
       batch (each skipped when its coefficient is 0);
    3. in train mode (LoRA dropout on), the adapted states of the same layers, with gradients;
    4. loss = c_r · :func:`retain_loss` + c_s · :func:`circuit_breaker_loss`, backward, ``optimizer.step()``
       (the gradients are zeroed first).

    Both forwards run decoder blocks 0..max(target_layers) only.

    With ``config.adversarial_steps > 0`` (the resistant variant; ``batch_cb`` then needs a
    ``"response_mask"``), :func:`embedding_adversary` first finds δ against the adapter as it is, and the
    circuit-breaker term of steps 2-3 runs on the perturbed embeddings e + δ: frozen states of e + δ with
    the adapter off, adapted states of e + δ with it on, δ a constant of the loss. The retain term is
    unchanged. ``delta`` (the shape of the batch's embeddings) fixes δ instead of running the adversary."""
    _check_step_inputs(model, config)
    cb_ids, cb_mask = check_batch(batch_cb, "batch_cb")
    retain_ids, retain_mask = check_batch(batch_retain, "batch_retain")
    if delta is not None:
        width = model.model.get_input_embeddings().weight.shape[1]
        if not isinstance(delta, Tensor) or delta.shape != (*cb_ids.shape, width):
            raise ValueError(f"delta of shape {tuple(getattr(delta, 'shape', ()))}: expected (batch, seq, d) = "
                             f"{(*cb_ids.shape, width)}, the circuit-breaker batch's input embeddings")
    elif config.adversarial_steps > 0:
        check_response_mask(batch_cb, "batch_cb")
    c_r, c_s = coefficients(step, config.max_steps, config.alpha)
    target = list(config.target_layers)
    n_blocks = config.kept_blocks
    require_range("max(target_layers)", target[-1], maximum=model.n_blocks - 1)

    adversary_before = adversary_after = math.nan
    cb_inputs = {"input_ids": cb_ids}
    if c_s > 0 and (delta is not None or config.adversarial_steps > 0):
        if delta is None:
            found = embedding_adversary(model, batch_cb, config)
            delta, adversary_before, adversary_after = found.delta, found.loss_before, found.loss_after
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(cb_ids)
        cb_inputs = {"input_ids": None, "inputs_embeds": embeds + delta.to(embeds.dtype)}

    peft_model = model.model
    peft_model.eval()
    with torch.no_grad():
        frozen_retain = (model.hidden_states(retain_ids, retain_mask, adapter=False, n_blocks=n_blocks)
                         if c_r > 0 else None)
        frozen_cb = (model.hidden_states(cb_inputs["input_ids"], cb_mask, adapter=False, layers=target,
                                         n_blocks=n_blocks, inputs_embeds=cb_inputs.get("inputs_embeds"))
                     if c_s > 0 else None)
    peft_model.train()

    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    retain_value = cb_value = cos_value = math.nan
    if frozen_retain is not None:
        adapted = model.hidden_states(retain_ids, retain_mask, adapter=True, n_blocks=n_blocks)
        part = retain_loss(adapted, frozen_retain, retain_mask)
        loss = loss + c_r * part
        retain_value = float(part.detach())
    if frozen_cb is not None:
        adapted = model.hidden_states(cb_inputs["input_ids"], cb_mask, adapter=True, layers=target,
                                      n_blocks=n_blocks, inputs_embeds=cb_inputs.get("inputs_embeds"))
        part = circuit_breaker_loss(adapted, frozen_cb, cb_mask)
        loss = loss + c_s * part
        cb_value = float(part.detach())
        with torch.no_grad():
            cos = masked_cosine(adapted, frozen_cb, cb_mask)
            cos_value = float(cos.sum() / (cb_mask.bool().sum() * len(target)))
    if isinstance(loss, Tensor):
        loss.backward()
        optimizer.step()
    return ReroutingLoss(total=float(loss.detach()), retain=retain_value, circuit_breaker=cb_value,
                         c_retain=c_r, c_circuit_breaker=c_s, cb_cosine=cos_value,
                         adversary_before=adversary_before, adversary_after=adversary_after)
