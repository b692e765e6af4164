"""Shift-detection statistics: sufficient statistics, Ledoit-Wolf, Mahalanobis, ODEx calibration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.spatial.distance

from simlab.continual.gaussian import Gaussian, GaussianStats, ledoit_wolf_shrinkage
from simlab.continual.mahalanobis import Calibration, HistoryEntry, ShiftParams, fold_ids, id_scores
from simlab.continual.odex import Entry, combine, decide, member_threshold, route


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _correlated(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + rng.normal(size=d) + offset


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(tie) by exhaustive comparison (Mann-Whitney U / (n m))."""
    diff = pos[:, None] - neg[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


def test_sq_distance_matches_scipy_and_explicit_inverse():
    rng = np.random.default_rng(1)
    d = 12
    cov = _random_spd(rng, d)
    mean = rng.normal(size=d)
    z = rng.multivariate_normal(mean, cov, size=50) + rng.normal(size=(50, d))
    g = Gaussian(mean, cov)
    d2 = g.sq_distance(z)
    vi = np.linalg.inv(cov)
    ref_scipy = np.array([scipy.spatial.distance.mahalanobis(x, mean, vi) ** 2 for x in z])
    ref_inv = np.einsum("ij,jk,ik->i", z - mean, vi, z - mean)
    assert d2.shape == (50,)
    np.testing.assert_allclose(d2, ref_scipy, rtol=1e-10)
    np.testing.assert_allclose(d2, ref_inv, rtol=1e-10)
    np.testing.assert_allclose(g.distance(z, "root"), np.sqrt(ref_inv), rtol=1e-10)
    np.testing.assert_allclose(g.chol @ g.chol.T, cov, rtol=1e-12, atol=1e-14)
    assert g.ridge == 0.0
    # a single vector is one row
    np.testing.assert_allclose(g.sq_distance(z[3]), d2[3:4], rtol=1e-12)
    with pytest.raises(ValueError):
        g.sq_distance(np.zeros((2, d + 1)))
    with pytest.raises(ValueError):
        g.distance(z, "cubed")


def test_identity_estimator_is_the_squared_euclidean_distance_to_the_mean():
    z = np.random.default_rng(3).normal(size=(20, 5)) * np.array([1.0, 10.0, 0.1, 1.0, 3.0])
    stats = GaussianStats.from_features(z)
    np.testing.assert_array_equal(stats.covariance("identity"), np.eye(5))
    q = np.random.default_rng(4).normal(size=(3, 5))
    d2 = Gaussian.from_stats(stats, "identity").distance(q)
    np.testing.assert_allclose(d2, ((q - z.mean(axis=0)) ** 2).sum(axis=1), rtol=1e-12)


def test_ridge_only_when_cholesky_fails():
    rng = np.random.default_rng(2)
    n, d = 8, 20  # N < d: the MLE covariance has rank N - 1
    z = rng.normal(size=(n, d)) * 2.0
    stats = GaussianStats.from_features(z)
    s = stats.covariance("empirical")
    g = Gaussian.from_stats(stats, "empirical")
    assert g.ridge == pytest.approx(1e-6 * np.trace(s) / d, rel=1e-12)
    np.testing.assert_allclose(g.cov, s + g.ridge * np.eye(d), rtol=1e-12, atol=1e-15)
    fresh = g.sq_distance(rng.normal(size=(5, d)) * 2.0)
    assert np.all(np.isfinite(fresh)) and np.all(fresh > 0)
    # Ledoit-Wolf on the same data is positive definite: no ridge
    assert Gaussian.from_stats(stats, "ledoit_wolf").ridge == 0.0
    # constant features: zero trace, the ridge falls back to an absolute scale
    const = GaussianStats.from_features(np.ones((4, 3)))
    gc = Gaussian.from_stats(const, "ledoit_wolf")
    assert gc.ridge == pytest.approx(1e-6)
    assert gc.sq_distance(np.ones(3))[0] == 0.0


# ---------------------------------------------------------------------------------------------
# Sufficient statistics and exact merging
# ---------------------------------------------------------------------------------------------


def test_stats_views_match_direct_sums():
    rng = np.random.default_rng(3)
    z = _correlated(rng, 40, 6, offset=3.0)
    st = GaussianStats.from_features(z)
    y = z - z.mean(0)
    r = np.sum(y * y, axis=1)
    assert st.n == 40 and st.dim == 6
    np.testing.assert_allclose(st.sum_z, z.sum(0), rtol=1e-12)
    np.testing.assert_allclose(st.sum_zz, z.T @ z, rtol=1e-12)
    np.testing.assert_allclose(st.m3, (r[:, None] * y).sum(0), rtol=1e-10, atol=1e-12)
    assert st.m4 == pytest.approx(float(np.sum(r**2)), rel=1e-12)
    np.testing.assert_allclose(st.covariance("empirical"), np.cov(z.T, bias=True), rtol=1e-12)
    assert not st.mean.flags.writeable


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_merge_is_exact(offset):
    rng = np.random.default_rng(4)
    a = _correlated(rng, 37, 9, offset)
    b = _correlated(rng, 11, 9, offset) * 1.5 + 0.7
    c = _correlated(rng, 5, 9, offset)
    pooled = GaussianStats.from_features(np.vstack([a, b, c]))
    sa, sb, sc = (GaussianStats.from_features(x) for x in (a, b, c))
    for merged in (sa + sb + sc, sa + (sb + sc), GaussianStats.merge(sc, sa + sb)):
        assert merged.n == pooled.n
        np.testing.assert_allclose(merged.mean, pooled.mean, rtol=1e-12, atol=1e-10)
        for est in ("empirical", "ledoit_wolf"):
            np.testing.assert_allclose(merged.covariance(est), pooled.covariance(est), rtol=0, atol=1e-10)
        np.testing.assert_allclose(merged.m3, pooled.m3, rtol=1e-9, atol=1e-9)
        assert merged.m4 == pytest.approx(pooled.m4, rel=1e-11)
        assert merged.ledoit_wolf_shrinkage() == pytest.approx(pooled.ledoit_wolf_shrinkage(), abs=1e-12)
    # the empty set is the identity
    e = GaussianStats.empty(9)
    assert (e + sa) is sa and (sa + e) is sa
    with pytest.raises(ValueError):
        sa + GaussianStats.empty(4)


def test_subtract_inverts_merge():
    rng = np.random.default_rng(5)
    a = _correlated(rng, 30, 7, 2.0)
    b = _correlated(rng, 10, 7, 2.0) + 1.0
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    back = (sa + sb) - sb
    assert back.n == 30
    np.testing.assert_allclose(back.mean, sa.mean, atol=1e-12)
    for est in ("empirical", "ledoit_wolf"):
        np.testing.assert_allclose(back.covariance(est), sa.covariance(est), atol=1e-10)
    assert back.m4 == pytest.approx(sa.m4, rel=1e-10)
    assert ((sa + sb) - (sa + sb)).n == 0
    with pytest.raises(ValueError):
        sb - sa


def test_transport_roundtrip():
    rng = np.random.default_rng(6)
    st = GaussianStats.from_features(rng.normal(size=(9, 4)))
    back = GaussianStats.from_arrays(st.to_arrays())
    assert back.n == st.n and back.m4 == st.m4
    np.testing.assert_array_equal(back.m2, st.m2)
    cal = Calibration.from_scores([1.0, 3.0, 4.0])
    assert Calibration.from_dict(cal.to_dict()) == cal


# ---------------------------------------------------------------------------------------------
# Ledoit-Wolf against scikit-learn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "offset"), [(200, 10, 0.0), (20, 50, 0.0), (60, 60, 5.0), (3, 4, 0.0), (50, 1, 2.0)])
def test_ledoit_wolf_matches_sklearn(n, d, offset):
    sk = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(7 + n + d)
    z = _correlated(rng, n, d, offset)
    ref = sk.LedoitWolf(assume_centered=False).fit(z)
    st = GaussianStats.from_features(z)
    assert st.ledoit_wolf_shrinkage() == pytest.approx(ref.shrinkage_, abs=1e-10)
    assert ledoit_wolf_shrinkage(z) == pytest.approx(sk.ledoit_wolf_shrinkage(z), abs=1e-10)
    np.testing.assert_allclose(st.covariance("ledoit_wolf"), ref.covariance_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(st.mean, ref.location_, atol=1e-12)
    # merged from two hospitals = pooled, still equal to scikit-learn
    k = max(1, n // 3)
    merged = GaussianStats.from_features(z[:k]) + GaussianStats.from_features(z[k:])
    np.testing.assert_allclose(merged.covariance("ledoit_wolf"), ref.covariance_, rtol=0, atol=1e-10)
    # and its squared distances equal scikit-learn's .mahalanobis (squared) up to the solver
    q = z[: min(n, 5)] + 0.3
    g = Gaussian.from_stats(st, "ledoit_wolf")
    np.testing.assert_allclose(g.sq_distance(q), ref.mahalanobis(q), rtol=1e-7)


def test_shrinkage_is_large_when_n_much_smaller_than_d():
    rng = np.random.default_rng(8)
    few = GaussianStats.from_features(rng.normal(size=(10, 100)))
    # isotropic truth is the LW target, so use unequal variances for the large-N case
    many = GaussianStats.from_features(rng.normal(size=(5000, 5)) * np.arange(1.0, 6.0))
    assert few.ledoit_wolf_shrinkage() > 0.8
    assert many.ledoit_wolf_shrinkage() < 0.01


def test_n_much_smaller_than_d_still_separates_a_3_sigma_shift():
    rng = np.random.default_rng(9)
    n, d = 20, 100
    sd = np.exp(rng.uniform(-1.0, 1.0, size=d))  # per-coordinate sigma
    base = rng.normal(size=d)
    train = base + rng.normal(size=(n, d)) * sd
    test_id = base + rng.normal(size=(300, d)) * sd
    shift = np.zeros(d)
    shift[:20] = 3.0 * sd[:20]  # 3 sigma mean shift on 20 coordinates
    test_ood = base + shift + rng.normal(size=(300, d)) * sd
    g = Gaussian.from_stats(GaussianStats.from_features(train), "ledoit_wolf")
    u_id, u_ood = g.sq_distance(test_id), g.sq_distance(test_ood)
    assert np.all(np.isfinite(u_id)) and np.all(np.isfinite(u_ood))
    assert _auc(u_id, u_ood) > 0.95
    # windows of 10 images: mean scores are perfectly separated
    assert u_ood.reshape(30, 10).mean(1).min() > u_id.reshape(30, 10).mean(1).max()
    # the reference pseudo-inverse MLE sees every training point at D^2 = N - 1 (no information)
    s = GaussianStats.from_features(train).covariance("empirical")
    p = np.linalg.pinv(s)
    y = train - train.mean(0)
    np.testing.assert_allclose(np.einsum("ij,jk,ik->i", y, p, y), n - 1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Normalisation and threshold
# ---------------------------------------------------------------------------------------------


def test_calibration_on_hand_made_scores():
    cal = Calibration.from_scores([2.0, 8.0, 4.0, 6.0], max_factor=2.0)
    assert (cal.min_id, cal.max_id, cal.n_id) == (2.0, 8.0, 4)
    assert cal.upper == 16.0
    # normalised ID scores 0, 6/14, 2/14, 4/14 -> mean 3/14; xi = 2 * 3/14
    assert cal.mean_norm_id == pytest.approx(3 / 14, abs=1e-15)
    assert cal.threshold(2.0) == pytest.approx(6 / 14, abs=1e-15)
    assert cal.mean_id == pytest.approx(5.0, abs=1e-14)
    np.testing.assert_allclose(cal.normalize([0.0, 2.0, 9.0, 16.0, 30.0]), [0, 0, 0.5, 1, 1], atol=1e-15)
    cal3 = Calibration.from_scores([2.0, 8.0, 4.0, 6.0], max_factor=3.0)  # upper 24, denom 22
    assert cal3.mean_norm_id == pytest.approx(3 / 22, abs=1e-15)
    # all equal with max_factor 1: step at min
    flat = Calibration.from_scores([5.0, 5.0], max_factor=1.0)
    assert flat.mean_norm_id == 0.0
    np.testing.assert_array_equal(flat.normalize([4.0, 5.0, 5.1]), [0.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        Calibration.from_scores([])


def test_calibration_merge_equals_pooled_scores():
    rng = np.random.default_rng(10)
    u1, u2 = rng.gamma(3.0, size=17), rng.gamma(5.0, size=40)
    merged = Calibration.merge(Calibration.from_scores(u1), Calibration.from_scores(u2))
    pooled = Calibration.from_scores(np.concatenate([u1, u2]))
    assert merged.n_id == 57
    assert (merged.min_id, merged.max_id) == (pooled.min_id, pooled.max_id)
    assert merged.mean_norm_id == pytest.approx(pooled.mean_norm_id, abs=1e-13)
    with pytest.raises(ValueError):
        Calibration.merge(Calibration.from_scores(u1), Calibration.from_scores(u2, max_factor=3.0))


def test_cross_fitted_calibration_tracks_fresh_in_distribution_scores():
    rng = np.random.default_rng(11)
    d, n = 16, 64
    a = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    draw = lambda m: rng.normal(size=(m, d)) @ a  # noqa: E731
    window, fresh = draw(n), draw(4000)
    p_in = ShiftParams(estimator="empirical", calib_folds=0)
    p_cv = ShiftParams(estimator="empirical", calib_folds=5)
    e_in, e_cv = HistoryEntry.fit(window, p_in), HistoryEntry.fit(window, p_cv)
    fresh_mean = float(np.mean(e_in.raw_scores(fresh, p_in)))
    # in-sample MLE: the mean D^2 of the fitting points is exactly d
    assert e_in.calibration.mean_id == pytest.approx(d, rel=1e-9)
    assert e_in.calibration.mean_id < 0.8 * fresh_mean
    assert abs(e_cv.calibration.mean_id - fresh_mean) < 0.25 * fresh_mean
    assert e_cv.calibration.n_id == n


def test_id_scores_inside_merged_stats_equal_direct_complement_fits():
    rng = np.random.default_rng(12)
    d = 5
    local, other = rng.normal(size=(12, d)), rng.normal(size=(30, d)) + 0.5
    merged = GaussianStats.from_features(local) + GaussianStats.from_features(other)
    params = ShiftParams(calib_folds=4)
    u = id_scores(merged, local, params)
    folds = fold_ids(12, 4)
    np.testing.assert_array_equal(folds, np.arange(12) % 4)
    for f in range(4):
        keep = np.vstack([local[folds != f], other])
        g = Gaussian.from_stats(GaussianStats.from_features(keep), "ledoit_wolf")
        np.testing.assert_allclose(u[folds == f], g.sq_distance(local[folds == f]), rtol=1e-9)
    with pytest.raises(ValueError):
        id_scores(GaussianStats.from_features(local[:3]), local, params)


# ---------------------------------------------------------------------------------------------
# History aggregation
# ---------------------------------------------------------------------------------------------


def _unit_entry(mean, mean_norm_id: float) -> Entry:
    """Entry whose empirical covariance is exactly I (D^2 = |z - mean|^2), normaliser uhat = min(D^2, 10)/10."""
    mean = np.asarray(mean, dtype=float)
    stats = GaussianStats(4, mean, 4.0 * np.eye(2), np.zeros(2), 0.0)
    return Entry({}, stats, Calibration(0.0, 5.0, mean_norm_id, 10, 2.0, "empirical", "squared"), 1)


def _per_entry(entries, z, params) -> np.ndarray:
    return np.stack([e.history_entry().normalized_scores(z, params) for e in entries])


def test_history_modes_give_documented_values():
    # entries (oldest first) and window Z = [(1, 0), (0, 2)]:
    #   e1 mean (0,0): D^2 = [1, 4]  -> uhat [0.1, 0.4], window mean 0.25, xi 0.2
    #   e2 mean (0,1): D^2 = [2, 1]  -> uhat [0.2, 0.1], window mean 0.15, xi 0.4
    #   e3 mean (3,0): D^2 = [4, 13] -> uhat [0.4, 1.0], window mean 0.70, xi 0.6
    entries = [_unit_entry([0, 0], 0.1), _unit_entry([0, 1], 0.2), _unit_entry([3, 0], 0.3)]
    z = np.array([[1.0, 0.0], [0.0, 2.0]])
    expected = {
        "sum": (1.1, [0.7, 1.5], 1.2),
        "mean": (1.1 / 3, [0.7 / 3, 0.5], 0.4),
        "min": (0.15, [0.1, 0.1], 0.2),
        "last": (0.7, [0.4, 1.0], 0.6),
    }
    for mode, (window, per_image, xi) in expected.items():
        p = ShiftParams(estimator="empirical", history=mode)
        u = _per_entry(entries, z, p)
        assert float(combine(u.mean(axis=1), p)) == pytest.approx(window, abs=1e-12), mode
        np.testing.assert_allclose(combine(u, p), per_image, atol=1e-12, err_msg=mode)
        assert member_threshold(entries, p) == pytest.approx(xi, abs=1e-12), mode
    with pytest.raises(ValueError):  # entries calibrated for the empirical estimator
        _per_entry(entries, z, ShiftParams(estimator="ledoit_wolf"))
    with pytest.raises(ValueError):
        combine(np.zeros((0, 2)), ShiftParams(estimator="empirical"))


# ---------------------------------------------------------------------------------------------
# Pool decisions
# ---------------------------------------------------------------------------------------------


def test_decide_and_route_units():
    p = ShiftParams(estimator="empirical", history="sum")
    hist = {1: [_unit_entry([0, 0], 0.5)], 2: [_unit_entry([0, 0], 0.125)]}  # thresholds 1.0 and 0.25
    d = decide({1: np.array([0.9]), 2: np.array([0.1])}, hist, p)
    assert (d.member, d.fork) == (2, False) and d.ratio == pytest.approx(0.4)
    d = decide({1: np.array([0.3]), 2: np.array([0.3])}, hist, p)
    assert (d.member, d.fork) == (1, False)  # 0.3/1.0 beats 0.3/0.25: members compare by score / threshold
    d = decide({1: np.array([2.0]), 2: np.array([0.6])}, hist, p)
    assert (d.member, d.fork) == (1, True)  # every ratio over 1: fork the closest member
    tie = decide({1: np.array([0.25]), 2: np.array([0.0625])}, hist, p)
    assert tie.member == 1  # equal ratios: the lowest id
    per_entry = {1: np.array([[0.3, 0.2, 0.5]]), 2: np.array([[0.05, 0.1, 0.0]])}
    np.testing.assert_array_equal(route(per_entry, hist, p), [2, 1, 2])  # 0.3 vs 0.2, 0.2 vs 0.4, 0.5 vs 0


def _domains(d: int):
    rng = np.random.default_rng(13)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)

    def sample(k: int, n: int, gen: np.random.Generator) -> np.ndarray:
        mu = np.zeros(d)
        mu[5 * k : 5 * k + 5] = 3.0  # domain k: 3-unit shift on its own 5 coordinates
        return gen.normal(size=(n, d)) @ mix + mu

    return sample


@pytest.mark.parametrize("seed", range(5))
def test_pool_decisions_on_three_gaussians(seed):
    d = 32
    sample = _domains(d)
    gen = np.random.default_rng(100 + seed)
    params = ShiftParams()

    def entry(z):
        he = HistoryEntry.fit(z, params)
        return Entry({}, he.stats, he.calibration, 1)

    pool = {1: [entry(sample(0, 64, gen))], 2: [entry(sample(1, 64, gen))]}

    def window(z):
        return decide({m: _per_entry(h, z, params).mean(axis=1) for m, h in pool.items()}, pool, params)

    assert (window(sample(0, 32, gen)).member, window(sample(0, 32, gen)).fork) == (1, False)
    assert (window(sample(1, 32, gen)).member, window(sample(1, 32, gen)).fork) == (2, False)
    assert window(sample(2, 32, gen)).fork
    # routing of mixed test images from domains 1 and 2
    truth = np.repeat([1, 2], 200)
    z = np.vstack([sample(0, 200, gen), sample(1, 200, gen)])
    purity = np.mean(route({m: _per_entry(h, z, params) for m, h in pool.items()}, pool, params) == truth)
    assert purity > 0.95


def test_shift_params_convention():
    p = ShiftParams()
    assert (p.estimator, p.distance, p.threshold_factor, p.max_factor, p.history) == (
        "ledoit_wolf", "squared", 2.0, 2.0, "sum")
    for f in dataclasses.fields(ShiftParams):
        assert f.default is not dataclasses.MISSING and "help" in f.metadata
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.history = "min"  # type: ignore[misc]
    assert ShiftParams(calib_folds=1).check() == [("calib_folds", "use 0 (in-sample) or at least 2 folds")]
    assert ShiftParams(calib_folds=0).check() == []
