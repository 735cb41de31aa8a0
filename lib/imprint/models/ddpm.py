"""A class-conditional DDPM on diffusers, trained and sampled as an ensemble of independent models.

Used by the self-consuming diffusion chapter (04). The denoiser is a diffusers ``UNet2DModel`` whose class
embedding has one extra row, the null label used for classifier-free guidance; the noise schedule is a
diffusers ``DDPMScheduler`` (linear betas, T = 500 by default). Training minimises the epsilon-prediction
loss of Ho et al. (2020), E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)||^2, with the
label replaced by the null label with probability ``label_dropout``; sampling is ancestral DDPM with the
guided prediction (1 + w) eps(x, c) - w eps(x, null) (Ho & Salimans 2022). Several models (seeds, or the
chains of the self-consuming loop) are trained and sampled together: their parameters are stacked along a
leading member axis and, on a GPU, evaluated with ``torch.func.vmap``; every member draws its batches and
noise from its own generator, so a member's result depends on its own seed and data only. Timesteps in the
public API follow the paper's convention t in [1, T]; diffusers indexes the same steps as t - 1.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from imprint.runtime.checks import require_choice, require_float, require_int

Precision = Literal["fp32", "tf32", "bf16"]
_clock = time.monotonic  # the wall clock of time-based checkpoints (a test replaces it by a counter)


@dataclass(frozen=True)
class DDPMConfig:
    """Architecture of the denoiser and the noise schedule.

    ``block_out_channels`` has one entry per resolution level (each level but the last halves the image);
    ``norm_num_groups`` must divide every entry. Class ``n_classes`` (one past the last real class) is the
    null label of classifier-free guidance.
    """

    image_size: int = 8
    in_channels: int = 1
    n_classes: int = 10
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block: bool = True
    n_train_timesteps: int = 500
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        require_int("image_size", self.image_size, minimum=4)
        require_int("in_channels", self.in_channels, minimum=1)
        require_int("n_classes", self.n_classes, minimum=1)
        require_int("layers_per_block", self.layers_per_block, minimum=1)
        require_int("norm_num_groups", self.norm_num_groups, minimum=1)
        require_int("n_train_timesteps", self.n_train_timesteps, minimum=2)
        if len(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels={self.block_out_channels!r}: expected at least one level")
        for ch in self.block_out_channels:
            require_int("block_out_channels", ch, minimum=1)
            if ch % self.norm_num_groups:
                raise ValueError(f"block_out_channels={self.block_out_channels!r}: every entry must be a "
                                 f"multiple of norm_num_groups={self.norm_num_groups}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size={self.image_size}: expected a multiple of {factor} for "
                             f"{len(self.block_out_channels)} resolution levels")
        require_float("beta_start", self.beta_start, minimum=0.0, strict_minimum=True)
        require_float("beta_end", self.beta_end, minimum=self.beta_start, maximum=1.0)
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))

    @property
    def null_label(self) -> int:
        return self.n_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def dim(self) -> int:
        return self.in_channels * self.image_size**2

    def architecture(self) -> dict:
        """Everything that fixes the shapes and meaning of the weights (stored beside checkpoints)."""
        arch = asdict(self)
        arch["block_out_channels"] = list(self.block_out_channels)
        return arch

    @classmethod
    def digits8(cls, **overrides) -> "DDPMConfig":
        """8x8 one-channel digits: two levels (8 -> 4)."""
        return cls(**{"image_size": 8, "block_out_channels": (32, 64), **overrides})

    @classmethod
    def mnist28(cls, **overrides) -> "DDPMConfig":
        """28x28 one-channel MNIST: three levels (28 -> 14 -> 7)."""
        return cls(**{"image_size": 28, "block_out_channels": (32, 64, 64), **overrides})


def build_unet(config: DDPMConfig) -> "UNet2DModel":  # noqa: F821
    """The diffusers ``UNet2DModel`` of ``config`` (no attention; ``n_classes + 1`` class embeddings)."""
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.in_channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2D" if config.mid_block else None, add_attention=False,
        norm_num_groups=config.norm_num_groups, num_class_embeds=config.n_classes + 1,
    )


def build_scheduler(config: DDPMConfig) -> "DDPMScheduler":  # noqa: F821
    """The diffusers ``DDPMScheduler``: linear betas, epsilon prediction, x0 clipped to [-1, 1]."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.n_train_timesteps, beta_start=config.beta_start,
                         beta_end=config.beta_end, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small")


@functools.lru_cache(maxsize=16)
def _alphas_cumprod(config: DDPMConfig) -> Tensor:
    return build_scheduler(config).alphas_cumprod.clone()


def alphas_cumprod(config: DDPMConfig) -> Float[Tensor, " T"]:
    """abar at diffusers' 0-based indices 0..T-1 (a copy; the schedule is computed once per config)."""
    return _alphas_cumprod(config).clone()


@functools.lru_cache(maxsize=16)
def _meta_unet(config: DDPMConfig) -> nn.Module:
    # weightless skeleton for torch.func.functional_call; holds no state, so one per config suffices
    return build_unet(config).to("meta")


def unet_from_state_dict(config: DDPMConfig, state: dict[str, Tensor]) -> nn.Module:
    """The ``UNet2DModel`` of ``config`` holding the tensors of ``state`` (adopted as they are, device and
    dtype included: no initialisation to pay for, no dtype cast of diffusers), in eval mode."""
    unet = copy.deepcopy(_meta_unet(config))
    unet.load_state_dict(state, assign=True)
    return unet.eval()


def alpha_bar(config: DDPMConfig, t: int) -> float:
    """abar_t = prod_{s <= t} (1 - beta_s) for the paper's t in [1, T]."""
    t = check_timestep(config, t)
    return float(_alphas_cumprod(config)[t - 1])


def check_timestep(config: DDPMConfig, t, name: str = "t") -> int:
    return require_int(name, t, minimum=1, maximum=config.n_train_timesteps)


def check_guidance_weight(w, name: str = "guidance_weight") -> float:
    return require_float(name, w, minimum=0.0)


def member_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per member, seeded by that member's seed."""
    gens = []
    for s in seeds:
        g = torch.Generator(device=torch.device(device))
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a seed, a stage code, a generation): independent streams per tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------- ensemble

@dataclass
class DDPMEnsemble:
    """``n_members`` denoisers of one architecture: parameters stacked along a leading member axis.

    ``vectorize`` evaluates all members in one ``torch.func.vmap`` call (fast on a GPU); otherwise a loop
    over members (faster on a CPU). Both give the same function, up to floating-point rounding.
    """

    config: DDPMConfig
    params: dict[str, Tensor]
    buffers: dict[str, Tensor] = field(default_factory=dict)
    vectorize: bool | None = None

    def __post_init__(self):
        self._base = _meta_unet(self.config)
        expected = {k: tuple(v.shape) for k, v in self._base.named_parameters()}
        found = {k: tuple(v.shape[1:]) for k, v in self.params.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))[:3]
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:3]
            raise ValueError(f"parameters do not match the architecture {self.config.architecture()}: "
                             f"missing {missing}, wrong shapes {wrong}")
        sizes = {v.shape[0] for v in self.params.values()}
        if len(sizes) != 1:
            raise ValueError(f"stacked parameters have different member counts {sorted(sizes)}")

    @property
    def n_members(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def _use_vmap(self) -> bool:
        return self.device.type == "cuda" if self.vectorize is None else bool(self.vectorize)

    @classmethod
    def from_models(cls, models: Sequence[nn.Module], config: DDPMConfig, vectorize: bool | None = None):
        from torch.func import stack_module_state

        params, buffers = stack_module_state(list(models))
        return cls(config, {k: v.detach() for k, v in params.items()},
                   {k: v.detach() for k, v in buffers.items()}, vectorize)

    @classmethod
    def initialise(cls, config: DDPMConfig, seeds: Sequence[int], device: torch.device | str = "cpu",
                   vectorize: bool | None = None) -> "DDPMEnsemble":
        """Fresh members; member m uses diffusers' default initialisation under ``seeds[m]``."""
        models = []
        for s in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(s))
                models.append(build_unet(config))
        return cls.from_models(models, config, vectorize).to(device)

    def to(self, device=None, dtype=None) -> "DDPMEnsemble":
        conv = (lambda v: v.to(device=device, dtype=dtype)) if dtype is not None else (lambda v: v.to(device))
        return DDPMEnsemble(self.config, {k: conv(v) for k, v in self.params.items()},
                            {k: conv(v) for k, v in self.buffers.items()}, self.vectorize)

    def select(self, index: Sequence[int]) -> "DDPMEnsemble":
        """The members ``index`` (repeats allowed: a member can be used by several chains)."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.device)
        return DDPMEnsemble(self.config, {k: v.index_select(0, idx) for k, v in self.params.items()},
                            {k: v.index_select(0, idx) for k, v in self.buffers.items()}, self.vectorize)

    def member_params(self, m: int) -> dict[str, Tensor]:
        return {**{k: v[m] for k, v in self.params.items()}, **{k: v[m] for k, v in self.buffers.items()}}

    def model(self, m: int) -> nn.Module:
        """Member ``m`` as an ordinary ``UNet2DModel`` (a copy of its weights), in eval mode."""
        return unet_from_state_dict(self.config, {k: v.detach().clone() for k, v in self.member_params(m).items()})

    def functional(self, params: dict[str, Tensor], x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """eps_theta(x, t, c) of the member whose (unstacked) parameters are ``params``.

        ``t`` holds diffusers' 0-based timestep indices.
        """
        from torch.func import functional_call

        return functional_call(self._base, params, (x,), {"timestep": t, "class_labels": labels}).sample

    def epsilon(self, x: Float[Tensor, "m b c h w"], t: Int[Tensor, "*tb"], labels: Int[Tensor, "*lb"],
                params: dict[str, Tensor] | None = None) -> Float[Tensor, "m b c h w"]:
        """eps_theta for every member; ``t`` and ``labels`` are per member ``[m, b]`` or shared ``[b]``.

        ``t`` holds diffusers' 0-based timestep indices; ``params`` (stacked) overrides the ensemble's own
        parameters (the trainer passes its leaf tensors).
        """
        stacked = {**(self.params if params is None else params), **self.buffers}
        n = x.shape[0]
        t_dim = 0 if (t.dim() == 2 and t.shape[0] == n) else None
        l_dim = 0 if (labels.dim() == 2 and labels.shape[0] == n) else None
        if self._use_vmap():
            from torch.func import vmap

            return vmap(self.functional, in_dims=(0, 0, t_dim, l_dim))(stacked, x, t, labels)
        outs = []
        for m in range(n):
            p = {k: v[m] for k, v in stacked.items()}
            outs.append(self.functional(p, x[m], t[m] if t_dim == 0 else t, labels[m] if l_dim == 0 else labels))
        return torch.stack(outs)

    def state_tensors(self) -> dict[str, Tensor]:
        """Stacked parameters and buffers, for a safetensors checkpoint."""
        return {**{f"params.{k}": v for k, v in self.params.items()},
                **{f"buffers.{k}": v for k, v in self.buffers.items()}}

    @classmethod
    def from_state_tensors(cls, tensors: dict[str, Tensor], config: DDPMConfig, stored_architecture: dict | None,
                           vectorize: bool | None = None, source: str = "checkpoint") -> "DDPMEnsemble":
        """Inverse of :meth:`state_tensors`, refusing weights written for another architecture."""
        if stored_architecture is not None and stored_architecture != config.architecture():
            diff = {k: (stored_architecture.get(k), v) for k, v in config.architecture().items()
                    if stored_architecture.get(k) != v}
            raise ValueError(f"{source} was written for another architecture: (stored, expected) = {diff}")
        params = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
        buffers = {k[len("buffers."):]: v for k, v in tensors.items() if k.startswith("buffers.")}
        return cls(config, params, buffers, vectorize)


def save_ensemble(path: str | Path, ensemble: DDPMEnsemble, metadata: dict | None = None) -> Path:
    """Stacked weights as safetensors with the architecture in the metadata."""
    from imprint.runtime.io import atomic_save_tensors

    return atomic_save_tensors(path, ensemble.state_tensors(),
                               {"architecture": ensemble.config.architecture(), **(metadata or {})})


def load_ensemble(path: str | Path, config: DDPMConfig, device: str | torch.device = "cpu",
                  vectorize: bool | None = None) -> DDPMEnsemble:
    """Weights saved by :func:`save_ensemble`; a file written for another architecture is refused."""
    from imprint.runtime.io import load_tensor_metadata, load_tensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such checkpoint file")
    stored = load_tensor_metadata(path).get("architecture")
    if stored != config.architecture():
        DDPMEnsemble.from_state_tensors({}, config, stored or {}, source=f"checkpoint {str(path)!r}")
    return DDPMEnsemble.from_state_tensors(load_tensors(path, device), config, stored, vectorize,
                                           source=f"checkpoint {str(path)!r}")


# --------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class DDPMTrainOptions:
    """Adam on the epsilon-prediction loss; the learning rate decays linearly to zero over ``n_steps``.

    Batches are drawn uniformly with replacement from each member's training set. ``precision``:
    ``fp32``; ``tf32`` (CUDA matmuls and convolutions in TF32); ``bf16`` (autocast of the forward pass).
    """

    n_steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    label_dropout: float = 0.1
    precision: str = "fp32"
    progress: bool = False

    def __post_init__(self):
        require_int("n_steps", self.n_steps, minimum=1)
        require_int("batch_size", self.batch_size, minimum=1)
        require_float("lr", self.lr, minimum=0.0, strict_minimum=True)
        require_float("label_dropout", self.label_dropout, minimum=0.0, maximum=1.0)
        require_choice("precision", self.precision, ["fp32", "tf32", "bf16"])


@dataclass(frozen=True)
class TrainingBatch:
    x0: Tensor
    labels: Tensor
    t: Tensor
    noise: Tensor


def draw_training_batch(x: Float[Tensor, "n c h w"], labels: Int[Tensor, " n"], batch_size: int,
                        config: DDPMConfig, label_dropout: float, generator: torch.Generator) -> TrainingBatch:
    """Indices, 0-based timesteps, noise and dropped labels of one member's batch, all from ``generator``."""
    dev = generator.device
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator, device=dev)
    t = torch.randint(0, config.n_train_timesteps, (batch_size,), generator=generator, device=dev)
    noise = torch.randn((batch_size, *x.shape[1:]), generator=generator, device=dev)
    drop = torch.rand((batch_size,), generator=generator, device=dev) < label_dropout
    idx = idx.to(x.device)
    lab = torch.where(drop.to(labels.device), torch.full_like(labels[idx], config.null_label), labels[idx])
    return TrainingBatch(x[idx], lab, t.to(x.device), noise.to(x.device))


def diffuse(x0: Float[Tensor, "*b c h w"], noise: Float[Tensor, "*b c h w"], t_index: Int[Tensor, "*b"],
            alphas_cumprod: Float[Tensor, " T"]) -> Float[Tensor, "*b c h w"]:
    """The forward process q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (``t_index`` 0-based)."""
    a = alphas_cumprod[t_index].view(*t_index.shape, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@contextlib.contextmanager
def _precision(precision: str, device: torch.device):
    cuda = device.type == "cuda"
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
            torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _check_training_sets(datasets, config: DDPMConfig) -> None:
    for i, (x, lab) in enumerate(datasets):
        if tuple(x.shape[1:]) != config.image_shape:
            raise ValueError(f"datasets[{i}] has images of shape {tuple(x.shape[1:])}: expected "
                             f"{config.image_shape} for this DDPMConfig")
        if x.shape[0] < 1 or lab.shape != (x.shape[0],):
            raise ValueError(f"datasets[{i}]: {x.shape[0]} images and labels of shape {tuple(lab.shape)}")
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= config.n_classes):
            raise ValueError(f"datasets[{i}] has labels outside [0, {config.n_classes - 1}]")


def _use_cuda_graph(cuda_graph: bool | None, device: torch.device) -> bool:
    if cuda_graph is None:  # opt-in: the graphed path raised a device-side assert on an H200 (04 and 06)
        return False
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device (device is {device})")
    return bool(cuda_graph)


def _training_key(datasets, seeds: Sequence[int], config: DDPMConfig, options: DDPMTrainOptions,
                  init: DDPMEnsemble | None) -> dict:
    """What fixes a training run's trajectory (stored with its checkpoints): a resumed call must match it."""
    data = hashlib.sha256()
    for x, lab in datasets:
        data.update(x.detach().cpu().float().contiguous().numpy().tobytes())
        data.update(lab.detach().cpu().long().contiguous().numpy().tobytes())
    init_digest = None
    if init is not None:
        h = hashlib.sha256()
        for k in sorted(init.params):
            h.update(k.encode())
            h.update(init.params[k].detach().cpu().float().contiguous().numpy().tobytes())
        init_digest = h.hexdigest()
    opts = asdict(options)
    opts.pop("progress")  # showing a bar does not change the numbers
    return {"architecture": config.architecture(), "options": opts, "seeds": [int(s) for s in seeds],
            "data_sha256": data.hexdigest(), "init_sha256": init_digest}


def _global_rng_state(device: torch.device) -> tuple[dict[str, Tensor], dict]:
    """torch (CPU and, on a CUDA device, that device's), numpy's legacy and Python's global RNG states."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.as_tensor(np.asarray(np_state[1], dtype=np.int64)),
               "rng.python": torch.as_tensor(py_state[1], dtype=torch.int64)}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    meta = {"numpy": [str(np_state[0]), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], py_state[2]]}
    return tensors, meta


def _set_global_rng_state(tensors: dict[str, Tensor], meta: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"].cpu())
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), device)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(int(v) for v in tensors["rng.python"].tolist()), gauss_next))


def train_ddpm_ensemble(datasets: Sequence[tuple[Tensor, Tensor]], seeds: Sequence[int], config: DDPMConfig,
                        options: DDPMTrainOptions, device: str | torch.device = "cpu",
                        init: DDPMEnsemble | None = None, vectorize: bool | None = None,
                        cuda_graph: bool | None = None, checkpoint_dir: str | Path | None = None,
                        checkpoint_every: int | None = None, checkpoint_seconds: float | None = None,
                        on_step: Callable[[int], None] | None = None
                        ) -> tuple[DDPMEnsemble, Float[Tensor, "m n_steps"]]:
    """Train one denoiser per ``(datasets[m], seeds[m])``; returns the ensemble and per-step losses.

    Images are ``[n, c, h, w]`` in [-1, 1], labels in ``[0, n_classes)``. ``init`` warm-starts from given
    weights; otherwise member m starts from diffusers' initialisation under ``seeds[m]``. The loss summed
    over members has per-member gradients, and Adam is elementwise, so the stacked optimiser is exactly
    ``M`` independent Adam runs.

    ``cuda_graph=True`` (CUDA only; default off: on an H200 its first steps raised a device-side assert
    that the eager path does not, not yet understood) records the forward pass, the
    backward pass and the Adam update of one step as a CUDA graph after three ordinary steps, and replays it
    for the rest: the same computation without the per-kernel launch cost that dominates a network this
    small. Each step's batch is still drawn outside the graph, from the members' own generators, into the
    graph's input buffers, so both paths see the same batches.

    With ``checkpoint_dir`` the training state (weights, Adam's moments and step counts, the members'
    generators, the losses so far, and the global torch/CUDA, numpy and Python RNG states) is saved
    atomically, with its sha256, after every ``checkpoint_every`` steps, whenever ``checkpoint_seconds``
    of wall time have passed since the last save (or the start), and after the last step. A call with the
    same arguments and folder resumes from the newest valid checkpoint and returns bit-identical weights
    and losses to an uninterrupted run (saving reads the state and draws no random numbers); a folder
    written for other data, seeds, initial weights or options is refused. ``on_step(k)`` is called after
    step k (counted from 1) and its checkpoint, if any; an exception it raises stops the training there.
    """
    if len(datasets) != len(seeds) or len(seeds) < 1:
        raise ValueError(f"datasets has {len(datasets)} entries and seeds {len(seeds)}: expected the same "
                         f"number, at least one")
    _check_training_sets(datasets, config)
    if checkpoint_every is not None:
        require_int("checkpoint_every", checkpoint_every, minimum=1)
    if checkpoint_seconds is not None:
        require_float("checkpoint_seconds", checkpoint_seconds, minimum=0.0, strict_minimum=True)
    if checkpoint_dir is None and (checkpoint_every is not None or checkpoint_seconds is not None):
        raise ValueError(f"checkpoint_every={checkpoint_every!r}, checkpoint_seconds={checkpoint_seconds!r} "
                         f"given without checkpoint_dir: expected a folder to checkpoint into")
    device = torch.device(device)
    if init is not None and init.n_members != len(seeds):
        raise ValueError(f"init has {init.n_members} members: expected {len(seeds)}")
    ckpt, run_key = None, None
    if checkpoint_dir is not None:
        from imprint.runtime.checkpoint import Checkpointer

        ckpt = Checkpointer(checkpoint_dir, keep=2)
        run_key = _training_key(datasets, seeds, config, options, init)
    ens = (init.to(device) if init is not None else
           DDPMEnsemble.initialise(config, [derive_seed(s, 0) for s in seeds], device))
    ens = DDPMEnsemble(config, {k: v.detach().clone().float().requires_grad_(True) for k, v in ens.params.items()},
                       {k: v.detach().clone() for k, v in ens.buffers.items()},
                       vectorize if vectorize is not None else ens.vectorize)
    graphed = _use_cuda_graph(cuda_graph, device)
    leaves = list(ens.params.values())
    if graphed:  # a device-side learning rate and step count, updated in place, so the graph can replay them
        lr = torch.tensor(options.lr, dtype=torch.float32, device=device)
        opt = torch.optim.Adam(leaves, lr=lr, fused=True, capturable=True)
    else:
        lr = None
        opt = torch.optim.Adam(leaves, lr=options.lr, **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    abar = alphas_cumprod(config).to(device=device, dtype=torch.float32)
    gens = member_generators([derive_seed(s, 1) for s in seeds], device)
    data = [(x.to(device, torch.float32), lab.to(device)) for x, lab in datasets]
    losses = torch.zeros(len(seeds), options.n_steps, device=device)  # read back once, at the end
    m, b = len(seeds), options.batch_size
    batch = {"x0": torch.empty(m, b, *config.image_shape, device=device),
             "noise": torch.empty(m, b, *config.image_shape, device=device),
             "t": torch.empty(m, b, dtype=torch.long, device=device),
             "labels": torch.empty(m, b, dtype=torch.long, device=device)}

    def draw(step: int) -> None:
        """Member batches of ``step`` into ``batch``, and the step's learning rate (linear decay to zero)."""
        drawn = [draw_training_batch(x, lab, b, config, options.label_dropout, g) for (x, lab), g in zip(data, gens)]
        for key in batch:
            torch.stack([getattr(d, key) for d in drawn], out=batch[key])
        rate = options.lr * (1.0 - step / options.n_steps)
        if lr is not None:
            lr.fill_(rate)
        else:
            for group in opt.param_groups:
                group["lr"] = rate

    def forward_backward_update() -> Tensor:
        x_t = diffuse(batch["x0"], batch["noise"], batch["t"], abar)
        with _precision(options.precision, device):
            eps = ens.epsilon(x_t, batch["t"], batch["labels"])
        per_member = (eps.float() - batch["noise"]).pow(2).flatten(1).mean(1)
        per_member.sum().backward()
        opt.step()
        return per_member.detach()

    names = list(ens.params)

    def save(completed: int) -> None:
        """The state after ``completed`` steps (read only: no random numbers are drawn)."""
        tensors = {f"params.{k}": v.detach() for k, v in ens.params.items()}
        for k, leaf in zip(names, leaves):
            for slot, value in opt.state.get(leaf, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{k}.{slot}"] = value.detach()
        tensors["generators"] = torch.stack([g.get_state() for g in gens])
        tensors["losses"] = losses[:, :completed]
        rng_tensors, rng_meta = _global_rng_state(device)
        tensors.update(rng_tensors)
        ckpt.save(completed, tensors, {"key": run_key, "n_steps": options.n_steps, "rng": rng_meta})

    start = 0
    state = ckpt.latest(max_unit=options.n_steps) if ckpt is not None else None
    if state is not None:
        if state.meta.get("key") != run_key:
            stored = state.meta.get("key") or {}
            changed = sorted(k for k in set(stored) | set(run_key) if stored.get(k) != run_key.get(k))
            raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} holds a training run with other inputs or "
                             f"settings (differing: {changed}); use a fresh folder or delete it")
        start = state.unit
        t = state.tensors
        with torch.no_grad():
            for k, leaf in ens.params.items():
                leaf.copy_(t[f"params.{k}"])
        slots: dict[str, dict[str, Tensor]] = {}
        for key, value in t.items():
            if key.startswith("optim."):
                name, slot = key[len("optim."):].rsplit(".", 1)
                slots.setdefault(name, {})[slot] = value
        # set directly rather than through load_state_dict, which would deep-copy the param groups and with
        # them the device-side learning rate that the graphed path updates in place
        group = opt.param_groups[0]
        on_device = bool(group.get("capturable") or group.get("fused"))
        for k, leaf in zip(names, leaves):
            if k in slots:  # the step count stays on the CPU unless Adam keeps it on the device (as Adam does)
                opt.state[leaf] = {slot: v.to(leaf.device, copy=True) if (slot != "step" or on_device) else v.clone()
                                   for slot, v in slots[k].items()}
        for g, g_state in zip(gens, t["generators"]):
            g.set_state(g_state.clone())
        losses[:, :start] = t["losses"].to(device)
        _set_global_rng_state(t, state.meta["rng"], device)
        print(f"DDPM training: resumed from the checkpoint of step {start}/{options.n_steps} in "
              f"{str(checkpoint_dir)!r}", file=sys.stderr, flush=True)

    steps = range(start, options.n_steps)
    if options.progress:
        steps = tqdm(steps, desc=f"train {len(seeds)} DDPM", leave=False, initial=start, total=options.n_steps)
    # eager steps warm up the kernels and the optimiser state before a graph is recorded (again after a resume)
    n_eager = start + min(3, options.n_steps - start) if graphed else options.n_steps
    graph, graph_loss = None, None
    side = torch.cuda.Stream(device) if graphed else None
    last_save = _clock()
    for step in steps:
        draw(step)
        if step < n_eager:
            # the first steps also warm up the kernels and the optimiser state before a graph is recorded
            with torch.cuda.stream(side) if graphed else contextlib.nullcontext():
                if graphed:
                    side.wait_stream(torch.cuda.current_stream(device))
                opt.zero_grad(set_to_none=True)
                losses[:, step] = forward_backward_update()
            if graphed:
                torch.cuda.current_stream(device).wait_stream(side)
        else:
            if graph is None:
                opt.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's own memory pool
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    graph_loss = forward_backward_update()
            graph.replay()
            losses[:, step] = graph_loss
        completed = step + 1
        if ckpt is not None:
            now = _clock()
            if (completed == options.n_steps or (checkpoint_every is not None and completed % checkpoint_every == 0)
                    or (checkpoint_seconds is not None and now - last_save >= checkpoint_seconds)):
                save(completed)
                last_save = _clock()
        if on_step is not None:
            on_step(completed)
    trained = DDPMEnsemble(config, {k: v.detach() for k, v in ens.params.items()}, ens.buffers, ens.vectorize)
    return trained, losses.cpu()


def train_ddpm(x: Float[Tensor, "n c h w"], labels: Int[Tensor, " n"], seed: int, config: DDPMConfig,
               options: DDPMTrainOptions, device: str | torch.device = "cpu") -> nn.Module:
    """One denoiser (an ensemble of one), returned as a ``UNet2DModel`` in eval mode."""
    ens, _ = train_ddpm_ensemble([(x, labels)], [seed], config, options, device)
    return ens.model(0)


# --------------------------------------------------------------------------------------------- sampling

def guided_epsilon(eps_conditional: Tensor, eps_unconditional: Tensor, guidance_weight: Tensor | float) -> Tensor:
    """Classifier-free guidance: (1 + w) eps(x, c) - w eps(x, null)."""
    return (1 + guidance_weight) * eps_conditional - guidance_weight * eps_unconditional


@torch.no_grad()
def sample_ddpm_ensemble(ensemble: DDPMEnsemble, labels: Int[Tensor, " n"], guidance_weights: Sequence[float],
                         seeds: Sequence[int], n_steps: int | None = None, progress: bool = False
                         ) -> Float[Tensor, "m n c h w"]:
    """Ancestral DDPM samples of every member, guided with its own weight, from its own seeded noise.

    ``n_steps`` (default T) spreads the sampling steps over [0, T) with diffusers' "leading" spacing.
    Samples are clamped to [-1, 1].
    """
    config = ensemble.config
    m = ensemble.n_members
    if len(guidance_weights) != m or len(seeds) != m:
        raise ValueError(f"guidance_weights has {len(guidance_weights)} entries and seeds {len(seeds)}: "
                         f"expected one per member ({m})")
    for i, w in enumerate(guidance_weights):
        check_guidance_weight(w, f"guidance_weights[{i}]")
    n_steps = config.n_train_timesteps if n_steps is None else n_steps
    require_int("n_steps", n_steps, minimum=1, maximum=config.n_train_timesteps)
    if labels.dim() != 1 or labels.numel() < 1:
        raise ValueError(f"labels has shape {tuple(labels.shape)}: expected a non-empty vector")
    if int(labels.min()) < 0 or int(labels.max()) >= config.n_classes:
        raise ValueError(f"labels must lie in [0, {config.n_classes - 1}]")
    device = ensemble.device
    labels = labels.to(device)
    n = labels.shape[0]
    scheduler = build_scheduler(config)
    scheduler.set_timesteps(n_steps)
    gens = member_generators([derive_seed(s, 2) for s in seeds], device)
    from diffusers.utils.torch_utils import randn_tensor

    x = randn_tensor((m, n, *config.image_shape), generator=gens, device=device, dtype=ensemble.dtype)
    w = torch.tensor([float(v) for v in guidance_weights], device=device, dtype=ensemble.dtype).view(m, 1, 1, 1, 1)
    guided = any(float(v) != 0.0 for v in guidance_weights)
    both_labels = torch.cat([labels, torch.full_like(labels, config.null_label)])
    timesteps = [int(t) for t in scheduler.timesteps]
    for t in (tqdm(timesteps, desc="sample", leave=False) if progress else timesteps):
        t_vec = torch.full((2 * n if guided else n,), t, device=device, dtype=torch.long)
        if guided:
            eps_both = ensemble.epsilon(torch.cat([x, x], 1), t_vec, both_labels)
            eps = guided_epsilon(eps_both[:, :n], eps_both[:, n:], w)
        else:
            eps = ensemble.epsilon(x, t_vec, labels)
        x = scheduler.step(eps, t, x, generator=gens).prev_sample
    return x.clamp(-1, 1)


def sample_ddpm(model: nn.Module, config: DDPMConfig, labels: Int[Tensor, " n"], guidance_weight: float,
                seed: int, n_steps: int | None = None) -> Float[Tensor, "n c h w"]:
    """Samples of one ``UNet2DModel`` (see :func:`sample_ddpm_ensemble`)."""
    check_guidance_weight(guidance_weight)
    ens = DDPMEnsemble.from_models([model], config).to(next(model.parameters()).device)
    return sample_ddpm_ensemble(ens, labels, [guidance_weight], [seed], n_steps)[0]


def balanced_labels(n: int, n_classes: int) -> Int[Tensor, " n"]:
    """0, 1, ..., n_classes - 1, 0, 1, ...: ``n`` labels as evenly spread as possible."""
    require_int("n", n, minimum=1)
    return torch.arange(n) % n_classes


def images_to_unit_range(x: Float[Tensor, "*b"]) -> Float[Tensor, "*b"]:
    """[-1, 1] (the diffusion model's range) to [0, 1]."""
    return (x + 1) / 2


def images_from_unit_range(x: Float[Tensor, "*b"]) -> Float[Tensor, "*b"]:
    """[0, 1] to [-1, 1]."""
    return 2 * x - 1


__all__ = [
    "DDPMConfig", "DDPMEnsemble", "DDPMTrainOptions", "alpha_bar", "alphas_cumprod", "balanced_labels", "build_scheduler",
    "build_unet", "check_guidance_weight", "check_timestep", "derive_seed", "diffuse", "draw_training_batch",
    "guided_epsilon", "images_from_unit_range", "images_to_unit_range", "load_ensemble", "sample_ddpm",
    "sample_ddpm_ensemble", "save_ensemble", "train_ddpm", "train_ddpm_ensemble",
]
