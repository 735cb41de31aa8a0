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
than the most similar held-out real image of the same class, the held-out images passing through the
candidates' pixel transform, so that a candidate equal to a held-out image ties with the bar (a tie is not
memorised). The threshold counts are reported beside it with the same counts for the mean image and for
the nearest held-out image. :func:`margin_share` and :func:`paired_seed_test` are the statistics of the
chapters' margin and per-seed analyses.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def heldout_pixels(x_heldout: Float[Tensor, "p d"], mean: Float[Tensor, " d"]) -> Float[Tensor, "p d"]:
    """Held-out images as the judge sees them: on the candidates' path (float64 on the CPU, then
    :func:`candidate_pixels`), so a held-out image given as a candidate has exactly these pixels."""
    return candidate_pixels(x_heldout.detach().double().cpu(), mean.detach().double().cpu())


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
    """Baselines for the training images of a split (all inputs in the mean-subtracted space).

    The held-out images go through the candidates' pixel transform (:func:`heldout_pixels`: float64, mean
    added back, stretched to [0, 1]), so the bar is what the same real image would score as a candidate:
    an attack that outputs a held-out image ties with the bar and does not count as memorised.
    """
    if x_heldout.shape[0] < 1:
        raise ValueError("x_heldout is empty: the memorisation count needs a held-out pool of real images")
    missing = sorted(set(label_train.tolist()) - set(label_heldout.tolist()))
    if missing:
        raise ValueError(f"label_heldout has no image of classes {missing}: the held-out pool must cover "
                         "every training class")
    mean = mean.detach().double().cpu()
    train = x_train.detach().double().cpu() + mean
    held = heldout_pixels(x_heldout, mean)
    sim = ssim_matrix(train, held, image_shape, window_size)
    same = label_train.reshape(-1, 1).cpu() == label_heldout.reshape(1, -1).cpu()
    sim = torch.where(same, sim, torch.full_like(sim, float("-inf")))
    idx = sim.max(1).indices
    # the winners' SSIM again, through the very call score_candidates makes (n pairs in one batch), so that
    # a candidate equal to the nearest held-out image ties with it bit for bit and is not memorised
    best = ssim_pairs(train, held[idx], image_shape, window_size)
    mean_img = candidate_pixels(torch.zeros(1, x_train.shape[1], dtype=torch.float64), mean)
    mean_ssim = ssim_pairs(train, mean_img.expand(train.shape[0], -1), image_shape, window_size)
    return BaselineScores(best, idx, mean_ssim, int(x_heldout.shape[0]))


@dataclass(frozen=True)
class ReconstructionScores:
    """Per training image: its matched candidate, their correlation and SSIM, and whether it counts as
    memorised (candidate SSIM strictly above the nearest same-class held-out image's, both through the
    same pixel transform: a tie is not memorised)."""

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


@dataclass(frozen=True)
class SearchScores:
    """The scores of every configuration of a hyperparameter search against one network."""

    scores: list[ReconstructionScores]
    final_kkt_loss: Float[Tensor, " k"]
    diverged: Bool[Tensor, " k"]

    @property
    def counts(self) -> Int[Tensor, " k"]:
        return torch.tensor([s.memorisation_count for s in self.scores])

    @property
    def best_by_count(self) -> int:
        """The configuration with the largest memorisation count: the papers' "best of N" (an oracle rule,
        it looks at the training set)."""
        return int(torch.argmax(self.counts))

    @property
    def best_by_loss(self) -> int:
        """The configuration with the lowest final KKT loss among those that did not diverge: a rule the
        attacker can apply without any training image."""
        loss = torch.where(self.diverged | ~torch.isfinite(self.final_kkt_loss),
                           torch.full_like(self.final_kkt_loss, float("inf")), self.final_kkt_loss)
        return int(torch.argmin(loss))


def score_search(result, x_train: Float[Tensor, "n d"], mean: Float[Tensor, " d"], image_shape: Sequence[int],
                 baseline: BaselineScores, train_targets: Tensor | None = None,
                 candidate_targets: Tensor | None = None, one_to_one: bool = True) -> SearchScores:
    """:func:`score_candidates` for every configuration of an ``ExtractionResult``."""
    scores = [score_candidates(result.x[k], x_train, mean, image_shape, baseline, one_to_one=one_to_one,
                               train_targets=train_targets, candidate_targets=candidate_targets)
              for k in range(result.x.shape[0])]
    return SearchScores(scores, result.final_kkt_loss.detach().cpu(), result.diverged.cpu())


# ---------------------------------------------------------------------------------------------- statistics

def margin_share(margins, memorised, quantile: float = 0.1) -> dict:
    """Are memorised images concentrated among the smallest margins?

    The training images whose margin is at most the ``quantile``-quantile of the margins (numpy's linear
    interpolation; a tolerance that follows the distribution rather than a fixed fraction of the smallest
    margin) form the low group, the others the rest. Returns the threshold, the group sizes
    (``n_low``, ``n_rest``), the memorised counts in each (``memorised_low``, ``memorised_rest``), the
    shares (``share_low``, ``share_rest``; NaN for an empty group), and scipy's two-sided Fisher exact test
    of the 2x2 table [[memorised_low, n_low - memorised_low], [memorised_rest, n_rest - memorised_rest]]
    (``odds_ratio``, ``p``).
    """
    from scipy.stats import fisher_exact

    from imprint.runtime.checks import require_float

    m = (margins.detach().cpu().double().numpy() if isinstance(margins, Tensor)
         else np.asarray(margins, dtype=np.float64))
    mem = np.asarray(memorised.detach().cpu().numpy() if isinstance(memorised, Tensor) else memorised)
    if m.ndim != 1 or m.size < 2:
        raise ValueError(f"margins has shape {m.shape}: expected one margin per training image (at least 2)")
    if not np.isfinite(m).all():
        raise ValueError(f"margins holds {int((~np.isfinite(m)).sum())} non-finite values: expected numbers")
    if mem.shape != m.shape or not (mem.dtype == bool or np.isin(mem, [0, 1]).all()):
        raise ValueError(f"memorised has shape {mem.shape} (dtype {mem.dtype}): expected {m.shape[0]} booleans, "
                         "one per margin")
    quantile = require_float("quantile", quantile)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile!r}: expected a number in (0, 1)")
    mem = mem.astype(bool)
    threshold = float(np.quantile(m, quantile))
    low = m <= threshold
    n_low, n_rest = int(low.sum()), int((~low).sum())
    k_low, k_rest = int((mem & low).sum()), int((mem & ~low).sum())
    odds, p = fisher_exact([[k_low, n_low - k_low], [k_rest, n_rest - k_rest]], alternative="two-sided")
    return {"quantile": quantile, "threshold": threshold, "n_low": n_low, "n_rest": n_rest,
            "memorised_low": k_low, "memorised_rest": k_rest,
            "share_low": k_low / n_low if n_low else float("nan"),
            "share_rest": k_rest / n_rest if n_rest else float("nan"),
            "odds_ratio": float(odds), "p": float(p)}


EXACT_SIGN_FLIPS_UP_TO = 16


def paired_seed_test(attack_counts, control_counts, n_perm: int = 10000, seed: int = 0, n_boot: int = 10000,
                     level: float = 0.95) -> dict:
    """Paired comparison of per-seed counts (the attacked network against a control, one pair per data seed).

    With d_s = attack_s - control_s over k seeds: ``differences`` (the d_s), ``mean``, the percentile
    bootstrap interval ``lo``, ``hi`` of the mean (resampled seeds; :func:`imprint.attribution.metrics.
    paired_difference`, seeded with ``seed``), and the two-sided sign-flip p-value
    #{s : |mean(s * d)| >= |mean(d)|} / #s under the null that attack and control are exchangeable within
    a seed: exact over all 2^k sign vectors when k <= 16 (``exact`` True), otherwise
    (1 + #extreme) / (1 + ``n_perm``) over random sign vectors.
    """
    from imprint.attribution.metrics import paired_difference
    from imprint.runtime.checks import require_int

    def vector(name, value):
        v = torch.as_tensor(value).detach().cpu()
        if v.ndim != 1 or v.numel() == 0:
            raise ValueError(f"{name} has shape {tuple(v.shape)}: expected a non-empty list, one count per seed")
        v = v.double()
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}={v.tolist()}: expected finite numbers")
        return v

    a, b = vector("attack_counts", attack_counts), vector("control_counts", control_counts)
    if a.numel() != b.numel():
        raise ValueError(f"attack_counts has {a.numel()} seeds and control_counts {b.numel()}: expected one "
                         "pair per seed")
    n_perm = require_int("n_perm", n_perm, minimum=1)
    seed = require_int("seed", seed)
    k = a.numel()
    exact = k <= EXACT_SIGN_FLIPS_UP_TO
    summary = paired_difference(a, b, n_boot=n_boot, seed=seed, level=level, n_perm=1 if exact else n_perm)
    d = a - b
    if exact:
        observed = float(d.mean().abs())
        tolerance = 1e-12 * max(1.0, float(d.abs().max()))
        codes = torch.arange(2 ** k).reshape(-1, 1)
        signs = ((codes >> torch.arange(k)) & 1).double() * 2 - 1
        p = float(((signs @ d).abs() / k >= observed - tolerance).double().mean())
    else:
        p = summary["p"]
    return {"differences": d.tolist(), "mean": summary["mean"], "lo": summary["lo"], "hi": summary["hi"],
            "p": p, "exact": exact, "n_seeds": k, "mean_attack": summary["mean_a"],
            "mean_control": summary["mean_b"]}


# ------------------------------------------------------------------------------------------------- figures

def _image(x: Tensor, image_shape: Sequence[int]):
    img = x.detach().cpu().reshape(*image_shape).numpy()
    return img.transpose(1, 2, 0) if img.ndim == 3 else img


def plot_reconstructions(scores: ReconstructionScores, candidates: Float[Tensor, "m d"],
                         x_train: Float[Tensor, "n d"], x_heldout: Float[Tensor, "p d"], mean: Float[Tensor, " d"],
                         image_shape: Sequence[int], n_show: int = 24, n_cols: int = 8):
    """Triplets ordered by SSIM: training image, its one-to-one reconstruction, the nearest held-out
    real image of its class; a reconstruction that beats the held-out image is framed."""
    import matplotlib.pyplot as plt

    order = torch.argsort(scores.ssim, descending=True)[:n_show]
    n_rows = int(np.ceil(len(order) / n_cols))
    fig, axes = plt.subplots(n_rows, 3 * n_cols, figsize=(3 * n_cols * 0.55, n_rows * 0.8), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    mean = mean.double().cpu()
    pix = candidate_pixels(candidates.detach().double().cpu(), mean)
    for slot, i in enumerate(order.tolist()):
        r, c = divmod(slot, n_cols)
        trio = [x_train[i].double().cpu() + mean, pix[scores.match[i]],
                heldout_pixels(x_heldout[scores.baseline.nearest_heldout_index[i]:][:1], mean)[0]]
        titles = ["train", f"{scores.ssim[i]:.2f}", f"{scores.baseline.nearest_heldout_ssim[i]:.2f}"]
        for j, (img, title) in enumerate(zip(trio, titles)):
            ax = axes[r, 3 * c + j]
            ax.imshow(np.clip(_image(img, image_shape), 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=6, pad=1)
            if j == 1 and bool(scores.memorised[i]):
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_color("tab:red")
                    spine.set_linewidth(1.5)
    fig.subplots_adjust(wspace=0.05, hspace=0.35)
    plt.close(fig)
    return fig


def plot_search(searches: dict, n_train: int):
    """Memorisation count of every configuration against its final KKT loss, one colour per network."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, search in searches.items():
        loss = search.final_kkt_loss.clone()
        ok = torch.isfinite(loss) & ~search.diverged
        jitter = (torch.rand(len(loss), generator=torch.Generator().manual_seed(0)) - 0.5) * 0.3
        ax.scatter(loss[ok].numpy(), (search.counts[ok] + jitter[ok]).numpy(), s=18, alpha=0.75,
                   label=f"{name} (best {int(search.counts.max())}, {int((~ok).sum())} diverged)")
    ax.set(xscale="log", xlabel="final KKT loss", ylabel=f"memorisation count (of {n_train})")
    ax.legend()
    plt.close(fig)
    return fig


def plot_ssim_against(ssim: Float[Tensor, " n"], memorised: Bool[Tensor, " n"], quantities: dict):
    """One panel per named per-training-image quantity (margin, fitted multiplier...): SSIM against it."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.2), squeeze=False)
    for ax, (label, values) in zip(axes[0], quantities.items()):
        v = torch.as_tensor(values).double()
        ax.scatter(v[~memorised].numpy(), ssim[~memorised].numpy(), s=14, alpha=0.7, label="not memorised")
        ax.scatter(v[memorised].numpy(), ssim[memorised].numpy(), s=18, alpha=0.9, color="tab:red",
                   label="memorised")
        ax.set(xlabel=label, ylabel="SSIM of the reconstruction")
        if bool((v > 0).all()) and float(v.max() / v.min()) > 30:
            ax.set_xscale("log")
    axes[0, 0].legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_size_sweep(sizes: Sequence[int], counts: dict):
    """Memorised fraction of the training set against its size, one line per network."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    styles = ["o-", "s--", "^:", "d-."]
    for j, (name, values) in enumerate(counts.items()):
        frac = np.asarray(values, dtype=float) / np.asarray(sizes, dtype=float)
        ax.plot(sizes, frac, styles[j % len(styles)], label=name, markersize=7 - 1.5 * j, alpha=0.85)
    ax.set(xscale="log", xlabel="training-set size n", ylabel="memorised fraction (best of N)", ylim=(-0.02, 1))
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([str(s) for s in sizes])
    ax.legend()
    plt.close(fig)
    return fig


def plot_reconstruction_rows(rows: dict, x_train: Float[Tensor, "n d"], x_heldout: Float[Tensor, "p d"],
                             mean: Float[Tensor, " d"], image_shape: Sequence[int], n_show: int = 8):
    """One row per named network: its ``n_show`` best triplets (training image, reconstruction, nearest
    held-out image), from ``rows = {name: (ReconstructionScores, candidates)}``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3 * n_show, figsize=(3 * n_show * 0.5, len(rows) * 0.85), squeeze=False)
    mean = mean.double().cpu()
    for r, (name, (scores, candidates)) in enumerate(rows.items()):
        pix = candidate_pixels(candidates.detach().double().cpu(), mean)
        order = torch.argsort(scores.ssim, descending=True)[:n_show].tolist()
        for ax in axes[r]:
            ax.set_axis_off()
        for slot, i in enumerate(order):
            trio = [x_train[i].double().cpu() + mean, pix[scores.match[i]],
                    heldout_pixels(x_heldout[scores.baseline.nearest_heldout_index[i]:][:1], mean)[0]]
            for j, img in enumerate(trio):
                ax = axes[r, 3 * slot + j]
                ax.imshow(np.clip(_image(img, image_shape), 0, 1), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                if j == 1:
                    ax.set_title(f"{scores.ssim[i]:.2f}", fontsize=6, pad=1,
                                 color="tab:red" if bool(scores.memorised[i]) else "black")
        axes[r, 0].text(-0.1, 0.5, f"{name}\n({scores.memorisation_count} memorised)", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=7)
    fig.subplots_adjust(wspace=0.05, hspace=0.4, left=0.12)
    plt.close(fig)
    return fig


def plot_seed_counts(panels: dict, n_train: dict | int | None = None, points_on_top: bool = False):
    """Per-seed memorisation counts, one panel per cell: ``panels = {cell: {network: [count per seed]}}``.

    Each data seed is a grey line through its networks (the pairing the tests use), each count a point,
    and the mean over seeds a black bar. ``n_train`` (one size, or one per cell) labels the y axis. With
    ``points_on_top`` the points are drawn over the mean bar, edged, so a seed equal to the mean stays visible.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 2.0 * sum(len(v) for v in panels.values()) / 3, 3.2),
                             squeeze=False, sharey=True)
    for ax, (cell, table) in zip(axes[0], panels.items()):
        names = list(table)
        values = np.asarray([table[k] for k in names], dtype=float)  # [networks, seeds]
        xs = np.arange(len(names))
        for s in range(values.shape[1]):
            offset = (s - (values.shape[1] - 1) / 2) * 0.04
            ax.plot(xs + offset, values[:, s], "-", color="0.75", lw=0.8, zorder=1)
            ax.scatter(xs + offset, values[:, s], s=16, zorder=4 if points_on_top else 2,
                       c=[f"C{j}" for j in range(len(names))],
                       **({"edgecolors": "white", "linewidths": 0.6} if points_on_top else {}))
        ax.hlines(values.mean(1), xs - 0.25, xs + 0.25, color="black", lw=2, zorder=3)
        ax.set_xticks(xs)
        ax.set_xticklabels([k.replace("_", "\n") for k in names], fontsize=7)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(cell, fontsize=8)
    size = n_train if not isinstance(n_train, dict) else None
    axes[0, 0].set_ylabel("memorised (per data seed)" + (f", of {size}" if size else ""))
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_size_sweep_seeds(sizes: Sequence[int], counts: dict):
    """Memorised fraction against the training-set size: ``counts = {network: [[count per seed] per size]}``.

    The sizes sit at evenly spaced positions labelled by their value (no crowded log ticks); every seed is
    a small point, the mean over seeds a line.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.3))
    xs = np.arange(len(sizes), dtype=float)
    markers = ["o", "s", "^", "d", "v"]
    for j, (name, per_size) in enumerate(counts.items()):
        offset = (j - (len(counts) - 1) / 2) * 0.12
        frac = [np.asarray(v, dtype=float) / n for v, n in zip(per_size, sizes)]
        for x, f in zip(xs, frac):
            ax.scatter(np.full(len(f), x + offset), f, s=12, alpha=0.55, color=f"C{j}", marker=markers[j % 5],
                       linewidths=0)
        ax.plot(xs + offset, [f.mean() for f in frac], "-", color=f"C{j}", marker=markers[j % 5], markersize=6,
                label=f"{name} (mean)")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(n) for n in sizes])
    ax.set(xlabel="training-set size n", ylabel="memorised fraction (best of N)", ylim=(-0.02, 1),
           xlim=(-0.5, len(sizes) - 0.5))
    ax.legend(fontsize=7)
    plt.close(fig)
    return fig


def plot_support_seeds(ssim: Sequence[Tensor], memorised: Sequence[Tensor], quantities: dict):
    """SSIM of every training image of every seed against per-image quantities (margin, multipliers):
    ``quantities = {label: [values per seed]}``, each seed its own marker, memorised images in red.

    A quantity with exact zeros beside positive values spanning more than a factor 30 (NNLS multipliers)
    is drawn on a symmetric-log axis whose linear part ends at its smallest positive value, so a zero sits
    at 0 rather than at an arbitrary floor.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.2), squeeze=False)
    markers = ["o", "s", "^", "d", "v", "P", "X", "*"]
    for ax, (label, per_seed) in zip(axes[0], quantities.items()):
        pooled = []
        for s, (values, ss, mem) in enumerate(zip(per_seed, ssim, memorised)):
            v = torch.as_tensor(values).double()
            mem = torch.as_tensor(mem).bool()
            pooled.append(v)
            marker = markers[s % len(markers)]
            ax.scatter(v[~mem].numpy(), ss[~mem].numpy(), s=12, alpha=0.55, color="tab:blue", marker=marker,
                       linewidths=0, label="not memorised" if s == 0 else None)
            ax.scatter(v[mem].numpy(), ss[mem].numpy(), s=16, alpha=0.9, color="tab:red", marker=marker,
                       linewidths=0, label="memorised" if s == 0 else None)
        v = torch.cat(pooled)
        positive = v[v > 0]
        ax.set(xlabel=label, ylabel="SSIM of the reconstruction")
        if len(positive) and bool((v >= 0).all()) and float(positive.max() / positive.min()) > 30:
            if bool((v > 0).all()):
                ax.set_xscale("log")
            else:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
                ax.axvline(0, color="0.8", lw=0.6, zorder=0)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig
