"""One chain's analysis: the rule's floors, delays, precision side and verdicts on constructed signals."""

import numpy as np
import pytest

from imprint.generative.drift import standardised_distance
from imprint.generative.experiment import DetectionRule, analyse_chain, settling_words, verdict_words


def chain(shift_at, n_seeds=5, n_gen=6, scale=1.0, base=10.0, seed=0):
    rng = np.random.default_rng(seed)
    v = base + 0.1 * rng.standard_normal((n_seeds, n_gen))
    for g in range(shift_at, n_gen):
        v[:, g] += scale * (g - shift_at + 1)
    return v


def test_an_earlier_detector_is_called_earlier_and_the_floor_follows_the_band():
    signals = {"fid": chain(3), "trace": chain(1, seed=1, scale=-1.0), "precision": 0.99 + 0 * chain(9),
               "density": chain(2, base=1.0, seed=2)}
    signals["precision"][:, 4:] = 0.95  # a drop below a share near its cap
    rule = DetectionRule(detector="trace", threshold=3.0, band_min_relative=0.05, n_boot=300)
    res = analyse_chain(signals, rule)
    assert res.delays["trace"]["first_flag"] == 1 and res.delays["fid"]["first_flag"] == 3
    assert res.detector_lead == 2 and res.verdict.startswith("the trace flags earlier than FID")
    # precision's spread is zero: the floor is 5% of its headroom (0.01) over the threshold
    assert rule.floor("precision", signals["precision"]) == pytest.approx(0.05 * 0.01 / 3)
    assert rule.floor("fid", signals["fid"]) == pytest.approx(0.05 * np.mean(signals["fid"][:, 0]) / 3)
    assert res.delays["precision"]["first_flag"] == 4 and res.precision_side["first_flag"] == 2
    d = standardised_distance(signals["fid"], rule.floor("fid", signals["fid"]))
    assert res.effects["fid"]["estimate"] == pytest.approx(d.tolist())
    assert res.slope["low"] > 0 and "still rises" in settling_words(res.slope)


def test_verdict_words_and_missing_signals():
    same = {"first_flag": 2, "reference_first_flag": 2, "lead": 0.0, "lead_low": -1.0, "lead_high": 1.0}
    assert verdict_words(same) == "the trace and FID flag at the same generation"
    never = {**same, "first_flag": None, "reference_first_flag": None}
    assert verdict_words(never).startswith("neither")
    late = {**same, "lead": -1.0, "lead_low": -2.0, "lead_high": 0.0}
    assert verdict_words(late).endswith("includes a zero lead")
    assert "settled" in settling_words({"low": -0.1, "high": 0.2})
    with pytest.raises(ValueError, match="'trace' is missing"):
        analyse_chain({"fid": chain(1), "precision": chain(1), "density": chain(1)}, DetectionRule("trace"))
    with pytest.raises(ValueError, match="threshold"):
        DetectionRule("trace", threshold=0.0)
