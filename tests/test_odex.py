"""ODEx core: first-block features, history entries, pool decisions, fork merging (no Flower)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simlab.continual.features import FeatureSpec, reduce_activation
from simlab.continual.gaussian import GaussianStats
from simlab.continual.mahalanobis import ShiftParams
from simlab.continual.odex import Decision, Entry, OdexParams, fit_entry, forks_agree, member_threshold, merge_entries
from simlab.continual.odex_pool import Pool, Update
from simlab.continual.odex_features import (ScoreCache, _FirstBlock, _linear_response, conv_features, first_block_keys,
                                            member_scores, patch_moments, pool_scores, window_features)
from simlab.data import phantom
from tests.feature_reference import extract_features
from simlab.data.appearance import ScannerParams
from simlab.models.unet import build_model, state_to_numpy
from simlab.models.unet import ModelSpec

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
    pool = Pool(OdexParams(), {"w": np.zeros(1)}, ["h"])
    pool.members[0].history.append(entry_for(model, a))
    xi = member_threshold(pool.members[0].history, SHIFT)
    d = pool.decide_detect({0: np.array([0.5 * xi])})
    assert (d.member, d.fork) == (0, False) and d.ratio == pytest.approx(0.5)
    d = pool.decide_detect({0: np.array([3 * xi])})
    assert d.fork and d.ratio == pytest.approx(3.0)
    fork = pool.add_fork(0, {"w": np.ones(1)}, entry_for(model, b, t=2), t=2)
    assert fork.id == 1 and fork.parent == 0 and len(fork.history) == 1  # fresh history by default
    inherit = Pool(OdexParams(fork_history="inherit"), {"w": np.zeros(1)}, ["h"])
    inherit.members[0].history.append(entry_for(model, a))
    assert len(inherit.add_fork(0, {"w": np.ones(1)}, entry_for(model, b, t=2), t=2).history) == 2
    # the member with the lowest score/threshold wins, whatever its raw score
    xi1 = member_threshold(pool.members[1].history, SHIFT)
    d = pool.decide_detect({0: np.array([0.9 * xi]), 1: np.array([0.2 * xi1])})
    assert (d.member, d.fork) == (1, False)


def test_pool_round_groups_forks_caps_and_books_domains(model, windows):
    """One round of the pool without Flower: agreeing forks of a parent merge into one new member,
    a fork at the cap goes to its parent, and the oracle follows what each member trained on."""
    a, a2, b = windows
    ids = ["h1", "h2", "h3"]
    pool = Pool(OdexParams(max_members=2), {"w": np.zeros(2)}, ids)
    first = pool.first_round(ids, [entry_for(model, a), entry_for(model, a2), entry_for(model, b)], t=1)
    assert {h: d.member for h, d in first.items()} == {"h1": 0, "h2": 0, "h3": 1}  # b is unlike a: own member
    rows, combined = [], []

    def aggregate(items, reference):
        combined.append([u.hospital for u in items])
        return {"w": np.mean([u.model["w"] for u in items], axis=0)}

    def update(h, value, entry, domain):
        return Update(h, {"w": np.full(2, value)}, 10, entry, domain)

    pool.apply(1, first, [update("h1", 1.0, entry_for(model, a), "A"), update("h2", 3.0, entry_for(model, a2), "A"),
                          update("h3", 5.0, entry_for(model, b), "B")], aggregate, lambda *r: rows.append(r))
    assert combined == [["h1", "h2"], ["h3"]] and pool.members[0].state["w"].tolist() == [2.0, 2.0]
    assert len(pool.members[0].history) == 1  # h1 and h2 agree: one merged entry
    assert pool.current == {"h1": 0, "h2": 0, "h3": 1} and pool.oracle() == {"A": 0, "B": 1}
    # round 2: h1 forks, but the pool is at its cap (2): the update goes to member 0
    rows.clear()
    pool.apply(2, {"h1": Decision(0, True)}, [update("h1", 7.0, entry_for(model, b, t=2), "B")], aggregate,
               lambda *r: rows.append(r))
    assert len(pool) == 2 and ("h1", "B", "fork_refused", 1.0) in rows and pool.members[0].state["w"][0] == 7.0
    meta, arrays = pool.snapshot()
    back = Pool(OdexParams(max_members=2), {"w": np.zeros(2)}, ids)
    back.restore(meta, arrays)
    assert back.current == pool.current and back.oracle() == pool.oracle() and back.next_id == pool.next_id


def test_history_rules(model, windows):
    a, a2, b = windows
    hist = [entry_for(model, a), entry_for(model, b, t=2)]
    s = member_scores(model, SPEC, SHIFT, hist, a2).mean(axis=1)
    for rule, expected in (("sum", s.sum()), ("mean", s.mean()), ("min", s.min()), ("last", s[-1])):
        sp = ShiftParams(history=rule)
        from simlab.continual.odex import combine

        assert float(combine(s, sp)) == pytest.approx(expected)


# ------------------------------------------------------------------------------ fast scoring, cache
def reference_scores(model, history, images):
    """The straightforward computation: each entry's first block loaded with load_state_dict, features
    from a full forward pass (every module, no early stop) in float64, scores under the entry."""
    model = copy.deepcopy(model).double()
    rows = []
    for e in history:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in e.first_block.items()}, strict=False)
        z = extract_features(model, torch.from_numpy(images).double(), SPEC, batch_size=64)
        rows.append(e.history_entry().normalized_scores(z, SHIFT))
    return np.stack(rows)


def assert_scores_close(actual, reference):
    """Scores from patch moments against the float64 forward pass: equal up to float64 rounding."""
    np.testing.assert_allclose(actual, reference, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def pool_histories(windows):
    """Three members whose entries have first blocks of differently seeded (random) networks; member 1
    shares its first entry (and first block) with member 0, as a fork with an inherited history."""
    a, a2, b = windows
    keys = first_block_keys(build_model(ModelSpec(channels=[16, 32, 64]), 3), SPEC, torch.zeros(1, 1, 48, 48))

    def entry(seed, images, t):
        torch.manual_seed(seed)
        net = build_model(ModelSpec(channels=[16, 32, 64]), 3)
        fb = {k: v for k, v in state_to_numpy(net).items() if k in keys}
        return fit_entry(window_features(net, SPEC, images), fb, SHIFT, t)

    e0, e1, e2, e3 = entry(10, a, 1), entry(11, a2, 2), entry(12, b, 2), entry(13, b, 3)
    same_block = Entry(e1.first_block, e2.stats, e2.calibration, 2)  # another entry of member 0's round 2
    return {0: [e0, e1, same_block], 1: [e0, e2], 2: [e3]}


def test_pool_scores_equal_the_straightforward_computation(pool_histories, windows):
    torch.manual_seed(99)
    template = build_model(ModelSpec(channels=[16, 32, 64]), 3)
    for images in (windows[1], np.concatenate([windows[0], windows[2], windows[1]])):  # 1 and 3 batches
        fast = pool_scores(template, SPEC, SHIFT, pool_histories, images)
        assert set(fast) == {0, 1, 2}
        for m, history in pool_histories.items():
            assert_scores_close(fast[m], reference_scores(template, history, images))
            np.testing.assert_array_equal(member_scores(template, SPEC, SHIFT, history, images), fast[m])
    assert template.training  # modes restored


def test_cache_hits_give_the_cold_scores(pool_histories, windows):
    _, a2, b = windows
    torch.manual_seed(5)
    cold = pool_scores(build_model(ModelSpec(channels=[16, 32, 64]), 3), SPEC, SHIFT, pool_histories, a2)
    cache = ScoreCache()
    first = pool_scores(build_model(ModelSpec(channels=[16, 32, 64]), 3), SPEC, SHIFT, pool_histories, a2,
                        cache=cache)
    assert cache.hits == 1 and len(cache) > 0  # only member 1's entry shared with member 0
    # entries re-decoded from transport arrays, a fresh template: all hits, same bits
    decoded = {m: [Entry.from_arrays(e.to_arrays()) for e in h] for m, h in pool_histories.items()}
    hits = cache.hits
    again = pool_scores(build_model(ModelSpec(channels=[16, 32, 64]), 3), SPEC, SHIFT, decoded, a2.copy(),
                        cache=cache)
    assert cache.hits - hits == sum(len(h) for h in decoded.values())
    for m in cold:
        np.testing.assert_array_equal(first[m], cold[m])
        np.testing.assert_array_equal(again[m], cold[m])
    # other images, other statistics or other shift parameters are misses, not stale values
    other = pool_scores(build_model(ModelSpec(channels=[16, 32, 64]), 3), SPEC, SHIFT, pool_histories, b,
                        cache=cache)
    assert_scores_close(other[2], reference_scores(build_model(ModelSpec(channels=[16, 32, 64]), 3),
                                                   pool_histories[2], b))
    e = pool_histories[2][0]
    moved = Entry(e.first_block, pool_histories[0][0].stats, pool_histories[0][0].calibration, e.round)
    assert_scores_close(member_scores(build_model(ModelSpec(channels=[16, 32, 64]), 3), SPEC, SHIFT,
                                      [moved], a2, cache=cache), reference_scores(
        build_model(ModelSpec(channels=[16, 32, 64]), 3), [moved], a2))
    root = ShiftParams(distance="root")
    with pytest.raises(ValueError, match="calibrated with"):  # other parameters miss: the check still runs
        member_scores(build_model(ModelSpec(channels=[16, 32, 64]), 3), SPEC, root, [e], a2, cache=cache)


def test_score_cache_is_bounded_least_recently_used():
    cache = ScoreCache(max_bytes=3 * 80)
    for i in range(3):
        cache.put(("k", i), np.zeros(10))
    assert cache.get(("k", 0)) is not None  # 0 is now the most recently used
    cache.put(("k", 3), np.zeros(10))
    assert cache.get(("k", 1)) is None and cache.get(("k", 0)) is not None and cache.nbytes <= 3 * 80
    stored = cache.get(("k", 0))
    with pytest.raises(ValueError):
        stored[0] = 1.0  # stored values are read-only
    nothing = ScoreCache(max_bytes=0)
    nothing.put(("k",), np.zeros(1))
    assert len(nothing) == 0 and nothing.get(("k",)) is None


def test_first_block_runs_alone_only_where_that_is_exact(model, windows):
    """The first U-Net convolution is found as the feature layer's only producer, and its features come
    from patch moments: the float64 forward pass's up to rounding, the float32 one's to ~1e-6; the
    pooled reduction runs that convolution alone (bitwise equal to the forward pass); a layer whose
    input comes out of several modules falls back to the forward pass; modes come back per module."""
    a = windows[0]
    with _FirstBlock(model, SPEC) as fb:
        z = fb.features(a, batch_size=20)
        assert fb._shortcut is model.model[0].conv.unit0.conv
        assert fb._moments is not None and len(fb._moments[2]) == 3  # 48 images in batches of 20
        np.testing.assert_array_equal(fb.features(a, batch_size=20), z)  # from the moments it holds
    double = copy.deepcopy(model).double()
    np.testing.assert_allclose(z, extract_features(double, torch.from_numpy(a).double(), SPEC, batch_size=20),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(z, extract_features(model, torch.from_numpy(a), SPEC), rtol=1e-5, atol=1e-6)
    pooled = FeatureSpec(reduction="pooled", pool_size=2)
    with _FirstBlock(model, pooled) as fb:
        zp = fb.features(a, batch_size=20)
        assert fb._shortcut is model.model[0].conv.unit0.conv and fb._moments is None
    np.testing.assert_array_equal(zp, extract_features(model, torch.from_numpy(a), pooled, batch_size=20))
    deep = FeatureSpec(layer=[n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)][1])
    model.model[0].train()  # mixed modes
    with _FirstBlock(model, deep) as fb:
        z = fb.features(a)
        assert fb._shortcut is None
    assert model.model[0].training and not model.model[1].training
    model.eval()
    np.testing.assert_array_equal(z, extract_features(model, torch.from_numpy(a), deep))


@pytest.mark.parametrize("kwargs", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2, bias=False),
                                    dict(stride=(1, 2), padding=(0, 1), kernel_size=(3, 5))])
def test_features_from_patch_moments_equal_the_convolution_response(kwargs):
    """Mean and std of a convolution's response from the mean and covariance of its patches, for
    several input channels, strides, dilations, paddings, kernel shapes, with and without bias."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 8, **{"kernel_size": 3, **kwargs}).double()
    x = torch.rand(5, 3, 17, 20, dtype=torch.float64) * torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    mu, cov = patch_moments(conv, x)
    assert mu.shape == (5, 3 * conv.kernel_size[0] * conv.kernel_size[1]) and cov.shape == mu.shape + mu.shape[1:]
    with torch.no_grad():
        response = conv(x)
    for spec in (FeatureSpec(reduction="mean_std"), FeatureSpec(reduction="mean")):
        np.testing.assert_allclose(conv_features(conv, mu, cov, spec).numpy(),
                                   reduce_activation(response, spec).numpy(), rtol=1e-12, atol=1e-14)


def test_only_plain_convolutions_take_the_moment_path():
    assert _linear_response(torch.nn.Conv2d(1, 4, 3, padding=1), FeatureSpec())
    assert _linear_response(torch.nn.Conv2d(1, 4, 3, padding=1), FeatureSpec(reduction="mean"))
    assert not _linear_response(torch.nn.Conv2d(1, 4, 3, padding=1), FeatureSpec(reduction="pooled"))
    assert not _linear_response(torch.nn.Conv2d(2, 4, 3, groups=2), FeatureSpec())
    assert not _linear_response(torch.nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), FeatureSpec())
    assert not _linear_response(torch.nn.Conv2d(1, 4, 3, padding="same"), FeatureSpec())
    assert not _linear_response(torch.nn.Conv3d(1, 4, 3), FeatureSpec())


def test_first_block_load_checks_names_and_shapes(model):
    template = copy.deepcopy(model)
    with _FirstBlock(template, SPEC) as fb:
        with pytest.raises(KeyError):
            fb.load({"no.such.weight": np.zeros(1, np.float32)})
        with pytest.raises(ValueError, match="shape"):
            fb.load({"model.0.conv.unit0.conv.bias": np.zeros(3, np.float32)})
        fb.load({"model.0.conv.unit0.conv.bias": np.arange(16, dtype=np.float32)})
    np.testing.assert_array_equal(template.model[0].conv.unit0.conv.bias.detach().numpy(), np.arange(16))
