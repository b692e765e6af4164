"""ODEx core: first-block features, history entries, pool decisions, fork merging (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simlab.continual.features import FeatureSpec, extract_features
from simlab.continual.mahalanobis import GaussianStats, ShiftParams
from simlab.continual.odex import (Entry, OdexParams, Pool, first_block_keys, fit_entry, forks_agree,
                                   member_scores, member_threshold, merge_entries, window_features)
from simlab.data import phantom
from simlab.data.appearance import ScannerParams
from simlab.models.unet import build_model, state_to_numpy
from simlab.scenario.schema import ModelSpec

SPEC = FeatureSpec()
SHIFT = ShiftParams()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec(channels=[16, 32, 64]), 3).eval()


@pytest.fixture(scope="module")
def windows():
    pop = phantom.PopulationParams()
    a = phantom.generate(pop, ScannerParams(bias_field=0.2, noise=0.02), 48, 48, seed=1)[0]
    a2 = phantom.generate(pop, ScannerParams(bias_field=0.2, noise=0.02), 48, 48, seed=2)[0]
    b = phantom.generate(pop, ScannerParams(contrast="inverted", noise=0.03), 48, 48, seed=3)[0]
    return a, a2, b


def test_first_block_is_what_runs_before_the_first_norm(model):
    keys = first_block_keys(model, SPEC, torch.zeros(1, 1, 48, 48))
    # the first residual unit computes its skip path first, then the convolution feeding the BatchNorm
    assert set(keys) == {"model.0.residual.weight", "model.0.residual.bias",
                         "model.0.conv.unit0.conv.weight", "model.0.conv.unit0.conv.bias"}
    assert sum(model.state_dict()[k].numel() for k in keys) < 1000


def test_window_features_equal_full_forward_features(model, windows):
    z = window_features(model, SPEC, windows[0])
    ref = extract_features(model, torch.from_numpy(windows[0]), SPEC)
    assert z.shape == (48, 32)
    np.testing.assert_allclose(z, ref, rtol=1e-6, atol=1e-7)


def entry_for(model, images, t=1):
    fb = {k: v for k, v in state_to_numpy(model).items() if k.startswith("model.0.conv.unit0.conv.")}
    return fit_entry(window_features(model, SPEC, images), fb, SHIFT, t)


def test_entry_round_trip_survives_flattened_scalars(model, windows):
    e = entry_for(model, windows[0])
    arrays = {k: (v.reshape(1) if v.ndim == 0 else v) for k, v in e.to_arrays().items()}  # as after transport
    back = Entry.from_arrays(arrays)
    assert back.round == 1 and back.stats.n == 48
    np.testing.assert_allclose(back.stats.mean, e.stats.mean)
    assert back.calibration == e.calibration
    assert set(back.first_block) == {"model.0.conv.unit0.conv.weight", "model.0.conv.unit0.conv.bias"}


def test_scores_separate_a_scanner_change(model, windows):
    a, a2, b = windows
    e = entry_for(model, a)
    same = member_scores(model, SPEC, SHIFT, [e], a2).mean()
    other = member_scores(model, SPEC, SHIFT, [e], b).mean()
    xi = member_threshold([e], SHIFT)
    assert same <= xi < other
    assert other > 3 * same


def test_entries_scored_with_their_own_first_block(model, windows):
    """Training the first convolution afterwards must not move the score of the old entry."""
    a, a2, _ = windows
    e = entry_for(model, a)
    before = member_scores(model, SPEC, SHIFT, [e], a2)
    moved = build_model(ModelSpec(channels=[16, 32, 64]), 3).eval()  # other first-block weights
    after = member_scores(moved, SPEC, SHIFT, [e], a2)
    np.testing.assert_allclose(before, after, rtol=1e-9)


def test_merged_entry_has_pooled_statistics(model, windows):
    a, a2, _ = windows
    e1, e2 = entry_for(model, a), entry_for(model, a2)
    m = merge_entries([e1, e2])
    pooled = GaussianStats.from_features(np.concatenate([window_features(model, SPEC, a), window_features(model, SPEC, a2)]))
    assert m.stats.n == 96
    np.testing.assert_allclose(m.stats.mean, pooled.mean, rtol=1e-10)
    np.testing.assert_allclose(m.stats.empirical_covariance(), pooled.empirical_covariance(), rtol=1e-8, atol=1e-12)
    assert m.calibration.n_id == 96


def test_forks_agree_only_on_the_same_distribution(model, windows):
    a, a2, b = windows
    assert forks_agree(entry_for(model, a), entry_for(model, a2), SHIFT)
    assert not forks_agree(entry_for(model, a), entry_for(model, b), SHIFT)


def test_pool_decides_by_ratio_and_forks(model, windows):
    a, _, b = windows
    pool = Pool(OdexParams(), {"w": np.zeros(1)})
    pool.members[0].history.append(entry_for(model, a))
    xi = member_threshold(pool.members[0].history, SHIFT)
    d = pool.decide_detect({0: np.array([0.5 * xi])})
    assert (d.member, d.fork) == (0, False) and d.ratio == pytest.approx(0.5)
    d = pool.decide_detect({0: np.array([3 * xi])})
    assert d.fork and d.ratio == pytest.approx(3.0)
    fork = pool.add_fork(0, {"w": np.ones(1)}, entry_for(model, b, t=2), t=2)
    assert fork.id == 1 and fork.parent == 0 and len(fork.history) == 1  # fresh history by default
    inherit = Pool(OdexParams(fork_history="inherit"), {"w": np.zeros(1)})
    inherit.members[0].history.append(entry_for(model, a))
    assert len(inherit.add_fork(0, {"w": np.ones(1)}, entry_for(model, b, t=2), t=2).history) == 2
    # the member with the lowest score/threshold wins, whatever its raw score
    xi1 = member_threshold(pool.members[1].history, SHIFT)
    d = pool.decide_detect({0: np.array([0.9 * xi]), 1: np.array([0.2 * xi1])})
    assert (d.member, d.fork) == (1, False)


def test_history_rules(model, windows):
    a, a2, b = windows
    hist = [entry_for(model, a), entry_for(model, b, t=2)]
    s = member_scores(model, SPEC, SHIFT, hist, a2).mean(axis=1)
    for rule, expected in (("sum", s.sum()), ("mean", s.mean()), ("min", s.min()), ("last", s[-1])):
        sp = ShiftParams(history=rule)
        from simlab.continual.odex import combine

        assert float(combine(s, sp)) == pytest.approx(expected)
