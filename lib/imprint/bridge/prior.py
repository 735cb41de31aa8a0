"""A diffusion prior for gradient inversion by score distillation (SDS; Poole et al. 2022, DreamFusion).

A denoiser ε̂(x_t, t) trained on public images of the private domain's kind scores how plausible an image
is. For an image x in the attack's box [lo, hi], mapped to the denoiser's range [-1, 1] as y(x), one draw
of t ~ U[t_min, t_max] (as fractions of the T training steps) and ε ~ N(0, I) gives

    x_t = sqrt(ᾱ_t) y(x) + sqrt(1 - ᾱ_t) ε,      g_SDS(x) = w(t) (ε̂(x_t, t) - ε) · dy/dx,

the gradient of the denoising loss with the denoiser's Jacobian left out (a stop-gradient through ε̂).
Descending g_SDS moves x towards images the denoiser finds likely: for data N(μ, σ²I), where
ε̂(x_t, t) = sqrt(1 - ᾱ)(x_t - sqrt(ᾱ) μ) / (ᾱσ² + 1 - ᾱ), its mean over ε is
sqrt(ᾱ(1 - ᾱ)) (y - μ) / (ᾱσ² + 1 - ᾱ) · dy/dx, which points from μ to y. The weighting ``w(t)`` is
``"sds"`` (1 - ᾱ_t, DreamFusion's) or ``"uniform"`` (1).

:func:`sds_prior` returns the callable that :func:`imprint.bridge.inversion.invert_gradients` adds,
times ``prior_weight``, to the matching loss's gradient before the signed step; :func:`sds_priors` the one
of :func:`imprint.bridge.inversion.invert_gradients_batch`, one seeded stream per target and one denoiser
call for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from imprint.runtime.checks import require_choice, require_float

WEIGHTINGS = ("sds", "uniform")

EpsilonModel = Callable[[Tensor, Tensor], Tensor]  # (x_t [n, c, h, w], t_index [n]) -> ε̂ [n, c, h, w]


@dataclass(frozen=True)
class SDSOptions:
    """The timestep range as fractions of the T training steps, the weighting, and the box of the images
    the attack optimises (mapped affinely onto the denoiser's [-1, 1])."""

    t_min: float = 0.02
    t_max: float = 0.98
    weighting: str = "sds"
    box: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        require_float("t_min", self.t_min, minimum=0.0)
        require_float("t_max", self.t_max, maximum=1.0)
        if not self.t_min < self.t_max:
            raise ValueError(f"t_min={self.t_min}, t_max={self.t_max}: expected 0 <= t_min < t_max <= 1")
        require_choice("weighting", self.weighting, WEIGHTINGS)
        if len(self.box) != 2 or not float(self.box[0]) < float(self.box[1]):
            raise ValueError(f"box={tuple(self.box)!r}: expected (lo, hi) with lo < hi")


def _draw(n: int, T: int, options: SDSOptions, generator: torch.Generator | None, like: Tensor,
          t_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Timesteps (unless given) and noise for ``n`` images shaped as ``like``, in that order from
    ``generator`` (on its own device, moved to ``like``'s)."""
    draw_on = generator.device if generator is not None else torch.device("cpu")
    if t_index is None:
        lo, hi = round(options.t_min * (T - 1)), round(options.t_max * (T - 1))
        t_index = torch.randint(lo, hi + 1, (n,), generator=generator, device=draw_on).to(like.device)
    noise = torch.randn(like.shape, generator=generator, device=draw_on, dtype=like.dtype).to(like.device)
    return t_index, noise


def _sds(eps_model: EpsilonModel, x: Tensor, abar: Tensor, options: SDSOptions, t_index: Tensor,
         noise: Tensor) -> Tensor:
    """``g_SDS`` of every image of ``x`` at the given timesteps and noise."""
    box_lo, box_hi = float(options.box[0]), float(options.box[1])
    scale = 2.0 / (box_hi - box_lo)  # dy/dx
    y = (x.detach() - box_lo) * scale - 1.0
    a = abar[t_index].view(x.shape[0], 1, 1, 1)
    x_t = a.sqrt() * y + (1 - a).sqrt() * noise
    with torch.no_grad():
        eps_hat = eps_model(x_t, t_index)
    w = (1 - a) if options.weighting == "sds" else torch.ones_like(a)
    return w * (eps_hat - noise) * scale


def sds_gradient(eps_model: EpsilonModel, x: Float[Tensor, "n c h w"], alphas_cumprod: Float[Tensor, " T"],
                 options: SDSOptions = SDSOptions(), generator: torch.Generator | None = None,
                 t_index: Int[Tensor, " n"] | None = None) -> Float[Tensor, "n c h w"]:
    """One draw of the score-distillation gradient for every image of ``x`` (no graph through the
    denoiser). ``t_index`` (0-based, one per image) fixes the timesteps instead of drawing them."""
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (n, channels, height, width)")
    abar = alphas_cumprod.to(x.device, x.dtype)
    T = abar.shape[0]
    n = x.shape[0]
    if t_index is not None and (t_index.shape != (n,) or int(t_index.min()) < 0 or int(t_index.max()) >= T):
        raise ValueError(f"t_index has shape {tuple(t_index.shape)} and range "
                         f"[{int(t_index.min())}, {int(t_index.max())}]: expected ({n},) in [0, {T - 1}]")
    t_index, noise = _draw(n, T, options, generator, x, t_index)
    return _sds(eps_model, x, abar, options, t_index, noise)


def sds_prior(eps_model: EpsilonModel, alphas_cumprod: Float[Tensor, " T"], options: SDSOptions = SDSOptions(),
              seed: int = 0, device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor]:
    """``x -> g_SDS(x)`` for images of any leading shape ``[..., c, h, w]``, with its own seeded stream of
    timesteps and noise (one fresh draw per call)."""
    gen = torch.Generator(torch.device(device)).manual_seed(int(seed))

    def prior(x: Tensor) -> Tensor:
        flat = x.reshape(-1, *x.shape[-3:])
        return sds_gradient(eps_model, flat, alphas_cumprod, options, gen).reshape(x.shape)

    return prior


def sds_priors(eps_model: EpsilonModel, alphas_cumprod: Float[Tensor, " T"], seeds: Sequence[int],
               options: SDSOptions = SDSOptions(), device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor]:
    """``x -> g_SDS(x)`` for a stack ``[len(seeds), ..., c, h, w]`` whose slice ``i`` draws from its own
    stream seeded with ``seeds[i]``, the draws of ``sds_prior(seed=seeds[i])`` applied to that slice
    alone; the denoiser runs once on all slices together (the prior of
    :func:`imprint.bridge.inversion.invert_gradients_batch`)."""
    if len(seeds) < 1:
        raise ValueError("seeds is empty: expected one seed per stacked target")
    gens = [torch.Generator(torch.device(device)).manual_seed(int(s)) for s in seeds]

    def prior(x: Tensor) -> Tensor:
        if x.dim() < 4 or x.shape[0] != len(gens):
            raise ValueError(f"x has shape {tuple(x.shape)}: expected ({len(gens)}, ..., channels, height, width), "
                             "one slice per seed")
        abar = alphas_cumprod.to(x.device, x.dtype)
        flat = x.reshape(len(gens), -1, *x.shape[-3:])
        draws = [_draw(flat.shape[1], abar.shape[0], options, gen, flat[i]) for i, gen in enumerate(gens)]
        t_index = torch.cat([t for t, _ in draws])
        noise = torch.cat([z for _, z in draws])
        return _sds(eps_model, flat.flatten(0, 1), abar, options, t_index, noise).reshape(x.shape)

    return prior


def unet_epsilon(unet, labels: Int[Tensor, " n"] | None = None) -> EpsilonModel:
    """A diffusers ``UNet2DModel`` as an :data:`EpsilonModel` (class-conditional when ``labels`` are given:
    one label per image, repeated over a stack of restarts)."""

    def eps(x_t: Tensor, t_index: Tensor) -> Tensor:
        kwargs = {}
        if labels is not None:
            reps = x_t.shape[0] // labels.shape[0]
            if reps * labels.shape[0] != x_t.shape[0]:
                raise ValueError(f"{x_t.shape[0]} images for {labels.shape[0]} labels: expected a multiple")
            kwargs["class_labels"] = labels.to(x_t.device).repeat(reps)
        return unet(x_t, t_index, **kwargs).sample

    return eps
