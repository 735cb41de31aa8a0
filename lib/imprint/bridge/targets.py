"""The attacked model of the gradient bridge (chapter 06): a small CNN for one-channel images (the 8x8
digits, the 25x25 LFW faces), the linear layers a LoRA adapter fine-tunes, peft's initialisation of the
frozen factors ``A``, and a seeded pretraining on public proxy data.

The network is ``conv(3x3) -> act -> avgpool(2) -> conv(3x3) -> act -> avgpool(2) -> flatten -> fc1 ->
act -> fc2``; the convolutions keep the spatial size (padding 1) and each pooling floors it (8 -> 4 -> 2,
25 -> 12 -> 6). LoRA adapts the two linear layers (:func:`lora_targets`), the convolutions stay frozen.
Its activation is smooth by default (``tanh``): gradient inversion differentiates the gradient with
respect to the input, and a ReLU network's second derivative vanishes almost everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from imprint.runtime.checks import require_choice, require_float, require_int, require_positive

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


@dataclass(frozen=True)
class TargetOptions:
    """Architecture of :class:`TargetCNN`: square one-channel images of ``image_size`` pixels."""

    image_size: int = 8
    n_classes: int = 10
    channels: tuple[int, ...] = (8, 16)
    hidden: int = 32
    activation: str = "tanh"

    def __post_init__(self) -> None:
        require_int("image_size", self.image_size, minimum=4)
        require_int("n_classes", self.n_classes, minimum=2)
        if len(self.channels) != 2:
            raise ValueError(f"channels={self.channels!r}: expected two channel counts, one per convolution")
        for c in self.channels:
            require_int("channels", c, minimum=1)
        require_int("hidden", self.hidden, minimum=1)
        require_choice("activation", self.activation, list(ACTIVATIONS))

    @property
    def feature_size(self) -> int:
        """Spatial size after the two poolings."""
        return (self.image_size // 2) // 2


class TargetCNN(nn.Module):
    """Two convolutions and two linear layers; input ``[batch, 1, H, W]``, output logits ``[batch, classes]``."""

    def __init__(self, options: TargetOptions):
        super().__init__()
        self.options = options
        c1, c2 = options.channels
        act = ACTIVATIONS[options.activation]
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.act = act()
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(c2 * options.feature_size ** 2, options.hidden)
        self.fc2 = nn.Linear(options.hidden, options.n_classes)

    def forward(self, x: Float[Tensor, "batch 1 height width"]) -> Float[Tensor, "batch classes"]:
        size = self.options.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"x has shape {tuple(x.shape)}: expected [batch, 1, {size}, {size}]")
        h = self.pool(self.act(self.conv1(x)))
        h = self.pool(self.act(self.conv2(h)))
        return self.fc2(self.act(self.fc1(h.flatten(1))))


def make_target(options: TargetOptions, seed: int) -> TargetCNN:
    """A freshly initialised :class:`TargetCNN` (torch's default initialisation under ``seed``; the global
    random state is left as it was)."""
    seed = require_int("seed", seed, minimum=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TargetCNN(options)
    return model.eval()


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the weight matrices a LoRA adapter of ``model`` fine-tunes: those of its ``nn.Linear``
    layers, in order (``["fc1.weight", "fc2.weight"]`` for :class:`TargetCNN`); peft's ``target_modules``
    are these names without ``.weight``. They key the ``lora_a`` of
    :func:`~imprint.bridge.per_example.lora_step_pairs`."""
    names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"model={type(model).__name__}: expected at least one nn.Linear layer to adapt")
    return names


def init_lora_factors(model: nn.Module, rank: int, seed: int, names: list[str] | None = None,
                      ) -> dict[str, Float[Tensor, "r d_in"]]:
    """The frozen-at-start LoRA factors ``A`` (``[rank, in]``) of the weights ``names`` (default:
    :func:`lora_targets`), drawn as peft draws them: ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform on
    ``[-1/sqrt(in), 1/sqrt(in)]``, from a generator seeded with ``seed`` (one stream, layers in order)."""
    rank = require_int("rank", rank, minimum=1)
    seed = require_int("seed", seed, minimum=0)
    names = lora_targets(model) if names is None else list(names)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name in names:
        if name not in params or params[name].ndim != 2:
            raise ValueError(f"names: {name!r} is not a weight matrix of the model ({list(params)})")
        w = params[name]
        bound = 1.0 / math.sqrt(w.shape[1])
        a = (torch.rand(rank, w.shape[1], generator=gen, dtype=torch.float64) * 2 - 1) * bound
        factors[name] = a.to(dtype=w.dtype, device=w.device)
    return factors


@dataclass(frozen=True)
class PretrainOptions:
    """Adam on the mean cross-entropy, ``epochs`` passes over shuffled minibatches."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        require_int("epochs", self.epochs, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_positive("lr", self.lr)
        require_float("weight_decay", self.weight_decay, minimum=0.0)
        require_int("seed", self.seed, minimum=0)


def pretrain(model: nn.Module, x: Float[Tensor, "n 1 height width"], labels: Int[Tensor, " n_labels"],
             options: PretrainOptions = PretrainOptions()) -> list[float]:
    """Train ``model`` in place on public proxy images; returns the mean training loss of each epoch.
    Shuffling is drawn from a generator seeded with ``options.seed``, so two calls on equal models give
    equal weights. The model is left in eval mode."""
    if x.ndim != 4 or x.shape[0] < 1:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [n, 1, height, width] with n >= 1")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}: expected ({x.shape[0]},), one per image")
    device = next(model.parameters()).device
    x, labels = x.to(device), labels.to(device)
    gen = torch.Generator().manual_seed(options.seed)
    opt = torch.optim.Adam(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    history = []
    model.train()
    for _ in range(options.epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        total = 0.0
        for start in range(0, x.shape[0], options.batch_size):
            idx = order[start:start + options.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / x.shape[0])
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, x: Float[Tensor, "n 1 height width"], labels: Int[Tensor, " n"]) -> float:
    """Fraction of ``x`` classified as ``labels``."""
    device = next(model.parameters()).device
    return float((model(x.to(device)).argmax(-1) == labels.to(device)).float().mean())
