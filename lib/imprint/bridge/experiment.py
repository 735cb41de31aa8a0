"""One cell of the gradient-bridge experiment (chapter 06): from a shared LoRA update back to private images.

A client fine-tunes the public :class:`~imprint.bridge.targets.TargetCNN` on a private batch with LoRA
(``W = W0 + s B A`` on its linear layers, peft's start ``B = 0``, one SGD step) and shares ``Delta B``;
the attacker knows the model, ``A``, the step size and the batch's labels (given, not recovered). A cell,
for one rank, one seed and one proxy distribution, does:

1. **proxy pairs**: one- or T-step LoRA updates of the same model and the same ``A`` on batches of the
   attacker's proxy images, with the full gradients they were taken from
   (:func:`~imprint.bridge.pairs.generate_pairs`: shards that a killed run resumes from). The proxy images
   are either of the private domain (``"in"``: public images disjoint from the private and held-out sets,
   labels true) or natural-image patches of scikit-image's bundled photographs (``"cross"``: labels drawn
   uniformly);
2. **decoders** per adapted layer, fitted on a training part of the pairs and scored by the cosine of
   decoded and true gradients on the rest: the minimum-norm lift ``-Delta W (A^T A)^+ / (eta s^2)``
   (nothing fitted), the ridge decoder from ``Delta B`` to ``G``, and the learned MLP decoder (cosine loss);
3. **inversion** (Inverting Gradients) of every consecutive private batch from the true gradient of the
   adapted layers, from the decoded one (the decoder with the best held-out proxy cosine, a choice that
   sees no private image), from the LoRA gradient ``grad_B L`` with ``A`` and ``B`` known (no decoder:
   the candidates' gradients are taken through the adapter), and from a random gradient of the same
   norm per layer (the control); the decoded and the direct attacks again with the score-distillation
   prior of a small DDPM trained on the public images when ``sds_weight > 0``; and, as the upper line of
   the inversion itself, from the true gradient of every parameter (``"true_all"``, convolutions and
   biases too: what plain federated SGD would share); and, as a floor that needs no inversion, the
   ``"template"``: each private image's class mean of the public images;
4. **scores** per private image: PSNR of the matched reconstruction, SSIM and chapter 01's memorisation
   criterion (:mod:`imprint.reconstruction.evaluation`: one-to-one matching by correlation within a label,
   memorised when the reconstruction is closer in SSIM than the nearest held-out image of its class).

:func:`prepare_setting` builds what does not depend on the rank (data, target, prior); :func:`run_cell`
runs one rank and one proxy distribution on it, and caches in the setting the attacks that need no proxy
(true gradient and random control once per setting, the direct LoRA attack once per rank). The attacks a
cell still has to compute are inverted as one batch per model, over every private batch
(:func:`~imprint.bridge.inversion.invert_gradients_batch`): those through the target (true, random,
decoded, with and without the prior) together, the direct ones through the LoRA view together. The
restarts start from ``N(mean, std^2)`` of the public pixels (:func:`init_statistics`).

Why the private batches are small on the faces: LFW's task is two-class and the private set holds faces
only, so in a batch the per-example errors back-propagated to ``fc1`` point almost the same way and the
batch's gradient of a linear layer is close to rank one, one sum of the batch's images weighted by how
unsure the target is of each (``params/06_gradient_bridge.yaml`` gives the measurements).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call

from imprint.bridge.decoders import decoded_cosine, fit_ridge_lift, min_norm_lift
from imprint.bridge.inversion import PRIOR_BALANCES, invert_gradients_batch, model_gradients
from imprint.bridge.learned import DecoderOptions, LearnedDecoder, fit_decoder
from imprint.bridge.pairs import PairOptions, generate_pairs, load_pairs
from imprint.bridge.per_example import lora_step_pairs
from imprint.bridge.prior import SDSOptions, sds_priors, unet_epsilon
from imprint.bridge.targets import (PretrainOptions, TargetOptions, accuracy, init_lora_factors, lora_targets,
                                    make_target, pretrain)
from imprint.runtime.checks import require_choice, require_float, require_int, require_positive

DOMAINS = ("digits", "faces")
PROXIES = ("in", "cross")
DECODERS = ("lift", "ridge", "learned")
ATTACKS = ("true", "decoded", "lora", "random", "decoded_sds", "lora_sds", "random_sds", "true_all", "template")
#: The control each attack is judged against: the prior alone can draw faces, so an attack with the prior
#: is compared with the random gradient under the same prior.
CONTROLS = {a: ("random_sds" if a.endswith("_sds") else "random") for a in ATTACKS}
#: Controls that are no attack of their own: the random gradient (without and with the prior) and the
#: template (each private image's class mean of the public images, no inversion), the floor of every attack.
CONTROL_ATTACKS = ("random", "random_sds", "template")
NATURAL_IMAGES = ("camera", "coins", "moon", "page", "text", "astronaut", "grass", "gravel", "brick", "clock")


# ----------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class SettingOptions:
    """What :func:`prepare_setting` builds: the private domain and its splits, the target and its
    pretraining on the public images, the cross-distribution proxy images, and the DDPM of the prior."""

    domain: str = "digits"
    n_private: int = 8
    n_heldout: int = 100
    n_public: int = 600
    n_cross: int = 600
    channels: tuple[int, int] = (8, 16)
    hidden: int = 32
    pretrain_epochs: int = 10
    ddpm_steps: int = 0              # 0: no prior is trained
    ddpm_channels: tuple[int, ...] = (16, 32)
    ddpm_timesteps: int = 200

    def __post_init__(self) -> None:
        require_choice("domain", self.domain, DOMAINS)
        require_int("n_private", self.n_private, minimum=1)
        require_int("n_heldout", self.n_heldout, minimum=2)
        require_int("n_public", self.n_public, minimum=8)
        require_int("n_cross", self.n_cross, minimum=8)
        if len(self.channels) != 2:
            raise ValueError(f"channels={self.channels!r}: expected two channel counts")
        for c in self.channels:
            require_int("channels", c, minimum=1)
        require_int("hidden", self.hidden, minimum=1)
        require_int("pretrain_epochs", self.pretrain_epochs, minimum=1)
        require_int("ddpm_steps", self.ddpm_steps, minimum=0)
        if not self.ddpm_channels:
            raise ValueError("ddpm_channels=(): expected at least one level")
        for c in self.ddpm_channels:
            require_int("ddpm_channels", c, minimum=8)
            if c % 8:
                raise ValueError(f"ddpm_channels={self.ddpm_channels!r}: expected multiples of 8 (group norm)")
        require_int("ddpm_timesteps", self.ddpm_timesteps, minimum=2)


@dataclass(frozen=True)
class CellOptions:
    """One cell: the rank, the private batch size, the proxy distribution, the pairs, the decoders, the
    inversion and the prior's weight ``sds_weight`` (0: no prior), absolute or relative to the matching
    gradient (``sds_balance``, see :func:`imprint.bridge.inversion.invert_gradients`)."""

    rank: int = 4
    batch_size: int = 4
    proxy: str = "cross"
    n_pairs: int = 256
    shard_size: int = 128
    pair_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    pair_steps: tuple[int, ...] = (1,)
    lora_lr: float = 0.1
    test_fraction: float = 0.25
    ridge_alpha: float = 1e-3
    decoder_hidden: tuple[int, ...] = (128,)
    decoder_epochs: int = 100
    decoder_lr: float = 1e-3
    decoder_loss: str = "cosine"
    invert_steps: int = 200
    invert_lr: float = 0.03    # pixel units: the anchors' 0.1 in their normalised space of std ~0.25-0.3
    tv_weight: float = 1e-2
    restarts: int = 2
    sds_weight: float = 0.0
    sds_balance: str = "absolute"

    def __post_init__(self) -> None:
        require_int("rank", self.rank, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_choice("proxy", self.proxy, PROXIES)
        require_int("n_pairs", self.n_pairs, minimum=8)
        require_int("shard_size", self.shard_size, minimum=1)
        if not self.pair_batch_sizes or not self.pair_steps:
            raise ValueError("pair_batch_sizes and pair_steps: expected at least one value each")
        for b in self.pair_batch_sizes:
            require_int("pair_batch_sizes", b, minimum=1)
        for t in self.pair_steps:
            require_int("pair_steps", t, minimum=1)
        require_positive("lora_lr", self.lora_lr)
        require_float("test_fraction", self.test_fraction, minimum=0.0, maximum=0.9, strict_minimum=True)
        require_positive("ridge_alpha", self.ridge_alpha)
        for h in self.decoder_hidden:
            require_int("decoder_hidden", h, minimum=1)
        require_int("decoder_epochs", self.decoder_epochs, minimum=1)
        require_positive("decoder_lr", self.decoder_lr)
        require_choice("decoder_loss", self.decoder_loss, ["cosine", "mse"])
        require_int("invert_steps", self.invert_steps, minimum=1)
        require_positive("invert_lr", self.invert_lr)
        require_float("tv_weight", self.tv_weight, minimum=0.0)
        require_int("restarts", self.restarts, minimum=1)
        require_float("sds_weight", self.sds_weight, minimum=0.0)
        require_choice("sds_balance", self.sds_balance, PRIOR_BALANCES)


# ------------------------------------------------------------------------------------------------- data

def natural_patches(n: int, size: int, seed: int) -> Float[Tensor, "n 1 size size"]:
    """``n`` grey patches of ``size`` pixels from scikit-image's bundled photographs: a random crop of
    ``4 size`` pixels of a random image, averaged down by four, stretched to [0, 1]."""
    import skimage.data
    from skimage.color import rgb2gray

    n = require_int("n", n, minimum=1)
    size = require_int("size", size, minimum=2)
    rng = np.random.default_rng([seed, 6])
    pictures = []
    for name in NATURAL_IMAGES:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if img.ndim == 3:
            img = rgb2gray(img[..., :3] / 255.0)
        elif img.max() > 1:
            img = img / 255.0
        pictures.append(img)
    crop = 4 * size
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        img = pictures[rng.integers(len(pictures))]
        top, left = rng.integers(img.shape[0] - crop + 1), rng.integers(img.shape[1] - crop + 1)
        patch = img[top:top + crop, left:left + crop].reshape(size, 4, size, 4).mean((1, 3))
        lo, hi = patch.min(), patch.max()
        out[i] = (patch - lo) / (hi - lo) if hi > lo else 0.5
    return torch.from_numpy(out).unsqueeze(1)


IMAGE_SIZES = {"digits": 8, "faces": 25}


def adapted_widths(domain: str, channels: Sequence[int], hidden: int) -> dict[str, int]:
    """Input widths of the target's adapted linear layers for a domain, known before anything is built (the
    largest LoRA rank a layer takes)."""
    require_choice("domain", domain, DOMAINS)
    size = TargetOptions(image_size=IMAGE_SIZES[domain], channels=tuple(channels), hidden=hidden).feature_size
    return {"fc1.weight": int(channels[1]) * size ** 2, "fc2.weight": int(hidden)}


def _domain_images(domain: str) -> tuple[np.ndarray, np.ndarray, int]:
    from imprint.data.images import load_digit_images, load_face_images

    if domain == "digits":
        x, y = load_digit_images()
        return x, y, 10
    x, y = load_face_images()
    return x, y, 2


@dataclass(frozen=True)
class Splits:
    """Disjoint private, held-out and public sets of one domain (pixels ``[n, 1, H, W]`` in [0, 1])."""

    private: Tensor
    private_labels: Tensor
    heldout: Tensor
    heldout_labels: Tensor
    public: Tensor
    public_labels: Tensor
    n_classes: int

    @property
    def image_size(self) -> int:
        return int(self.private.shape[-1])


def domain_splits(domain: str, n_private: int, n_heldout: int, n_public: int, seed: int) -> Splits:
    """Seeded disjoint splits. For faces the private set holds faces only (the held-out pool both classes);
    the public set (the attacker's in-distribution proxy, the target's pretraining and the prior's training
    set) takes what is left, at most ``n_public``."""
    require_choice("domain", domain, DOMAINS)
    x, y, k = _domain_images(domain)
    n = x.shape[0]
    rng = np.random.default_rng([seed, 606])
    order = rng.permutation(n)
    eligible = order[y[order] == 1] if domain == "faces" else order
    if n_private + n_heldout + 8 > n or n_private > eligible.size:
        raise ValueError(f"n_private={n_private}, n_heldout={n_heldout}: the {domain} set has {n} images "
                         f"({eligible.size} eligible as private); expected n_private + n_heldout + 8 <= {n}")
    private = eligible[:n_private]
    rest = order[~np.isin(order, private)]
    heldout, public = rest[:n_heldout], rest[n_heldout:n_heldout + n_public]
    if set(y[private].tolist()) - set(y[heldout].tolist()):
        raise ValueError(f"n_heldout={n_heldout}: the held-out pool misses a class of the private set")

    def t(idx):
        return torch.from_numpy(x[idx]).float().unsqueeze(1), torch.from_numpy(y[idx]).long()

    return Splits(*t(private), *t(heldout), *t(public), n_classes=k)


# --------------------------------------------------------------------------------------------- the setting

@dataclass
class Setting:
    """What every rank of one seed shares: splits, cross proxy images, the pretrained target, the prior."""

    options: SettingOptions
    seed: int
    splits: Splits
    cross: Tensor
    cross_labels: Tensor
    model: nn.Module
    target_accuracy: float
    unet: nn.Module | None
    alphas_cumprod: Tensor | None
    device: torch.device
    cache: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def _ddpm_config(image_size: int, n_classes: int, options: SettingOptions):
    from imprint.models.ddpm import DDPMConfig

    levels = tuple(options.ddpm_channels)
    while len(levels) > 1 and image_size % (2 ** (len(levels) - 1)):
        levels = levels[:-1]  # 25x25 faces cannot be halved: one level
    return DDPMConfig(image_size=image_size, n_classes=n_classes, block_out_channels=levels,
                      norm_num_groups=8, n_train_timesteps=options.ddpm_timesteps)


SETTING_FILE = "setting-seed{seed}.safetensors"


def _read_keyed(path: Path, key: object) -> tuple[dict, dict[str, Tensor]] | None:
    """The metadata and tensors of the result file at ``path`` when it exists and was written under
    ``key``; ``None`` otherwise (the caller computes, and writes the file under its key)."""
    from imprint.runtime.io import load_tensor_metadata, load_tensors

    if not path.is_file():
        return None
    meta = load_tensor_metadata(path)
    return (meta, load_tensors(path)) if meta.get("key") == key else None


def prepare_setting(options: SettingOptions, seed: int, device: str | torch.device = "cpu",
                    folder: str | Path | None = None) -> Setting:
    """Splits, cross-distribution patches, the target pretrained on the public images (Adam, seeded), and,
    with ``ddpm_steps > 0``, a class-conditional DDPM (diffusers ``UNet2DModel``) trained on the same
    public images: none of them private or held out. With ``folder``, the trained weights are written
    there atomically (``setting-seed<seed>.safetensors``, keyed by the options and the seed) and read back
    by a later call with the same options and seed, so a resumed run attacks the very networks that its
    finished cells attacked, also on another machine; ``setting.seconds`` holds the wall seconds of the
    pretraining and the DDPM's training (those of the run that trained them when read back)."""
    seed = require_int("seed", seed, minimum=0)
    device = torch.device(device)
    splits = domain_splits(options.domain, options.n_private, options.n_heldout, options.n_public, seed)
    size = splits.image_size
    cross = natural_patches(options.n_cross, size, seed)
    cross_labels = torch.from_numpy(np.random.default_rng([seed, 7]).integers(splits.n_classes, size=options.n_cross))
    target = TargetOptions(image_size=size, n_classes=splits.n_classes, channels=tuple(options.channels),
                           hidden=options.hidden)
    model = make_target(target, seed).to(device)
    config = unet = abar = None
    if options.ddpm_steps > 0:
        from imprint.models.ddpm import alphas_cumprod

        config = _ddpm_config(size, splits.n_classes, options)
        abar = alphas_cumprod(config).to(device)
    from imprint.runtime.io import _to_jsonable, atomic_save_tensors

    key = _to_jsonable({"setting": asdict(options), "seed": seed})
    path = None if folder is None else Path(folder) / SETTING_FILE.format(seed=seed)
    seconds = {"seconds_pretrain": 0.0, "seconds_ddpm": 0.0}
    stored = None if path is None else _read_keyed(path, key)
    if stored is not None:
        meta, tensors = stored
        model.load_state_dict({k[len("target."):]: v for k, v in tensors.items() if k.startswith("target.")})
        acc = float(meta["target_accuracy"])
        seconds.update({k: float(v) for k, v in meta.get("seconds", {}).items() if k in seconds})
        if config is not None:
            from imprint.models.ddpm import unet_from_state_dict

            unet = unet_from_state_dict(config, {k[len("unet."):]: v.to(device) for k, v in tensors.items()
                                                 if k.startswith("unet.")})
    else:
        t0 = time.perf_counter()
        pretrain(model, splits.public, splits.public_labels, PretrainOptions(epochs=options.pretrain_epochs, seed=seed))
        acc = accuracy(model, splits.heldout, splits.heldout_labels)
        seconds["seconds_pretrain"] = time.perf_counter() - t0
        if config is not None:
            from imprint.models.ddpm import DDPMTrainOptions, images_from_unit_range, train_ddpm

            t0 = time.perf_counter()  # the denoiser's range is [-1, 1], the images' [0, 1] (the prior's y(x))
            unet = train_ddpm(images_from_unit_range(splits.public).to(device), splits.public_labels.to(device), seed,
                              config, DDPMTrainOptions(n_steps=options.ddpm_steps, batch_size=64), device)
            seconds["seconds_ddpm"] = time.perf_counter() - t0
        if path is not None:
            tensors = {f"target.{k}": v for k, v in model.state_dict().items()}
            if unet is not None:
                tensors.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
            atomic_save_tensors(path, tensors, {"key": key, "target_accuracy": acc, "seconds": seconds})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if unet is not None:
        for p in unet.parameters():
            p.requires_grad_(False)
    return Setting(options, seed, splits, cross, cross_labels.long(), model, acc, unet, abar, device, seconds=seconds)


# --------------------------------------------------------------------------------------------- validation

def check_adapter(model: nn.Module, lora_a: Mapping[str, Tensor], name: str = "lora_a") -> None:
    """Every factor ``A`` must be ``[r, in]`` of a linear weight of ``model`` with ``1 <= r``."""
    params = dict(model.named_parameters())
    for layer, a in lora_a.items():
        if layer not in params or params[layer].ndim != 2:
            raise ValueError(f"{name}[{layer!r}]: not a weight matrix of the model (expected one of "
                             f"{lora_targets(model)})")
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != params[layer].shape[1]:
            raise ValueError(f"{name}[{layer!r}] has shape {tuple(a.shape)}: expected [r, "
                             f"{params[layer].shape[1]}] with r >= 1 (the input width of {layer})")


def check_decoder(decoder: LearnedDecoder, layer: str, weight_shape: Sequence[int], n_features: int,
                  name: str = "decoder") -> None:
    """A learned decoder must read ``n_features`` numbers and write a gradient of ``weight_shape``."""
    if decoder.n_features != n_features or tuple(decoder.target_shape) != tuple(weight_shape):
        raise ValueError(f"{name}[{layer!r}] maps {decoder.n_features} features to {tuple(decoder.target_shape)}: "
                         f"expected {n_features} features (the update of {layer}) to {tuple(weight_shape)}")


def check_cell(setting: Setting, options: CellOptions) -> None:
    """Everything about a cell that depends on the data and the model, before any compute."""
    n_private = setting.splits.private.shape[0]
    if options.batch_size > n_private:
        raise ValueError(f"batch_size={options.batch_size}: expected at most the private set's {n_private} images")
    params = dict(setting.model.named_parameters())
    widths = {n: params[n].shape[1] for n in lora_targets(setting.model)}
    if options.rank > min(widths.values()):
        raise ValueError(f"rank={options.rank}: expected at most the smallest input width of an adapted layer "
                         f"({widths})")
    n_proxy = setting.splits.public.shape[0] if options.proxy == "in" else setting.cross.shape[0]
    if max(options.pair_batch_sizes) > n_proxy:
        raise ValueError(f"pair_batch_sizes={options.pair_batch_sizes}: the largest exceeds the {n_proxy} proxy images")
    if options.sds_weight > 0 and setting.unet is None:
        raise ValueError(f"sds_weight={options.sds_weight}: expected a setting with a prior (ddpm_steps > 0)")
    n_test = round(options.n_pairs * options.test_fraction)
    if n_test < 2 or options.n_pairs - n_test < 8:
        raise ValueError(f"n_pairs={options.n_pairs}, test_fraction={options.test_fraction}: expected at least 2 "
                         "test pairs and 8 training pairs")


# ------------------------------------------------------------------------------------------ the LoRA view

class LoRAView(nn.Module):
    """The target seen through its adapter: parameters are the ``B`` factors only (zeros, peft's start),
    ``A`` and the base weights fixed; ``grad_B L = s G A^T`` is what a client's first step shares."""

    def __init__(self, model: nn.Module, lora_a: Mapping[str, Tensor], scaling: float = 1.0):
        super().__init__()
        object.__setattr__(self, "_base", model)  # not a submodule: its weights are not parameters here
        self.names = list(lora_a)
        self.scaling = float(scaling)
        params = dict(model.named_parameters())
        self.b = nn.ParameterDict({n.replace(".", "_"):
                                   nn.Parameter(params[n].new_zeros(params[n].shape[0], a.shape[0]))
                                   for n, a in lora_a.items()})
        for n, a in lora_a.items():
            self.register_buffer("a_" + n.replace(".", "_"), a.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        base = {n: p.detach() for n, p in self._base.named_parameters()}
        adapted = {n: base[n] + self.scaling * self.b[n.replace(".", "_")] @ getattr(self, "a_" + n.replace(".", "_"))
                   for n in self.names}
        return functional_call(self._base, {**base, **adapted}, (x,))


# --------------------------------------------------------------------------------------------- the cell

@dataclass
class CellResult:
    """A cell's numbers (``record``: flat, JSON-ready), images (``images``: per attack, the matched
    reconstruction of every private image, ``[n, 1, H, W]``) and the wall seconds of its stages
    (``seconds``: ``pairs``, ``decoders``, ``client``, ``inversion``, ``scoring``; those of the run that
    computed it when the cell is read back)."""

    record: dict
    images: dict[str, Tensor]
    private: Tensor
    seconds: dict = field(default_factory=dict)


class _StageClock:
    """Wall seconds per stage of a cell (summed over the laps of one stage), the device synchronised at
    each lap so that queued GPU work is charged to the stage that queued it."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.totals: dict[str, float] = {}
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        return dict(self.totals)


def _psnr(a: Tensor, b: Tensor) -> Tensor:
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _judge(candidates: Tensor, setting: Setting, baseline):
    """Chapter 01's scores of ``candidates`` against the first ``len(candidates)`` private images, matched
    one to one within their labels."""
    from imprint.reconstruction.evaluation import score_candidates

    s = setting.splits
    n = candidates.shape[0]
    priv, labels = s.private[:n], s.private_labels[:n]
    d = priv[0].numel()
    return score_candidates(candidates.reshape(n, d), priv.reshape(n, d), torch.zeros(d), tuple(priv.shape[1:]),
                            baseline, train_targets=labels, candidate_targets=labels)


def _score(candidates: Tensor, setting: Setting, baseline) -> tuple[dict, Tensor]:
    n = candidates.shape[0]
    priv = setting.splits.private[:n]
    scores = _judge(candidates, setting, baseline)
    matched = candidates[scores.match]
    psnr = _psnr(matched.cpu(), priv)
    bar = torch.maximum(baseline.nearest_heldout_ssim, _template_ssim(setting, n, baseline))
    return {"psnr": float(psnr.mean()), "ssim": float(scores.ssim.mean()), "memorised": scores.memorisation_count,
            "beyond_template": int((scores.ssim > bar).sum()),
            "psnr_per_image": psnr.tolist(), "ssim_per_image": scores.ssim.tolist()}, matched.cpu()


def _template_ssim(setting: Setting, n: int, baseline) -> Tensor:
    """Per private image, the SSIM the template scores (through the very judge :func:`_score` uses, so
    that the template ties with itself): the second bar of ``beyond_template``."""
    key = ("template_ssim", n)
    if key not in setting.cache:
        setting.cache[key] = _judge(template_images(setting, n), setting, baseline).ssim
    return setting.cache[key]


def _baseline(setting: Setting, n: int):
    from imprint.reconstruction.evaluation import baseline_scores

    key = ("baseline", n)
    if key not in setting.cache:
        s = setting.splits
        d = s.private[0].numel()
        setting.cache[key] = baseline_scores(s.private[:n].reshape(n, d), s.private_labels[:n],
                                             s.heldout.reshape(-1, d), s.heldout_labels, torch.zeros(d),
                                             tuple(s.private.shape[1:]))
    return setting.cache[key]


class _Attack(NamedTuple):
    """One attack's inversion: a target gradient per private batch, the layer weights (``None``: all 1),
    and whether the prior joins the matching."""

    targets: Sequence[Mapping[str, Tensor]]
    weights: Sequence[float] | None
    prior: bool


def _invert(model: nn.Module, attacks: Mapping[str, _Attack], setting: Setting, options: CellOptions,
            seed: int) -> dict[str, Tensor]:
    """Every private batch inverted from each attack's target gradient, all (batch, attack) pairs through
    one model as one batch of targets (:func:`invert_gradients_batch`, each with its batch's labels); per
    attack, the batches' reconstructions concatenated. Batch ``k`` starts its restarts from the seed
    ``seed + 1000 k`` and its attacks with the prior draw from streams seeded by the batch alone, so an
    attack's reconstructions do not depend on which other attacks or batches share the optimisation. The
    restarts start from ``N(mean, std^2)`` of the public images' pixels (the anchor's ``randn`` in its
    normalised space)."""
    s = setting.splits
    b = options.batch_size
    shape = (b, *s.private.shape[1:])
    names = list(attacks)
    n_batches = len(attacks[names[0]].targets)
    jobs = [(k, a) for k in range(n_batches) for a in names]
    batch_labels = [s.private_labels[k * b:(k + 1) * b] for k in range(n_batches)]
    labels = torch.stack([batch_labels[k] for k, _ in jobs]).to(setting.device)
    with_prior = [(k, a) for k, a in jobs if attacks[a].prior]
    prior = None
    if with_prior:  # the denoiser sees the stack [m, restarts, b, ...] flattened: each target's labels per restart
        prior_labels = torch.cat([batch_labels[k].repeat(options.restarts) for k, _ in with_prior])
        prior = sds_priors(unet_epsilon(setting.unet, prior_labels.to(setting.device)), setting.alphas_cumprod,
                           [seed + 7919 * k for k, _ in with_prior], SDSOptions(box=(0.0, 1.0)),
                           device=setting.device)
    init_mean, init_std = init_statistics(s.public)
    results = invert_gradients_batch(model, [attacks[a].targets[k] for k, a in jobs], labels, shape,
                                     steps=options.invert_steps, lr=options.invert_lr, tv_weight=options.tv_weight,
                                     restarts=options.restarts, seed=[seed + 1000 * k for k, _ in jobs],
                                     device=setting.device, weights=[attacks[a].weights for _, a in jobs],
                                     prior=prior, prior_weights=[options.sds_weight if attacks[a].prior else 0.0
                                                                 for _, a in jobs],
                                     init_mean=init_mean, init_std=init_std, prior_balance=options.sds_balance)
    out: dict[str, list[Tensor]] = {a: [] for a in names}
    for (_, a), res in zip(jobs, results):  # batch-major: each attack's batches in order
        out[a].append(res.images.detach().cpu())
    return {a: torch.cat(v) for a, v in out.items()}


def init_statistics(public: Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the public images' pixels: the inversion's restarts start from
    ``N(mean, std^2)``, what the anchors' ``randn`` in their normalised space is in pixels."""
    return float(public.double().mean()), float(public.double().std())


def template_images(setting: Setting, n: int) -> Tensor:
    """The template control: for each of the first ``n`` private images, the mean public image of its class
    (of all public images when the class has none), ``[n, 1, H, W]``. It knows no private image, so what
    it "memorises" is what the criterion grants a blurry average face or digit."""
    s = setting.splits
    out = []
    for label in s.private_labels[:n].tolist():
        same = s.public[s.public_labels == label]
        out.append((same if same.shape[0] else s.public).mean(0))
    return torch.stack(out)


def _full_targets(model: nn.Module, layer_grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A gradient for every parameter: the given layers', zeros elsewhere (weighted zero in the match)."""
    return {n: layer_grads[n] if n in layer_grads else torch.zeros_like(p) for n, p in model.named_parameters()}


def _layer_weights(model: nn.Module, layers: Sequence[str]) -> list[float]:
    return [1.0 if n in layers else 0.0 for n, _ in model.named_parameters()]


def _attack_key(attack: str, options: CellOptions) -> tuple:
    """The cache key of an attack's scores: what its inversion depends on beyond the setting."""
    key = ("attack", attack, options.batch_size, options.invert_steps, options.invert_lr, options.tv_weight,
           options.restarts)
    if attack == "template":  # no inversion: depends on the private images used alone
        return ("attack", attack, options.batch_size)
    if attack.startswith("lora"):  # the direct attack needs no proxy: shared by both proxy distributions
        key = key + (options.rank, options.lora_lr)
    if attack.endswith("_sds"):
        key = key + (options.sds_weight,) + (() if options.sds_balance == "absolute" else (options.sds_balance,))
    return key


def _random_targets(model: nn.Module, true_grads: Sequence[Mapping[str, Tensor]], layers: Sequence[str],
                    seed: int) -> list[dict[str, Tensor]]:
    """The control's targets: per private batch and adapted layer, a standard normal draw scaled to the norm
    of the true gradient, zeros elsewhere."""
    gen = torch.Generator().manual_seed(seed + 4242)
    targets = []
    for g in true_grads:
        rnd = {}
        for n in layers:
            z = torch.randn(g[n].shape, generator=gen, dtype=torch.float64)
            rnd[n] = (z * g[n].norm().double().cpu() / z.norm()).to(g[n].dtype).to(g[n].device)
        targets.append(_full_targets(model, rnd))
    return targets


def _split_pairs(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    n_test = int(round(n * test_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 31))
    return order[n_test:].sort().values, order[:n_test].sort().values


CELL_FILE = "cell.safetensors"


def run_cell(setting: Setting, options: CellOptions, folder: str | Path,
             attacks: Sequence[str] = ATTACKS, keep_pairs: bool = True) -> CellResult:
    """One rank and one proxy distribution on ``setting`` (see the module's docstring). ``folder`` holds the
    proxy pairs' shards (resumed when present) and, once the cell is done, its result (``cell.safetensors``,
    written atomically): a later call with the same setting options, seed, cell options and attacks reads
    it back instead of computing, so a killed run resumes at its first unfinished cell. ``attacks`` chooses
    among :data:`ATTACKS`; the ``_sds`` ones run only when ``options.sds_weight > 0``. The true-gradient and
    random attacks do not depend on the rank or the proxy, and are computed once per setting and batch
    size; the direct attacks once per rank. With ``keep_pairs=False`` the pairs' shards are deleted once
    the cell's result is written (their manifest stays: a later call that needs them again regenerates
    them), which keeps a run's results folder small enough to carry to another machine."""
    check_cell(setting, options)
    for a in attacks:
        require_choice("attacks", a, ATTACKS)
    from imprint.runtime.io import _to_jsonable, atomic_save_tensors

    key = _to_jsonable({"setting": asdict(setting.options), "seed": setting.seed, "cell": cell_options_dict(options),
                        "attacks": list(attacks)})
    path = Path(folder) / CELL_FILE
    stored = _read_keyed(path, key)
    if stored is not None:
        meta, tensors = stored
        record = {k: (math.nan if v is None else v) for k, v in meta["record"].items()}
        images = {k[len("images."):]: v for k, v in tensors.items() if k.startswith("images.")}
        return CellResult(record, images, tensors["private"], meta.get("seconds", {}))
    result = _compute_cell(setting, options, folder, attacks)
    atomic_save_tensors(path, {**{f"images.{a}": v for a, v in result.images.items()}, "private": result.private},
                        {"key": key, "record": result.record, "seconds": result.seconds})
    if not keep_pairs:
        for shard in Path(folder).glob("shard-*.safetensors"):
            shard.unlink()
    return result


def _compute_cell(setting: Setting, options: CellOptions, folder: str | Path, attacks: Sequence[str]) -> CellResult:
    model, s, dev, seed = setting.model, setting.splits, setting.device, setting.seed
    clock = _StageClock(dev)
    layers = lora_targets(model)
    params = dict(model.named_parameters())
    lora_a = init_lora_factors(model, options.rank, seed)
    check_adapter(model, lora_a)
    scaling, lr = 1.0, options.lora_lr

    # 1. proxy pairs
    proxy_x, proxy_y = ((s.public, s.public_labels) if options.proxy == "in" else (setting.cross, setting.cross_labels))
    pair_options = PairOptions(n_pairs=options.n_pairs, shard_size=options.shard_size,
                               batch_sizes=tuple(options.pair_batch_sizes), steps=tuple(options.pair_steps), lr=lr,
                               scaling=scaling, seed=seed)
    generate_pairs(folder, model, proxy_x.to(dev), proxy_y.to(dev), lora_a, pair_options)
    pairs = load_pairs(folder)
    clock.lap("pairs")
    train_rows, test_rows = _split_pairs(pairs.n, options.test_fraction, seed)
    test_steps = pairs.steps[test_rows]

    # 2. decoders per layer, scored on held-out proxy pairs
    record: dict = {"rank": options.rank, "proxy": options.proxy, "seed": seed, "batch_size": options.batch_size,
                    "domain": setting.options.domain, "target_accuracy": setting.target_accuracy}
    dec_opts = DecoderOptions(hidden=tuple(options.decoder_hidden), loss=options.decoder_loss, lr=options.decoder_lr,
                              epochs=options.decoder_epochs, batch_size=64,
                              patience=max(5, options.decoder_epochs // 5),
                              seed=seed)
    ridges, learned = {}, {}
    for layer in layers:
        feats = pairs.delta_b[layer].flatten(1).double()
        full = pairs.full[layer].double()
        xf = feats[train_rows]
        alpha = options.ridge_alpha * float(xf.pow(2).sum(1).mean().clamp_min(1e-30))
        ridges[layer] = fit_ridge_lift(xf, full[train_rows].flatten(1), alpha=alpha)
        fit = fit_decoder(feats[train_rows].float().to(dev), full[train_rows].float().to(dev), dec_opts)
        learned[layer] = fit.decoder.eval()
        check_decoder(learned[layer], layer, params[layer].shape, feats.shape[1])
        truth = full[test_rows]
        decoded = {
            "lift": min_norm_lift(pairs.delta_w(layer)[test_rows].double(), pairs.lora_a[layer].double(), lr=lr,
                                  scaling=scaling),
            "ridge": ridges[layer](feats[test_rows]).unflatten(-1, truth.shape[1:]),
            "learned": learned[layer](feats[test_rows].float().to(dev)).detach().cpu().double(),
        }
        for name, g_hat in decoded.items():
            cos = decoded_cosine(g_hat, truth)
            record[f"cos_{name}_{layer}"] = float(cos.mean())
            for t in sorted(set(test_steps.tolist())):
                record[f"cos_{name}_{layer}_T{t}"] = float(cos[test_steps == t].mean())
    for name in DECODERS:
        record[f"cos_{name}"] = float(np.mean([record[f"cos_{name}_{layer}"] for layer in layers]))
    chosen = max(DECODERS, key=lambda name: record[f"cos_{name}"])
    record["chosen_decoder"] = chosen
    clock.lap("decoders")

    # 3. the private client's update, batch by batch
    b = options.batch_size
    n_batches = s.private.shape[0] // b
    n_used = n_batches * b
    x_priv, y_priv = s.private[:n_used].to(dev), s.private_labels[:n_used].to(dev)
    client = lora_step_pairs(model, x_priv, y_priv, lora_a, lr=lr, scaling=scaling, batch_size=b)
    true_grads = [model_gradients(model, x_priv[k * b:(k + 1) * b], y_priv[k * b:(k + 1) * b])
                  for k in range(n_batches)]
    decoded_private = []
    for k in range(n_batches):
        g = {}
        for layer in layers:
            feats = client.delta_b[layer][k:k + 1].flatten(1).double().cpu()
            ridge_g = ridges[layer](feats).unflatten(-1, params[layer].shape)[0]
            if chosen == "lift":
                g_hat = min_norm_lift(client.delta_w[layer][k].double().cpu(), lora_a[layer].double().cpu(), lr=lr,
                                      scaling=scaling)
            elif chosen == "ridge":
                g_hat = ridge_g
            else:  # the learned decoder's direction with the ridge decoder's norm (the cosine loss fixes no scale)
                g_hat = learned[layer](feats.float().to(dev)).detach().cpu().double()[0]
                g_hat = g_hat * ridge_g.norm() / g_hat.norm().clamp_min(1e-30)
            g[layer] = g_hat.to(params[layer].dtype).to(dev)
        decoded_private.append(g)
    record["cos_private"] = float(np.mean([float(decoded_cosine(decoded_private[k][layer], true_grads[k][layer]))
                                           for k in range(n_batches) for layer in layers]))
    clock.lap("client")

    # 4. inversions and scores: the attacks not cached yet, those through the target as one batch and those
    # through the LoRA view as another
    weights = _layer_weights(model, layers)
    baseline = _baseline(setting, n_used)
    runs = [a for a in attacks if not a.endswith("_sds") or options.sds_weight > 0]
    keys = {a: _attack_key(a, options) for a in runs}
    cached = {a: not a.startswith("decoded") for a in runs}
    pending = [a for a in runs if not (cached[a] and keys[a] in setting.cache)]
    through_model: dict[str, _Attack] = {}
    through_view: dict[str, _Attack] = {}
    random_targets = lora_b_targets = None
    for attack in pending:
        sds = attack.endswith("_sds")
        if attack == "template":
            continue  # no inversion: the class means of the public images
        if attack == "true_all":
            through_model[attack] = _Attack(true_grads, None, False)
        elif attack == "true":
            through_model[attack] = _Attack([_full_targets(model, {n: g[n] for n in layers}) for g in true_grads],
                                            weights, False)
        elif attack in ("random", "random_sds"):  # the same random gradients, without and with the prior
            if random_targets is None:
                random_targets = _random_targets(model, true_grads, layers, seed)
            through_model[attack] = _Attack(random_targets, weights, sds)
        elif attack.startswith("decoded"):
            through_model[attack] = _Attack([_full_targets(model, g) for g in decoded_private], weights, sds)
        else:
            if lora_b_targets is None:
                lora_b_targets = [{f"b.{n.replace('.', '_')}": -client.delta_b[n][k] / lr for n in layers}
                                  for k in range(n_batches)]
            through_view[attack] = _Attack(lora_b_targets, None, sds)
    candidates: dict[str, Tensor] = {}
    if through_model:
        candidates.update(_invert(model, through_model, setting, options, seed))
    if through_view:
        candidates.update(_invert(LoRAView(model, lora_a, scaling).to(dev), through_view, setting, options, seed))
    if "template" in pending:
        candidates["template"] = template_images(setting, n_used)
    if pending:
        clock.lap("inversion")
    scored = {a: _score(candidates[a], setting, baseline) for a in pending}
    if pending:
        clock.lap("scoring")
    setting.cache.update({keys[a]: scored[a] for a in pending if cached[a]})
    images: dict[str, Tensor] = {}
    for attack in runs:
        scores, matched = scored[attack] if attack in scored else setting.cache[keys[attack]]
        images[attack] = matched
        for k_, v in scores.items():
            record[f"{attack}_{k_}"] = v
    record["n_private_used"] = n_used
    return CellResult(record, images, s.private[:n_used], clock.seconds())


def cell_options_dict(options: CellOptions) -> dict:
    """The options as plain JSON values."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}


# ------------------------------------------------------------------------------------- over seeds and ranks

def interval(values: Sequence, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over seeds (``nan`` bounds for a single seed)."""
    from scipy.stats import t as student

    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        raise ValueError("values is empty: expected one number per seed")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = float(student.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def summary_table(records: Sequence[Mapping]) -> list[dict]:
    """One row per (proxy, rank): every numeric field of the cells' records as mean, low and high over
    seeds (``<key>``, ``<key>_lo``, ``<key>_hi``), the per-seed values of the memorisation counts."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in records:
        groups.setdefault((r["proxy"], r["rank"]), []).append(r)
    rows = []
    for (proxy, rank), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        row: dict = {"proxy": proxy, "rank": rank, "n_seeds": len(group), "seeds": [g["seed"] for g in group],
                     "chosen_decoder": [g["chosen_decoder"] for g in group]}
        for key, value in group[0].items():
            if key in ("rank", "seed", "batch_size") or isinstance(value, (str, list, bool)):
                continue
            mean, lo, hi = interval([g[key] for g in group])
            row[key], row[f"{key}_lo"], row[f"{key}_hi"] = mean, lo, hi
            if key.endswith(("_memorised", "_beyond_template")):
                row[f"{key}_per_seed"] = [int(g[key]) for g in group]
        rows.append(row)
    return rows


def _count_key(row: Mapping, attack: str) -> str:
    """The count the rule reads: images memorised beyond the template where the row has it for the attack
    and its control, the plain memorisation count otherwise (records written before the template)."""
    both = all(f"{a}_beyond_template_per_seed" in row for a in (attack, CONTROLS[attack]))
    return "beyond_template" if both else "memorised"


def attack_works(row: Mapping, attack: str) -> bool:
    """The chapter's rule: an attack works in a cell when its count of images memorised beyond the template
    (SSIM to the private image above both the nearest held-out image's and the template's, the class mean
    of the public images, which knows nothing private) is at least one on average over seeds and exceeds
    its control's (:data:`CONTROLS`: the random gradient, under the prior for an attack with the prior) on
    every seed."""
    key = _count_key(row, attack)
    mine, control = row.get(f"{attack}_{key}_per_seed"), row.get(f"{CONTROLS[attack]}_{key}_per_seed")
    if mine is None or control is None:
        return False
    return float(np.mean(mine)) >= 1 and all(a > c for a, c in zip(mine, control))


def chapter_metrics(table: Sequence[Mapping], attacks: Sequence[str], layers: Sequence[str],
                    sds_min_rank: int) -> dict:
    """The scalars the chapter glues, and the verdict sentences built from them."""
    out: dict = {}
    proxies = sorted({r["proxy"] for r in table})
    ranks = sorted({r["rank"] for r in table})
    lo_rank, hi_rank = ranks[0], ranks[-1]
    out["low_rank"], out["high_rank"] = lo_rank, hi_rank
    pick = {(r["proxy"], r["rank"]): r for r in table}
    for p in proxies:
        for d in DECODERS:
            out[f"cos_{d}_{p}_low"] = pick[(p, lo_rank)][f"cos_{d}"]
            out[f"cos_{d}_{p}_high"] = pick[(p, hi_rank)][f"cos_{d}"]
        wins = [r for r in ranks
                if pick[(p, r)]["cos_learned"] > max(pick[(p, r)]["cos_lift"], pick[(p, r)]["cos_ridge"])]
        out[f"learned_wins_{p}"] = len(wins)
        out[f"cos_private_{p}_high"] = pick[(p, hi_rank)]["cos_private"]
    out["n_ranks"] = len(ranks)
    main = "cross" if "cross" in proxies else proxies[0]
    out["main_proxy"] = main
    for a in attacks:
        if f"{a}_psnr" not in pick[(main, hi_rank)]:
            continue
        out[f"{a}_psnr_low"] = pick[(main, lo_rank)][f"{a}_psnr"]
        out[f"{a}_psnr_high"] = pick[(main, hi_rank)][f"{a}_psnr"]
        out[f"{a}_ssim_high"] = pick[(main, hi_rank)][f"{a}_ssim"]
        out[f"{a}_memorised_total"] = int(sum(sum(pick[(main, r)][f"{a}_memorised_per_seed"]) for r in ranks))
        if f"{a}_beyond_template_per_seed" in pick[(main, hi_rank)]:
            out[f"{a}_beyond_template_total"] = int(sum(sum(pick[(main, r)][f"{a}_beyond_template_per_seed"])
                                                        for r in ranks))
        out[f"{a}_cells_work"] = sum(attack_works(pick[(main, r)], a) for r in ranks)
    n_images = int(pick[(main, hi_rank)]["n_private_used"])
    out["n_images_per_cell"] = n_images
    working = [f"{a} at r = {r}" for a in attacks if a not in CONTROL_ATTACKS for r in ranks
               if attack_works(pick[(main, r)], a)]
    out["working_text"] = ("by that rule, no attack works in any cell" if not working
                           else "by that rule, these attacks work: " + ", ".join(working))
    decoder_words = []
    for p in proxies:
        n = out[f"learned_wins_{p}"]
        decoder_words.append(f"with {p}-distribution proxies the learned decoder has the highest held-out cosine "
                             f"at {n} of {len(ranks)} ranks")
    out["decoder_text"] = "; ".join(decoder_words)
    if "decoded_sds" in attacks and "decoded_sds_psnr" in pick[(main, hi_rank)]:
        high = [r for r in ranks if r >= sds_min_rank]
        key = _count_key(pick[(main, high[0])], "decoded_sds") if high else "memorised"
        mem = int(sum(sum(pick[(main, r)][f"decoded_sds_{key}_per_seed"]) for r in high)) if high else 0
        ctrl = int(sum(sum(pick[(main, r)][f"random_sds_{key}_per_seed"]) for r in high)) if high else 0
        out["sds_high_memorised"], out["random_sds_high_memorised"] = mem, ctrl
        criterion = "the memorisation criterion" + (" beyond the template" if key == "beyond_template" else "")
        if not high:
            out["sds_text"] = f"no rank of this run reaches {sds_min_rank}, so the prior's target is not tested"
        elif mem > 0 and ctrl == 0:
            out["sds_text"] = (f"at ranks of at least {sds_min_rank} the decoded attack with the prior recovers "
                               f"{mem} images that meet {criterion} and the random gradient under "
                               "the same prior none")
        else:
            out["sds_text"] = (f"at ranks of at least {sds_min_rank} the decoded attack with the prior recovers "
                               f"{mem} images that meet {criterion}, the random gradient under the "
                               f"same prior {ctrl}: "
                               "the target is not met")
    else:
        out["sds_text"] = "the prior was not run (sds_weight is 0)"
    return out


# ------------------------------------------------------------------------------------------------ figures

_STYLE = {"lift": "tab:grey", "ridge": "tab:blue", "learned": "tab:orange"}
_ATTACK_COLOURS = {"true_all": "tab:brown", "true": "black", "decoded": "tab:blue", "lora": "tab:green",
                   "random": "tab:red", "template": "tab:cyan",
                   "decoded_sds": "tab:purple", "lora_sds": "tab:olive", "random_sds": "tab:pink"}


def _band(ax, x, rows, key, **kw):
    y = np.array([r[key] for r in rows])
    lo = np.array([r[f"{key}_lo"] for r in rows])
    hi = np.array([r[f"{key}_hi"] for r in rows])
    line, = ax.plot(x, y, marker="o", **kw)
    if np.isfinite(lo).all():
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)


def plot_cosines(table: Sequence[Mapping], layers: Sequence[str]):
    """Decoded-vs-true cosine on held-out proxy pairs against the rank, one panel per layer; solid
    in-distribution proxies, dashed cross-distribution."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for proxy, ls in (("in", "-"), ("cross", "--")):
            rows = sorted([r for r in table if r["proxy"] == proxy], key=lambda r: r["rank"])
            if not rows:
                continue
            x = [r["rank"] for r in rows]
            for d in DECODERS:
                _band(ax, x, rows, f"cos_{d}_{layer}", color=_STYLE[d], linestyle=ls, label=f"{d} ({proxy})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_title(layer)
        ax.set_ylim(-0.05, 1.05)
    axes[0, 0].set_ylabel("cosine(decoded, true)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_psnr(table: Sequence[Mapping], attacks: Sequence[str], proxy: str):
    """PSNR of the matched reconstructions against the rank for one proxy distribution, mean and interval
    over seeds; the true-gradient and random attacks do not depend on the rank."""
    import matplotlib.pyplot as plt

    rows = sorted([r for r in table if r["proxy"] == proxy], key=lambda r: r["rank"])
    x = [r["rank"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for a in attacks:
        if f"{a}_psnr" not in rows[0]:
            continue
        dotted = a in ("true", "random", "random_sds", "true_all", "template")
        _band(ax, x, rows, f"{a}_psnr", color=_ATTACK_COLOURS[a], linestyle=":" if dotted else "-",
              label=a)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("PSNR (dB)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)  # beside the lines
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_grid(cells: Mapping[int, CellResult], attacks: Sequence[str], n_show: int = 4):
    """Rows: the private images, then each attack's matched reconstructions; columns: the ranks."""
    import matplotlib.pyplot as plt

    ranks = sorted(cells)
    first = cells[ranks[0]]
    shown = [a for a in attacks if a in first.images]
    n = min(n_show, first.private.shape[0])
    fig, axes = plt.subplots(1 + len(shown), len(ranks), figsize=(1.0 + 1.1 * n * len(ranks) / 2,
                                                                  0.9 * (1 + len(shown))), squeeze=False)

    def tile(x):
        return torch.cat(list(x[:n, 0].clamp(0, 1)), dim=-1).numpy()

    for j, r in enumerate(ranks):
        cell = cells[r]
        panels = [("private", cell.private)] + [(a, cell.images[a]) for a in shown]
        for i, (name, imgs) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(tile(imgs), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"r = {r}", fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    plt.close(fig)
    return fig
