"""Per-layer hidden states of a causal LM for the attribution-between-checkpoints chapter (07).

The chapter's methods compare hidden states h of f_old and f_new (Δh, ∂L/∂h, Δh ⊙ g) at chosen token
positions. :func:`capture_hidden` registers PyTorch forward hooks in a context manager that removes every
one of them on the way out, exception or not, and records, per layer, the hidden states pooled by a
weight matrix over positions: :func:`position_weights` builds those of the last token and of the mean
over a span. Layers are numbered as transformers' ``output_hidden_states`` numbers them: 0 the
embedding output, ℓ the output of decoder block ℓ, and the last one after the final norm.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from imprint.runtime.checks import require_choice, require_int

POOLINGS = ("last", "mean")


def _modules(model) -> list[torch.nn.Module]:
    """The modules whose outputs are hidden states 0..L of a Hugging Face decoder (peft models too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if layers is None or norm is None or not hasattr(base, "get_input_embeddings"):
        raise ValueError(f"model={type(model).__name__}: expected a Hugging Face decoder-only LM whose decoder "
                         "has .layers and a final .norm (Llama, OLMo2, SmolLM2, ...)")
    return [base.get_input_embeddings(), *list(layers)[:-1], norm]


class HiddenCapture:
    """What :func:`capture_hidden` recorded: ``states[layer]`` of shape (batch, d) when pooled, (batch,
    seq, d) otherwise; forwards run inside one context are concatenated along the batch."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self._chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    @property
    def states(self) -> dict[int, Tensor]:
        empty = [layer for layer, chunks in self._chunks.items() if not chunks]
        if empty:
            raise RuntimeError(f"no forward pass reached layers {empty} inside capture_hidden")
        return {layer: chunks[0] if len(chunks) == 1 else torch.cat(chunks)
                for layer, chunks in self._chunks.items()}


@contextlib.contextmanager
def capture_hidden(model, layers: Sequence[int], *, weights: Float[Tensor, "b s"] | None = None,
                   detach: bool = True) -> Iterator[HiddenCapture]:
    """Record the hidden states of ``layers`` (0..L, as ``output_hidden_states``) of every forward pass of
    ``model`` inside the block.

    With ``weights`` (one row per batch row, over the positions; :func:`position_weights`) each state is
    pooled to ``weights @ h`` per row; without, the full (batch, seq, d) states are kept. ``detach=False``
    keeps them in the autograd graph (for ∂L/∂h with ``torch.autograd.grad``). The hooks are removed when
    the block ends, whether or not it raised.
    """
    modules = _modules(model)
    n = len(modules) - 1
    if isinstance(layers, int) or not layers:
        raise ValueError(f"layers={layers!r}: expected a non-empty list of layer indices in 0..{n}")
    layers = [require_int("layers[...]", layer, minimum=0, maximum=n) for layer in layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers={layers}: expected each layer once")
    capture = HiddenCapture(layers)

    def hook_for(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if weights is not None:
                if weights.shape != hidden.shape[:2]:
                    raise ValueError(f"weights has shape {tuple(weights.shape)}: expected (batch, seq) = "
                                     f"{tuple(hidden.shape[:2])} of the forward pass")
                hidden = torch.einsum("bs,bsd->bd", weights.to(hidden), hidden)
            capture._chunks[layer].append(hidden.detach() if detach else hidden)
        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(modules[layer].register_forward_hook(hook_for(layer)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def position_weights(attention_mask: Int[Tensor, "b s"], pooling: str = "last",
                     span: Bool[Tensor, "b s"] | None = None) -> Float[Tensor, "b s"]:
    """Pooling weights over positions: ``"last"`` one-hot at each row's last attended token (right or
    left padding), ``"mean"`` uniform over ``span`` (default: the attended tokens)."""
    require_choice("pooling", pooling, POOLINGS)
    mask = attention_mask.bool()
    if not mask.any(1).all():
        raise ValueError("attention_mask has a row without any attended token: expected at least one")
    if pooling == "last":
        if span is not None:
            raise ValueError("span is given with pooling='last': expected span only with pooling='mean'")
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).argmax(1)
        return torch.nn.functional.one_hot(last, mask.shape[1]).float()
    if span is None:
        span = mask
    if span.shape != mask.shape:
        raise ValueError(f"span has shape {tuple(span.shape)}: expected {tuple(mask.shape)}, that of attention_mask")
    span = span.bool() & mask
    if not span.any(1).all():
        raise ValueError("span has a row without any attended token: expected at least one per row")
    return span.float() / span.sum(1, keepdim=True)


def n_hidden_layers(model) -> int:
    """The index of the last hidden state (after the final norm): layers are numbered 0..this."""
    return len(_modules(model)) - 1


@contextlib.contextmanager
def replace_hidden(model, layer: int, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the block, hidden state ``layer`` (numbered as in :func:`capture_hidden`) of every forward
    pass is replaced by ``replace(hidden)`` (same shape) before the rest of the model reads it; the hook
    is removed when the block ends, whether or not it raised."""
    modules = _modules(model)
    layer = require_int("layer", layer, minimum=0, maximum=len(modules) - 1)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = replace(hidden)
        if new.shape != hidden.shape:
            raise ValueError(f"replace returned shape {tuple(new.shape)}: expected {tuple(hidden.shape)}, that "
                             f"of hidden state {layer}")
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = modules[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
