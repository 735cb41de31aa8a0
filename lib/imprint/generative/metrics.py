"""Sample-quality metrics of a generative model in a feature space: FID and PRDC, and class histograms.

Used by the self-consuming diffusion chapter (04), where the features come from a small classifier trained
on the real digits (:mod:`imprint.models.feature_net`). FID (Heusel et al. 2017) is the Frechet distance
between Gaussians fitted to real and generated features, ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2});
the trace of the matrix square root is computed from the eigenvalues of the symmetric matrix
S_r^{1/2} S_g S_r^{1/2}, which has the same spectrum as S_r S_g. Precision, recall, density and coverage
(Naeem et al. 2020) compare the two samples through k-nearest-neighbour balls: the ball of a point has the
distance to its k-th nearest neighbour in its own set (the point itself excluded) as radius.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from imprint.runtime.checks import require_int


def _check_features(name: str, x: Tensor, minimum: int) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected [n, n_features]")
    if x.shape[0] < minimum:
        raise ValueError(f"{name} has {x.shape[0]} rows: expected at least {minimum}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().to(torch.float64).cpu()


def mean_and_covariance(features: Float[Tensor, "n f"]) -> tuple[Float[Tensor, " f"], Float[Tensor, "f f"]]:
    """Sample mean and unbiased (n - 1) covariance, in float64."""
    x = _check_features("features", features, 2)
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(s: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mu1: Float[Tensor, " f"], cov1: Float[Tensor, "f f"], mu2: Float[Tensor, " f"],
                     cov2: Float[Tensor, "f f"]) -> float:
    """||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2}) for PSD covariances (float64)."""
    mu1, mu2, cov1, cov2 = (t.to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross)


def fid_from_features(real: Float[Tensor, "n f"], generated: Float[Tensor, "m g"]) -> float:
    """FID between two feature sets (each at least two rows)."""
    _check_features("real", real, 2)
    _check_features("generated", generated, 2)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real has {real.shape[1]} features and generated {generated.shape[1]}")
    return frechet_distance(*mean_and_covariance(real), *mean_and_covariance(generated))


@dataclass(frozen=True)
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def knn_radii(features: Float[Tensor, "n f"], k: int) -> Float[Tensor, " n"]:
    """Distance from each point to its k-th nearest neighbour in the same set, the point itself excluded."""
    x = features.to(torch.float64)
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    return dist.kthvalue(k, dim=1).values


def prdc(real: Float[Tensor, "n f"], generated: Float[Tensor, "m g"], k: int = 5) -> PRDC:
    """Precision, recall, density and coverage of ``generated`` against ``real`` (Naeem et al. 2020).

    precision = share of generated points inside some real ball; recall = share of real points inside some
    generated ball; density = (1 / k) * mean over generated points of the number of real balls containing
    them; coverage = share of real balls that contain at least one generated point. Balls are open
    (strict inequality), as in the authors' code.
    """
    k = require_int("k", k, minimum=1)
    real = _check_features("real", real, k + 1)
    generated = _check_features("generated", generated, k + 1)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real has {real.shape[1]} features and generated {generated.shape[1]}")
    r_real = knn_radii(real, k)
    r_gen = knn_radii(generated, k)
    d = torch.cdist(real, generated)  # [n_real, n_generated]
    in_real_ball = d < r_real[:, None]
    precision = in_real_ball.any(0).double().mean()
    recall = (d < r_gen[None, :]).any(1).double().mean()
    density = in_real_ball.sum(0).double().mean() / k
    coverage = (d.min(1).values < r_real).double().mean()
    return PRDC(float(precision), float(recall), float(density), float(coverage))


def class_histogram(predicted: Int[Tensor, " n"], n_classes: int) -> Float[Tensor, " k"]:
    """Share of samples per predicted class."""
    require_int("n_classes", n_classes, minimum=1)
    if predicted.numel() and (int(predicted.min()) < 0 or int(predicted.max()) >= n_classes):
        raise ValueError(f"predicted labels must lie in [0, {n_classes - 1}]")
    counts = torch.bincount(predicted.long().cpu(), minlength=n_classes).double()
    return counts / max(1, predicted.numel())


def total_variation_to_uniform(histogram: Float[Tensor, " k"]) -> float:
    """Half the L1 distance between a class histogram and the uniform one (0: balanced, -> 1: one class)."""
    h = histogram.double()
    return float(0.5 * (h - 1.0 / h.numel()).abs().sum())
