"""How many training images did a reconstruction attack recover? (chapters 01 and 02)

Each training image is matched to a candidate by normalised cross-correlation (Pearson correlation of the
flattened images), either to its nearest candidate or through a one-to-one assignment (scipy's
``linear_sum_assignment``, maximising the total correlation) so that one generic candidate cannot count
for many training images. A matched pair is scored with SSIM (kornia's Gaussian-window map, averaged; the
papers' 3x3 window). Candidates live in the mean-subtracted space of training; for scoring, the mean is
added back and each candidate is stretched to [0, 1] (its scale is not identified by the KKT equations),
as in the reference evaluation of Haim et al. (2022).

At 8x8 pixels the papers' "SSIM > 0.4" is a weak bar: the plain mean image clears it for a large share of
digits, and another real digit of the same class usually scores higher still. The headline criterion is
therefore the **memorisation count**: training images whose one-to-one candidate is more similar to them
than the most similar held-out real image of the same class. The threshold counts are reported beside it
with the same counts for the mean image and for the nearest held-out image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from scipy.optimize import linear_sum_assignment
from torch import Tensor

SSIM_WINDOW = 3


def _as_images(x: Tensor, image_shape: Sequence[int]) -> Tensor:
    """``[n, d]`` -> ``[n, C, H, W]`` (``image_shape`` is ``(H, W)`` or ``(C, H, W)``)."""
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or int(np.prod(shape)) != x.shape[-1]:
        raise ValueError(f"image_shape={tuple(image_shape)}: expected (H, W) or (C, H, W) with "
                         f"{x.shape[-1]} pixels in all")
    return x.reshape(-1, *shape)


def candidate_pixels(x: Float[Tensor, "n d"], mean: Float[Tensor, " d"]) -> Float[Tensor, "n d"]:
    """Mean added back, then each image stretched to [0, 1] (a flat image becomes 0.5 everywhere)."""
    img = x + mean.to(x.dtype)
    lo = img.min(-1, keepdim=True).values
    hi = img.max(-1, keepdim=True).values
    span = hi - lo
    flat = span <= 1e-12 * torch.clamp(hi.abs(), min=1.0)
    return torch.where(flat, torch.full_like(img, 0.5), (img - lo) / torch.where(flat, torch.ones_like(span), span))


def normalized_cross_correlation(a: Float[Tensor, "n d"], b: Float[Tensor, "m d"]) -> Float[Tensor, "n m"]:
    """Pearson correlation of every row of ``a`` with every row of ``b`` (0 for a flat image)."""
    def unit(z):
        z = z - z.mean(-1, keepdim=True)
        norm = z.norm(dim=-1, keepdim=True)
        return z / torch.where(norm > 0, norm, torch.ones_like(norm))
    return unit(a.double()) @ unit(b.double()).T


def ssim_pairs(a: Float[Tensor, "n d"], b: Float[Tensor, "n d"], image_shape: Sequence[int],
               window_size: int = SSIM_WINDOW, padding: str = "same") -> Float[Tensor, " n"]:
    """SSIM of ``a[i]`` with ``b[i]`` (pixels in [0, 1]): kornia's map, averaged over pixels and channels."""
    import kornia

    if a.shape != b.shape:
        raise ValueError(f"a has shape {tuple(a.shape)} and b {tuple(b.shape)}: expected the same shape")
    ia, ib = _as_images(a, image_shape), _as_images(b, image_shape)
    dtype = torch.promote_types(a.dtype, b.dtype)
    smap = kornia.metrics.ssim(ia.to(dtype), ib.to(dtype), window_size, max_val=1.0, eps=0.0, padding=padding)
    return smap.flatten(1).mean(1)


def ssim_matrix(a: Float[Tensor, "n d"], b: Float[Tensor, "m d"], image_shape: Sequence[int],
                window_size: int = SSIM_WINDOW, padding: str = "same", chunk_pairs: int = 1 << 16
                ) -> Float[Tensor, "n m"]:
    """SSIM of every row of ``a`` with every row of ``b``, computed in chunks of rows of ``a``."""
    n, m = a.shape[0], b.shape[0]
    out = torch.empty(n, m, dtype=torch.promote_types(a.dtype, b.dtype))
    rows = max(1, chunk_pairs // max(m, 1))
    for s in range(0, n, rows):
        blk = a[s:s + rows]
        left = blk.unsqueeze(1).expand(-1, m, -1).reshape(-1, a.shape[1])
        right = b.unsqueeze(0).expand(blk.shape[0], -1, -1).reshape(-1, b.shape[1])
        out[s:s + rows] = ssim_pairs(left, right, image_shape, window_size, padding).reshape(blk.shape[0], m).cpu()
    return out


def one_to_one_assignment(similarity: Float[Tensor, "n m"]) -> Int[Tensor, " n"]:
    """The column given to each row by the assignment maximising total similarity (needs m >= n)."""
    n, m = similarity.shape
    if m < n:
        raise ValueError(f"similarity has shape {(n, m)}: a one-to-one assignment needs at least as many "
                         f"candidates as training images (m >= n)")
    sim = similarity.detach().double().cpu().numpy()
    sim = np.where(np.isfinite(sim), sim, -1e9)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    match = np.empty(n, dtype=np.int64)
    match[rows] = cols
    return torch.from_numpy(match)


def nearest_assignment(similarity: Float[Tensor, "n m"]) -> Int[Tensor, " n"]:
    """Each row's most similar column; several rows may share one."""
    return similarity.argmax(1).cpu()


def best_same_class(similarity: Float[Tensor, "n p"], label_rows: Tensor, label_cols: Tensor) -> Float[Tensor, " n"]:
    """For each row, the largest similarity among columns of the same class (-inf when there is none)."""
    same = label_rows.reshape(-1, 1).cpu() == label_cols.reshape(1, -1).cpu()
    masked = torch.where(same, similarity.cpu(), torch.full_like(similarity.cpu(), float("-inf")))
    return masked.max(1).values


@dataclass(frozen=True)
class BaselineScores:
    """What needs no attack: per training image, the SSIM of the most similar held-out real image of the
    same class, and of the (stretched) mean image."""

    nearest_heldout_ssim: Float[Tensor, " n"]
    nearest_heldout_index: Int[Tensor, " n"]
    mean_image_ssim: Float[Tensor, " n"]
    n_heldout: int


def baseline_scores(x_train: Float[Tensor, "n d"], label_train: Tensor, x_heldout: Float[Tensor, "p d"],
                    label_heldout: Tensor, mean: Float[Tensor, " d"], image_shape: Sequence[int],
                    window_size: int = SSIM_WINDOW) -> BaselineScores:
    """Baselines for the training images of a split (all inputs in the mean-subtracted space)."""
    if x_heldout.shape[0] < 1:
        raise ValueError("x_heldout is empty: the memorisation count needs a held-out pool of real images")
    missing = sorted(set(label_train.tolist()) - set(label_heldout.tolist()))
    if missing:
        raise ValueError(f"label_heldout has no image of classes {missing}: the held-out pool must cover "
                         "every training class")
    train = (x_train + mean).double()
    held = (x_heldout + mean).double()
    sim = ssim_matrix(train, held, image_shape, window_size)
    same = label_train.reshape(-1, 1) == label_heldout.reshape(1, -1)
    sim = torch.where(same, sim, torch.full_like(sim, float("-inf")))
    best, idx = sim.max(1)
    mean_img = candidate_pixels(torch.zeros(1, x_train.shape[1], dtype=torch.float64), mean.double())
    mean_ssim = ssim_pairs(train, mean_img.expand(train.shape[0], -1), image_shape, window_size)
    return BaselineScores(best, idx, mean_ssim, int(x_heldout.shape[0]))


@dataclass(frozen=True)
class ReconstructionScores:
    """Per training image: its matched candidate, their correlation and SSIM, and whether it counts as
    memorised (candidate SSIM above the nearest same-class held-out image's)."""

    match: Int[Tensor, " n"]
    ncc: Float[Tensor, " n"]
    ssim: Float[Tensor, " n"]
    memorised: Bool[Tensor, " n"]
    baseline: BaselineScores
    thresholds: tuple[float, ...] = (0.4, 0.5)

    @property
    def memorisation_count(self) -> int:
        return int(self.memorised.sum())

    def counts(self) -> dict[str, int]:
        """The memorisation count and, per SSIM threshold, the counts of the attack and the two baselines."""
        out = {"memorisation_count": self.memorisation_count, "n_train": int(self.ssim.shape[0])}
        for t in self.thresholds:
            tag = f"{t:g}".replace(".", "")
            out[f"ssim_gt_{tag}"] = int((self.ssim > t).sum())
            out[f"mean_image_ssim_gt_{tag}"] = int((self.baseline.mean_image_ssim > t).sum())
            out[f"heldout_ssim_gt_{tag}"] = int((self.baseline.nearest_heldout_ssim > t).sum())
        return out


def score_candidates(candidates: Float[Tensor, "m d"], x_train: Float[Tensor, "n d"], mean: Float[Tensor, " d"],
                     image_shape: Sequence[int], baseline: BaselineScores, one_to_one: bool = True,
                     window_size: int = SSIM_WINDOW, thresholds: Sequence[float] = (0.4, 0.5),
                     train_targets: Tensor | None = None, candidate_targets: Tensor | None = None
                     ) -> ReconstructionScores:
    """Match every training image to a candidate by NCC and score the pair with SSIM.

    With ``train_targets`` and ``candidate_targets`` (the label the network was trained on and the label
    the attack gave each candidate), a training image may only be matched to a candidate of its own label.
    """
    if candidates.ndim != 2 or candidates.shape[1] != x_train.shape[1]:
        raise ValueError(f"candidates has shape {tuple(candidates.shape)}: expected [m, {x_train.shape[1]}]")
    if (train_targets is None) != (candidate_targets is None):
        raise ValueError("train_targets and candidate_targets: give both (label-aware matching) or neither")
    cand = candidates.detach().double().cpu()
    cand = torch.nan_to_num(cand, nan=0.0, posinf=0.0, neginf=0.0)
    train = x_train.double().cpu()
    ncc = normalized_cross_correlation(train, cand)
    eligible = ncc
    if train_targets is not None:
        same = train_targets.reshape(-1, 1).cpu() == candidate_targets.reshape(1, -1).cpu()
        if one_to_one:
            short = [t for t in torch.unique(train_targets).tolist()
                     if int((candidate_targets == t).sum()) < int((train_targets == t).sum())]
            if short:
                raise ValueError(f"candidate_targets: fewer candidates than training images for labels {short}")
        eligible = torch.where(same, ncc, torch.full_like(ncc, float("-inf")))
    match = one_to_one_assignment(eligible) if one_to_one else nearest_assignment(eligible)
    pixels = candidate_pixels(cand[match], mean.double().cpu())
    ssim = ssim_pairs(train + mean.double().cpu(), pixels, image_shape, window_size)
    matched_ncc = ncc.gather(1, match.reshape(-1, 1))[:, 0]
    memorised = ssim > baseline.nearest_heldout_ssim
    return ReconstructionScores(match, matched_ncc, ssim, memorised, baseline, tuple(thresholds))
