"""Effect sizes of a drifting signal over generations, detection delays and late slopes, with seed bootstraps.

Used by the self-consuming diffusion chapter (04). A signal of a chain is a ``[seeds, generations]`` array
(NaN where a seed did not reach a generation). Its *effect size* at generation g is the standardised
distance from generation 0,

    d_g = (mean_s v[s, g] - mean_s v[s, 0]) / max(sd_s v[s, 0], floor),

in units of the seed-to-seed spread of generation 0 (the spread a monitor knows before the loop runs); the
floor keeps a zero spread from making every change infinite. Intervals come from resampling seeds with
replacement (a percentile bootstrap; every signal of a chain is resampled with the same seeds, so that the
comparison of two signals is paired). A signal *flags* at the first generation g >= 1 with
|d_g| >= threshold; the *lead* of a signal over a reference is the reference's flag minus its own (a signal
that never flags counts as flagging one generation after the last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from jaxtyping import Float

from imprint.runtime.checks import require_float, require_int


def _check_values(values, name: str = "values") -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 2 or v.shape[1] < 2:
        raise ValueError(f"{name} has shape {v.shape}: expected [seeds >= 2, generations >= 2]")
    if not np.all(np.isfinite(v[:, 0])):
        raise ValueError(f"{name} has NaN or infinite values at generation 0")
    return v


def _check_level(level: float) -> float:
    level = require_float("level", level, minimum=0.0, strict_minimum=True)
    if level >= 1:
        raise ValueError(f"level={level}: expected a coverage in (0, 1)")
    return level


def bootstrap_seed_indices(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_seeds]`` seed indices drawn with replacement (row b is one bootstrap resample)."""
    require_int("n_seeds", n_seeds, minimum=1)
    require_int("n_boot", n_boot, minimum=1)
    return np.random.default_rng(seed).integers(0, n_seeds, size=(n_boot, n_seeds))


def standardised_distance(values: Float[np.ndarray, "s g"], floor: float = 0.0) -> Float[np.ndarray, " g"]:
    """d_g = (mean v[:, g] - mean v[:, 0]) / max(sd v[:, 0], floor) (sd with n - 1); +-inf for a change
    over a zero spread, 0 for no change."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.nanmean(v, axis=0) - np.mean(v[:, 0])
        spread = max(float(np.std(v[:, 0], ddof=1)), float(floor))
        if spread > 0:
            return diff / spread
        return np.where(diff == 0, 0.0, np.sign(diff) * np.inf)


@dataclass(frozen=True)
class EffectSizes:
    """Per generation: the effect size, its bootstrap interval, and the generation-0 spread it is measured in."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    spread: float
    level: float

    def as_dict(self) -> dict:
        def clean(a):
            return [None if not np.isfinite(x) else float(x) for x in a]
        return {"estimate": clean(self.estimate), "low": clean(self.low), "high": clean(self.high),
                "spread": self.spread, "level": self.level}


def _percentiles(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    q = 100 * (1 - level) / 2
    # inf (a resample whose seeds agree exactly) is kept as inf; method "lower"/"higher" keep the order
    low = np.percentile(samples, q, axis=0, method="lower")
    high = np.percentile(samples, 100 - q, axis=0, method="higher")
    return low, high


def effect_sizes(values: Float[np.ndarray, "s g"], floor: float = 0.0, n_boot: int = 2000, level: float = 0.9,
                 seed: int = 0, indices: np.ndarray | None = None) -> EffectSizes:
    """Effect size of every generation with a percentile bootstrap interval over seeds.

    ``indices`` (``[n_boot, seeds]``, from :func:`bootstrap_seed_indices`) shares the resamples between
    signals; by default they are drawn from ``seed``.
    """
    v = _check_values(values)
    level = _check_level(level)
    require_float("floor", floor, minimum=0.0)
    idx = bootstrap_seed_indices(v.shape[0], n_boot, seed) if indices is None else np.asarray(indices)
    estimate = standardised_distance(v, floor)
    boot = np.stack([standardised_distance(v[row], floor) for row in idx])
    low, high = _percentiles(boot, level)
    return EffectSizes(estimate, low, high, max(float(np.std(v[:, 0], ddof=1)), float(floor)), level)


def first_crossing(distance: Float[np.ndarray, " g"], threshold: float) -> int | None:
    """The first generation g >= 1 with |d_g| >= threshold (None: never)."""
    d = np.asarray(distance, dtype=np.float64)
    hits = [g for g in range(1, d.shape[0]) if not np.isnan(d[g]) and abs(d[g]) >= threshold]
    return hits[0] if hits else None


def _censored(first: int | None, n_generations: int) -> int:
    return n_generations if first is None else first


def detection_delays(signals: Mapping[str, Float[np.ndarray, "s g"]], reference: str, threshold: float,
                     floors: Mapping[str, float] | None = None, n_boot: int = 2000, level: float = 0.9,
                     seed: int = 0) -> dict[str, dict]:
    """For every signal: its first flag, the reference's, the lead (reference's flag minus its own, > 0:
    earlier than the reference) with a paired bootstrap interval over seeds, and the shares of resamples in
    which it flags strictly earlier and strictly later than the reference.

    ``floors`` gives each signal's spread floor (default 0).
    """
    if reference not in signals:
        raise ValueError(f"reference={reference!r}: expected one of {sorted(signals)}")
    require_float("threshold", threshold, minimum=0.0, strict_minimum=True)
    level = _check_level(level)
    arrays = {k: _check_values(v, k) for k, v in signals.items()}
    shapes = {v.shape for v in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"signals have shapes {sorted(shapes)}: expected one [seeds, generations] shape")
    n_seeds, n_gen = shapes.pop()
    floors = dict(floors or {})
    idx = bootstrap_seed_indices(n_seeds, n_boot, seed)

    def flags(rows) -> dict[str, int]:
        return {k: _censored(first_crossing(standardised_distance(v[rows], floors.get(k, 0.0)), threshold), n_gen)
                for k, v in arrays.items()}

    point = flags(np.arange(n_seeds))
    boot = [flags(row) for row in idx]
    out = {}
    for k in arrays:
        leads = np.array([b[reference] - b[k] for b in boot], dtype=np.float64)
        low, high = _percentiles(leads[:, None], level)
        out[k] = {"first_flag": point[k] if point[k] < n_gen else None,
                  "reference_first_flag": point[reference] if point[reference] < n_gen else None,
                  "lead": float(point[reference] - point[k]), "lead_low": float(low[0]), "lead_high": float(high[0]),
                  "share_earlier": float(np.mean(leads > 0)), "share_later": float(np.mean(leads < 0)),
                  "threshold": float(threshold), "level": level}
    return out


def late_slope(values: Float[np.ndarray, "s g"], start: int, n_boot: int = 2000, level: float = 0.9,
               seed: int = 0) -> dict[str, float]:
    """Least-squares slope per generation of every seed over generations ``start`` .. last, averaged over
    seeds, with a bootstrap interval over seeds: near zero when a chain has settled, positive while it
    still drifts upward."""
    v = _check_values(values)
    level = _check_level(level)
    start = require_int("start", start, minimum=0, maximum=v.shape[1] - 2)
    gens = np.arange(start, v.shape[1], dtype=np.float64)
    slopes = np.array([np.polyfit(gens, row[start:], 1)[0] for row in v])
    idx = bootstrap_seed_indices(v.shape[0], n_boot, seed)
    boot = slopes[idx].mean(1)
    low, high = _percentiles(boot[:, None], level)
    return {"slope": float(slopes.mean()), "low": float(low[0]), "high": float(high[0]), "start": start,
            "per_seed": slopes.tolist(), "level": level}
