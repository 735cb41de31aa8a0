"""Chapter 04's analysis of one chain: effect sizes of every signal, detection delays against FID, the
precision-side rule, the late slope and the chain's verdict.

The rule is fixed before a run: a signal flags at the first generation g >= 1 at which its effect size
(:mod:`imprint.generative.drift`, in units of generation 0's seed-to-seed spread) reaches ``threshold``. The
spread is floored at ``band_floor(mean_0, band_min_relative, bounds) / threshold``, so that the rule is the
generation-0 band of :func:`imprint.generative.self_consuming.first_departure` applied to the seed mean;
shares (precision, recall, coverage) take their floor from the distance to the nearer bound, so a value near
1 can still flag a rise or a drop. The *detector* is one spectral signal named in advance; the verdict
compares its flag with FID's through a paired bootstrap over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from imprint.generative.drift import detection_delays, effect_sizes, late_slope
from imprint.generative.self_consuming import band_floor
from imprint.runtime.checks import require_float, require_int

BOUNDED = ("precision", "recall", "coverage", "label_agreement")


@dataclass(frozen=True)
class DetectionRule:
    """The pre-declared rule: threshold (generation-0 spreads), floor, detector and reference signal,
    the signals whose earlier flag is the precision side, the bootstrap."""

    detector: str
    threshold: float = 3.0
    band_min_relative: float = 0.05
    reference: str = "fid"
    precision_side: tuple[str, ...] = ("precision", "density")
    bounded: tuple[str, ...] = BOUNDED
    n_boot: int = 2000
    level: float = 0.9
    seed: int = 0

    def __post_init__(self):
        require_float("threshold", self.threshold, minimum=0.0, strict_minimum=True)
        require_float("band_min_relative", self.band_min_relative, minimum=0.0)
        require_int("n_boot", self.n_boot, minimum=1)
        if not 0 < self.level < 1:
            raise ValueError(f"level={self.level}: expected a coverage in (0, 1)")

    def floor(self, key: str, values: np.ndarray) -> float:
        centre = float(np.mean(np.asarray(values, dtype=np.float64)[:, 0]))
        bounds = (0.0, 1.0) if key in self.bounded else None
        return band_floor(centre, self.band_min_relative, bounds) / self.threshold


@dataclass
class ChainAnalysis:
    effects: dict[str, dict]
    delays: dict[str, dict]
    precision_side: dict
    verdict: str
    detector_lead: float
    detector_lead_low: float
    detector_lead_high: float
    slope: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"effects": self.effects, "delays": self.delays, "precision_side": self.precision_side,
                "verdict": self.verdict, "detector_lead": self.detector_lead,
                "detector_lead_low": self.detector_lead_low, "detector_lead_high": self.detector_lead_high,
                "slope": self.slope}


def verdict_words(delay: dict, detector_name: str = "the trace") -> str:
    """A sentence from a detector's delay against FID: earlier, later or the same, and whether the seeds'
    interval excludes a zero lead."""
    first, ref = delay["first_flag"], delay["reference_first_flag"]
    if first is None and ref is None:
        return f"neither {detector_name} nor FID leaves generation 0's spread"
    lead, low, high = delay["lead"], delay["lead_low"], delay["lead_high"]
    if lead > 0:
        word = f"{detector_name} flags earlier than FID"
    elif lead < 0:
        word = f"{detector_name} flags later than FID"
    else:
        word = f"{detector_name} and FID flag at the same generation"
    if low > 0 or high < 0:
        return word + ", and the seeds' bootstrap interval of the lead excludes zero"
    if lead != 0:
        return word + ", but the seeds' interval includes a zero lead"
    return word


def analyse_chain(signals: Mapping[str, np.ndarray], rule: DetectionRule, slope_of: str = "fid",
                  detector_name: str = "the trace") -> ChainAnalysis:
    """Effect sizes of every signal of one chain (``[seeds, generations]`` each), delays against the
    reference, the precision side's first flag, the late slope of ``slope_of`` over the chain's second half,
    and the verdict on the detector."""
    for key in (rule.detector, rule.reference, slope_of, *rule.precision_side):
        if key not in signals:
            raise ValueError(f"signal {key!r} is missing: expected it among {sorted(signals)}")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in signals.items()}
    floors = {k: rule.floor(k, v) for k, v in arrays.items()}
    effects = {}
    for k, v in arrays.items():
        es = effect_sizes(v, floors[k], rule.n_boot, rule.level, rule.seed)
        effects[k] = es.as_dict()
    delays = detection_delays(arrays, rule.reference, rule.threshold, floors, rule.n_boot, rule.level, rule.seed)
    side = [delays[k]["first_flag"] for k in rule.precision_side]
    flagged = [f for f in side if f is not None]
    precision_side = {"first_flag": min(flagged) if flagged else None,
                      "by_signal": dict(zip(rule.precision_side, side))}
    n_gen = next(iter(arrays.values())).shape[1]
    slope = late_slope(arrays[slope_of], max(0, min(n_gen // 2, n_gen - 2)), rule.n_boot, rule.level, rule.seed)
    d = delays[rule.detector]
    return ChainAnalysis(effects, delays, precision_side, verdict_words(d, detector_name), d["lead"],
                         d["lead_low"], d["lead_high"], slope)


def settling_words(slope: dict, what: str = "FID") -> str:
    """Whether a chain has settled: its late slope's interval holds zero (or lies below it)."""
    if slope["high"] < 0:
        return f"{what} still falls over the second half of the chain"
    if slope["low"] > 0:
        return f"{what} still rises over the second half of the chain"
    return f"{what} has settled: its slope over the second half of the chain is indistinguishable from zero"
