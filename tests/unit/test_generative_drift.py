"""Effect sizes, detection delays and late slopes over seeds, against brute-force loops."""

import itertools

import numpy as np
import pytest

from imprint.generative.drift import (bootstrap_seed_indices, detection_delays, effect_sizes, first_crossing,
                                      late_slope, standardised_distance)


def brute_distance(v, floor=0.0):
    n_seeds, n_gen = v.shape
    m0 = sum(v[s, 0] for s in range(n_seeds)) / n_seeds
    sd0 = (sum((v[s, 0] - m0) ** 2 for s in range(n_seeds)) / (n_seeds - 1)) ** 0.5
    spread = max(sd0, floor)
    return np.array([(sum(v[s, g] for s in range(n_seeds)) / n_seeds - m0) / spread for g in range(n_gen)])


VALUES = np.array([[10.0, 10.5, 13.0, 20.0],
                   [11.0, 14.0, 15.0, 25.0],
                   [12.0, 11.0, 12.5, 18.0],
                   [10.5, 10.0, 14.0, 21.0]])


def test_standardised_distance_against_a_loop():
    assert np.allclose(standardised_distance(VALUES), brute_distance(VALUES))
    assert np.allclose(standardised_distance(VALUES, floor=5.0), brute_distance(VALUES, 5.0))
    flat = np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.5]])
    assert standardised_distance(flat).tolist() == [0.0, 0.0, np.inf]


def test_bootstrap_interval_matches_exhaustive_resampling():
    # with every one of the n^n resamples of 4 seeds as the bootstrap, the interval is the exact percentile
    # of the brute-force distances over all of them
    indices = np.array(list(itertools.product(range(4), repeat=4)))
    es = effect_sizes(VALUES, floor=0.1, level=0.8, indices=indices)
    brute = np.stack([brute_distance(VALUES[row], 0.1) for row in indices])
    assert np.allclose(es.estimate, brute_distance(VALUES, 0.1))
    assert np.allclose(es.low, np.percentile(brute, 10, axis=0, method="lower"))
    assert np.allclose(es.high, np.percentile(brute, 90, axis=0, method="higher"))
    assert np.all(es.low <= es.estimate + 1e-12) and np.all(es.estimate <= es.high + 1e-12)
    drawn = effect_sizes(VALUES, floor=0.1, level=0.8, n_boot=4000, seed=1)
    assert np.allclose(drawn.low, es.low, rtol=0.2, atol=0.3) and np.allclose(drawn.high, es.high, rtol=0.2, atol=0.3)
    assert bootstrap_seed_indices(4, 10, 0).shape == (10, 4)


def test_first_crossing_and_detection_delays():
    assert first_crossing(np.array([0.0, 1.0, -3.5, 9.0]), 3.0) == 2
    assert first_crossing(np.array([0.0, 1.0, np.nan]), 3.0) is None
    slow = np.array([[1.0, 1.0, 1.0, 1.0], [1.2, 1.2, 1.2, 1.2], [0.8, 0.8, 0.8, 0.8], [1.0, 1.0, 1.0, 1.0]])
    early = VALUES.copy()
    early[:, 1] += 10  # leaves generation 0 by far at generation 1 in every resample
    res = detection_delays({"fid": VALUES, "early": early, "flat": slow}, "fid", threshold=3.0, n_boot=500)
    d = standardised_distance(VALUES)
    assert res["fid"]["first_flag"] == first_crossing(d, 3.0) and res["fid"]["lead"] == 0.0
    assert res["early"]["first_flag"] == 1 and res["early"]["lead"] == res["fid"]["first_flag"] - 1
    assert res["flat"]["first_flag"] is None and res["flat"]["lead"] == res["fid"]["first_flag"] - 4
    assert res["early"]["share_later"] == 0.0 and res["flat"]["share_earlier"] == 0.0
    assert res["early"]["lead_low"] <= res["early"]["lead"] <= res["early"]["lead_high"]
    with pytest.raises(ValueError, match="reference"):
        detection_delays({"fid": VALUES}, "trace", 3.0)
    with pytest.raises(ValueError, match="shapes"):
        detection_delays({"fid": VALUES, "x": VALUES[:, :3]}, "fid", 3.0)


def test_late_slope_against_numpy_and_bad_input():
    res = late_slope(VALUES, start=1, n_boot=200)
    slopes = [np.polyfit([1, 2, 3], row[1:], 1)[0] for row in VALUES]
    assert res["slope"] == pytest.approx(np.mean(slopes)) and res["low"] <= res["slope"] <= res["high"]
    with pytest.raises(ValueError, match="start"):
        late_slope(VALUES, start=3)
    with pytest.raises(ValueError, match="level"):
        effect_sizes(VALUES, level=1.5)
    with pytest.raises(ValueError, match="seeds >= 2"):
        effect_sizes(VALUES[:1])
