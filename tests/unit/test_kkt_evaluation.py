"""Matching and scoring of reconstructions against scikit-image, numpy and brute force."""

import itertools

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from imprint.reconstruction.evaluation import (baseline_scores, best_same_class, candidate_pixels, heldout_pixels,
                                               margin_share, nearest_assignment, normalized_cross_correlation,
                                               one_to_one_assignment, paired_seed_test, score_candidates,
                                               ssim_matrix, ssim_pairs)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def smooth_images(n, h, w, seed=0, channels=None):
    """Random but spatially correlated images in [0, 1] (white noise would make SSIM uninformative)."""
    gen = np.random.default_rng(seed)
    shape = (n, h, w) if channels is None else (n, channels, h, w)
    raw = gen.random(shape)
    from scipy.ndimage import uniform_filter

    axes = (-2, -1)
    smooth = uniform_filter(raw, size=3, axes=axes)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return smooth


def test_ssim_matches_scikit_image_on_its_gaussian_window():
    # kornia's 11-tap Gaussian (sigma 1.5), valid region: the setting scikit-image implements with
    # gaussian_weights=True and population covariances
    a, b = smooth_images(5, 25, 25, seed=1), smooth_images(5, 25, 25, seed=2)
    got = ssim_pairs(torch.from_numpy(a).reshape(5, -1), torch.from_numpy(b).reshape(5, -1), (25, 25),
                     window_size=11, padding="valid")
    ref = [structural_similarity(a[i], b[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) for i in range(5)]
    assert np.allclose(got.numpy(), ref, rtol=0, atol=1e-10)


def test_ssim_matches_scikit_image_on_colour_images():
    a, b = smooth_images(3, 32, 32, seed=3, channels=3), smooth_images(3, 32, 32, seed=4, channels=3)
    got = ssim_pairs(torch.from_numpy(a).reshape(3, -1), torch.from_numpy(b).reshape(3, -1), (3, 32, 32),
                     window_size=11, padding="valid")
    ref = [structural_similarity(a[i], b[i], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=0) for i in range(3)]
    assert np.allclose(got.numpy(), ref, rtol=0, atol=1e-10)


def brute_force_ssim(a, b, window=3, sigma=1.5):
    """SSIM with a `window`-tap Gaussian, reflect padding ('same' size), averaged: written out in numpy."""
    r = window // 2
    g = np.exp(-((np.arange(window) - r) ** 2) / (2 * sigma**2))
    kernel = np.outer(g, g) / g.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2

    def blur(img):
        padded = np.pad(img, r, mode="reflect")
        out = np.zeros_like(img)
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                out[i, j] = (padded[i:i + window, j:j + window] * kernel).sum()
        return out

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    smap = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return smap.mean()


def test_ssim_with_the_papers_3x3_window_matches_a_numpy_brute_force():
    a, b = smooth_images(4, 8, 8, seed=5), smooth_images(4, 8, 8, seed=6)
    got = ssim_pairs(torch.from_numpy(a).reshape(4, -1), torch.from_numpy(b).reshape(4, -1), (8, 8))
    ref = [brute_force_ssim(a[i], b[i]) for i in range(4)]
    assert np.allclose(got.numpy(), ref, rtol=0, atol=1e-10)
    same = ssim_pairs(torch.from_numpy(a).reshape(4, -1), torch.from_numpy(a).reshape(4, -1), (8, 8))
    assert torch.allclose(same, torch.ones(4, dtype=same.dtype))


def test_ssim_matrix_equals_pairwise_calls():
    a = torch.from_numpy(smooth_images(3, 8, 8, seed=7)).reshape(3, -1)
    b = torch.from_numpy(smooth_images(5, 8, 8, seed=8)).reshape(5, -1)
    mat = ssim_matrix(a, b, (8, 8), chunk_pairs=4)
    for i in range(3):
        for j in range(5):
            assert torch.allclose(mat[i, j], ssim_pairs(a[i:i + 1], b[j:j + 1], (8, 8))[0])


def test_normalized_cross_correlation_matches_numpy():
    a, b = torch.randn(4, 10), torch.randn(6, 10)
    got = normalized_cross_correlation(a, b)
    ref = np.corrcoef(np.r_[a.numpy(), b.numpy()])[:4, 4:]
    assert np.allclose(got.numpy(), ref, atol=1e-6)
    # invariant to a positive affine change of either image
    assert torch.allclose(normalized_cross_correlation(3 * a + 1, b), got, atol=1e-6)


def test_one_to_one_assignment_is_optimal_against_brute_force():
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        sim = torch.rand(4, 6, generator=gen)
        match = one_to_one_assignment(sim)
        assert len(set(match.tolist())) == 4
        best = max(sum(sim[i, p[i]].item() for i in range(4)) for p in itertools.permutations(range(6), 4))
        assert abs(sim[torch.arange(4), match].sum().item() - best) < 1e-5


def test_one_to_one_differs_from_nearest_when_one_candidate_is_generic():
    # candidate 0 is everyone's nearest; one-to-one gives it to one row only
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.1, 0.6], [0.95, 0.2, 0.3]])
    assert nearest_assignment(sim).tolist() == [0, 0, 0]
    assert one_to_one_assignment(sim).tolist() == [1, 2, 0]


def test_one_to_one_needs_enough_candidates():
    with pytest.raises(ValueError, match="m >= n"):
        one_to_one_assignment(torch.rand(5, 3))


def test_candidate_pixels_stretch_each_image_to_the_unit_range():
    x = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    px = candidate_pixels(x, torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(px[0], torch.tensor([0.0, 1 / 3, 1.0]))
    assert torch.allclose(px[1], torch.full((3,), 0.5))


def test_best_same_class_against_a_loop():
    sim = torch.rand(5, 7)
    lr, lc = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 2, 2, 1, 0])
    got = best_same_class(sim, lr, lc)
    for i in range(5):
        assert got[i] == max(sim[i, j] for j in range(7) if lc[j] == lr[i])


def make_split(n_per_class=6, n_heldout_per_class=6, seed=0, n_classes=2):
    n = n_classes * (n_per_class + n_heldout_per_class)
    imgs = torch.from_numpy(smooth_images(n, 8, 8, seed=seed)).reshape(n, -1)  # float64: exact ties stay ties
    # each image spans [0, 1], as real digits do, so the candidates' stretch leaves a copy unchanged
    imgs = (imgs - imgs.min(1, keepdim=True).values) / (imgs.max(1, keepdim=True).values - imgs.min(1, keepdim=True).values)
    labels = torch.arange(n) % n_classes
    k = n_classes * n_per_class
    train, held = imgs[:k], imgs[k:]
    mean = train.mean(0)
    return train - mean, labels[:k], held - mean, labels[k:], mean


def test_baselines_against_brute_force():
    x_train, l_train, x_held, l_held, mean = make_split()
    base = baseline_scores(x_train, l_train, x_held, l_held, mean, (8, 8))
    for i in range(len(x_train)):
        pool = [j for j in range(len(x_held)) if l_held[j] == l_train[i]]
        # the held-out image as the judge sees a candidate: mean added back, stretched to [0, 1]
        ssims = [ssim_pairs(x_train[i:i + 1].double() + mean,
                            candidate_pixels(x_held[j:j + 1].double(), mean.double()), (8, 8))[0]
                 for j in pool]
        assert torch.isclose(base.nearest_heldout_ssim[i], max(ssims))
        assert int(base.nearest_heldout_index[i]) == pool[int(np.argmax(ssims))]
    stretched_mean = candidate_pixels(torch.zeros(1, 64), mean)
    ref = ssim_pairs(x_train.double() + mean, stretched_mean.double().expand(len(x_train), -1), (8, 8))
    assert torch.allclose(base.mean_image_ssim, ref)


def test_memorisation_count_separates_copies_from_other_real_images():
    x_train, l_train, x_held, l_held, mean = make_split(seed=1, n_classes=1)
    base = baseline_scores(x_train, l_train, x_held, l_held, mean, (8, 8))
    n = len(x_train)
    # exact copies, shuffled, plus as many distractors: every training image is recovered
    perm = torch.randperm(n)
    copies = torch.cat([x_train[perm], torch.randn(n, 64) * 0.01])
    scores = score_candidates(copies, x_train, mean, (8, 8), base)
    assert torch.equal(perm[scores.match], torch.arange(n))
    assert scores.memorisation_count == n
    counts = scores.counts()
    assert counts["ssim_gt_04"] == n and counts["n_train"] == n
    assert counts["heldout_ssim_gt_04"] == int((base.nearest_heldout_ssim > 0.4).sum())
    # the held-out images themselves as candidates: none can beat the best held-out image
    others = score_candidates(torch.cat([x_held, x_held]), x_train, mean, (8, 8), base)
    assert others.memorisation_count == 0


def test_label_aware_matching_only_pairs_equal_labels():
    x_train, l_train, x_held, l_held, mean = make_split(seed=2)
    base = baseline_scores(x_train, l_train, x_held, l_held, mean, (8, 8))
    n = len(x_train)
    candidates = torch.cat([x_train, x_train])
    cand_labels = torch.cat([1 - l_train, l_train])  # the first copy carries the wrong label
    scores = score_candidates(candidates, x_train, mean, (8, 8), base, train_targets=l_train,
                              candidate_targets=cand_labels)
    assert torch.equal(scores.match, torch.arange(n) + n)
    with pytest.raises(ValueError, match="fewer candidates"):
        score_candidates(x_train, x_train, mean, (8, 8), base, train_targets=l_train,
                         candidate_targets=torch.zeros(n, dtype=torch.long))


def test_baselines_need_a_held_out_pool_covering_the_classes():
    x_train, l_train, x_held, l_held, mean = make_split()
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        baseline_scores(x_train, l_train, x_held[l_held == 0], l_held[l_held == 0], mean, (8, 8))
    with pytest.raises(ValueError, match="image_shape"):
        ssim_pairs(torch.rand(2, 64), torch.rand(2, 64), (7, 7))


def test_search_selection_rules_and_figures():
    from types import SimpleNamespace

    from imprint.reconstruction.evaluation import (plot_reconstruction_rows, plot_reconstructions, plot_search,
                                                   plot_size_sweep, plot_ssim_against, score_search)

    x_train, l_train, x_held, l_held, mean = make_split(seed=3, n_heldout_per_class=18, n_classes=1)
    base = baseline_scores(x_train, l_train, x_held, l_held, mean, (8, 8))
    n = len(x_train)
    noise = torch.randn(3 * n, 64, dtype=torch.float64)  # white noise: nothing like an image
    x = torch.stack([torch.cat([x_train, noise[: 2 * n]]),  # config 0: copies of the training set
                     x_held,  # config 1: other real images
                     torch.cat([x_train[: n // 2], noise[: 3 * n - n // 2]])])  # config 2: half the set
    result = SimpleNamespace(x=x, final_kkt_loss=torch.tensor([0.5, 0.1, float("nan")]),
                             diverged=torch.tensor([False, False, True]))
    search = score_search(result, x_train, mean, (8, 8), base)
    assert search.counts.tolist() == [n, 0, n // 2]
    assert search.best_by_count == 0
    assert search.best_by_loss == 1  # the lowest finite loss of a configuration that did not diverge
    fig = plot_search({"net": search}, n)
    assert len(fig.axes) == 1 and len(fig.axes[0].collections) == 1
    fig = plot_reconstructions(search.scores[0], x[0], x_train, x_held, mean, (8, 8), n_show=4, n_cols=2)
    assert len(fig.axes) == 2 * 3 * 2
    fig = plot_reconstruction_rows({"a": (search.scores[0], x[0]), "b": (search.scores[1], x[1])}, x_train, x_held,
                                   mean, (8, 8), n_show=3)
    assert len(fig.axes) == 2 * 9
    fig = plot_ssim_against(search.scores[0].ssim, search.scores[0].memorised, {"margin": torch.rand(n) + 1})
    assert len(fig.axes) == 1
    fig = plot_size_sweep([10, 20], {"net": [5, 5]})
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), [0.5, 0.25])


def digit_split(n_train=40, seed=3):
    from imprint.data.images import load_image_splits

    return load_image_splits("digits", n_train, None, seed=seed).target


def test_a_held_out_image_as_candidate_ties_with_the_bar_and_is_not_memorised():
    # the review's case: 40 float32 training digits, the float32 mean-subtracted held-out pool itself as the
    # candidates (what an attack that outputs real non-training digits would give), matched within the class
    s = digit_split()
    base = baseline_scores(s.x_train, s.label_train, s.x_heldout, s.label_heldout, s.mean, s.image_shape)
    kwargs = dict(train_targets=s.label_train, candidate_targets=s.label_heldout)
    scores = score_candidates(s.x_heldout, s.x_train, s.mean, s.image_shape, base, **kwargs)
    assert scores.memorisation_count == 0
    # each training image's bar is exactly what its nearest held-out image scores as a candidate
    as_candidate = ssim_pairs(s.x_train.double() + s.mean.double(),
                              candidate_pixels(s.x_heldout.double()[base.nearest_heldout_index], s.mean.double()),
                              s.image_shape)
    assert torch.equal(as_candidate, base.nearest_heldout_ssim)
    matched_nearest = scores.match == base.nearest_heldout_index
    assert matched_nearest.any()
    assert torch.equal(scores.ssim[matched_nearest], base.nearest_heldout_ssim[matched_nearest])
    assert torch.equal(heldout_pixels(s.x_heldout, s.mean),
                       candidate_pixels(s.x_heldout.double(), s.mean.double()))
    # the old bar (held-out images scored without the candidates' transform, summed in float32) counted
    # 13 of the 40 as memorised: ties broken by rounding
    train, held = (s.x_train + s.mean).double(), (s.x_heldout + s.mean).double()
    sim = ssim_matrix(train, held, s.image_shape)
    sim = torch.where(s.label_train.reshape(-1, 1) == s.label_heldout.reshape(1, -1), sim, float("-inf"))
    old_bar = sim.max(1).values
    old = int((scores.ssim > old_bar).sum())
    assert old == 13
    # the bar moves by rounding for 39 of the 40; for one, the winner is a held-out digit whose pixels do not
    # span [0, 1] (32 of the 1660 do not), which the stretch changes for real
    assert int(((old_bar - base.nearest_heldout_ssim).abs() > 1e-6).sum()) == 1


def test_a_copy_of_the_training_image_is_memorised():
    s = digit_split()
    base = baseline_scores(s.x_train, s.label_train, s.x_heldout, s.label_heldout, s.mean, s.image_shape)
    n = len(s.x_train)
    copies = torch.cat([s.x_train, s.x_heldout[:n]])  # float32 copies, as an attack would output them
    labels = torch.cat([s.label_train, s.label_heldout[:n]])
    scores = score_candidates(copies, s.x_train, s.mean, s.image_shape, base, train_targets=s.label_train,
                              candidate_targets=labels)
    assert torch.equal(scores.match, torch.arange(n))
    assert scores.memorisation_count == n


def test_margin_share_against_a_hand_made_table_and_scipy():
    from scipy.stats import fisher_exact

    margins = np.array([1.0, 1.01, 1.02, 1.03, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 9.5, 10.0,
                        11.0, 12.0, 13.0, 14.0])
    memorised = np.zeros(20, dtype=bool)
    memorised[[0, 1, 3, 9]] = True
    got = margin_share(margins, memorised, quantile=0.2)
    # the 0.2-quantile of 20 margins: position 3.8 between 1.03 and 2.0, so the low group is the first four
    assert got["threshold"] == pytest.approx(1.03 + 0.8 * (2.0 - 1.03))
    assert (got["n_low"], got["n_rest"], got["memorised_low"], got["memorised_rest"]) == (4, 16, 3, 1)
    assert got["share_low"] == 0.75 and got["share_rest"] == 1 / 16
    odds, p = fisher_exact([[3, 1], [1, 15]])
    assert got["p"] == pytest.approx(p) and got["odds_ratio"] == pytest.approx(odds)
    # hypergeometric by hand: P(X = k) with 4 memorised among 20 and a low group of 4
    from math import comb

    pk = [comb(4, k) * comb(16, 4 - k) / comb(20, 4) for k in range(5)]
    assert got["p"] == pytest.approx(sum(q for q in pk if q <= pk[3] * (1 + 1e-7)))
    # tensors give the same answer as arrays
    tensors = margin_share(torch.tensor(margins), torch.tensor(memorised), quantile=0.2)
    assert tensors == got
    with pytest.raises(ValueError, match="quantile"):
        margin_share(margins, memorised, quantile=1.0)
    with pytest.raises(ValueError, match="memorised"):
        margin_share(margins, memorised[:5])


def test_paired_seed_test_exact_sign_flips():
    # k = 5 seeds, every difference positive: only the identity and the all-flipped signs are as extreme
    got = paired_seed_test([5, 7, 6, 9, 8], [1, 2, 1, 3, 2])
    assert got["exact"] and got["n_seeds"] == 5
    assert got["differences"] == [4.0, 5.0, 5.0, 6.0, 6.0]
    assert got["mean"] == pytest.approx(5.2)
    assert got["p"] == pytest.approx(2 / 32)
    assert got["lo"] <= 5.2 <= got["hi"] and 4.0 <= got["lo"] and got["hi"] <= 6.0
    # d = (3, 1, -1, 2, 0): brute-force enumeration of the 32 sign vectors
    d = np.array([3.0, 1.0, -1.0, 2.0, 0.0])
    extreme = sum(abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in itertools.product([-1, 1], repeat=5))
    got = paired_seed_test(d + 10, np.full(5, 10.0))
    assert got["p"] == pytest.approx(extreme / 32)
    # all differences zero: p = 1
    assert paired_seed_test([3, 3], [3, 3])["p"] == 1.0
    # past 16 seeds: Monte Carlo, (1 + extreme) / (1 + n_perm)
    mc = paired_seed_test(np.arange(20) + 1.0, np.zeros(20), n_perm=999)
    assert not mc["exact"] and mc["p"] == pytest.approx(1 / 1000)
    with pytest.raises(ValueError, match="control_counts"):
        paired_seed_test([1, 2], [1, 2, 3])
