"""Aggregation rules: FedAvg, inverse-distance aggregation (IDA, IDA+FedAvg) and update checks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from simlab.aggregation import (
    RULES,
    AggregateResult,
    AggregationParams,
    EmptyAggregation,
    aggregate,
    check_update,
    ida_weights,
    model_nbytes,
    update_norm,
)
from simlab.aggregation.core import WeightingRule


def make_model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A small conv + BatchNorm state dict with the dtypes torch uses."""
    return {
        "conv.weight": (scale * rng.normal(size=(4, 2, 3, 3))).astype(np.float32),
        "conv.bias": (scale * rng.normal(size=(4,))).astype(np.float32),
        "bn.weight": (1.0 + 0.1 * scale * rng.normal(size=(4,))).astype(np.float32),
        "bn.bias": (0.1 * scale * rng.normal(size=(4,))).astype(np.float32),
        "bn.running_mean": (scale * rng.normal(size=(4,))).astype(np.float32),
        "bn.running_var": (1.0 + scale * rng.random(size=(4,))).astype(np.float32),
        "bn.num_batches_tracked": np.array(int(rng.integers(0, 1000)), dtype=np.int64),
    }


TRAINABLE = {"conv.weight", "conv.bias", "bn.weight", "bn.bias"}


def flat(model: dict[str, np.ndarray], keys) -> np.ndarray:
    """Reference flattening: one float64 vector in sorted key order (a different order than the module's)."""
    return np.concatenate([np.asarray(model[k], dtype=np.float64).ravel() for k in sorted(keys)])


def reference_ida(models, keys, n=None, eps=1e-12):
    """IDA computed another way: concatenate everything, numpy norms, explicit loops."""
    vecs = [flat(m, keys) for m in models]
    mean = sum(vecs) / len(vecs)
    d = np.array([np.linalg.norm(v - mean) for v in vecs])
    n = np.ones(len(models)) if n is None else np.asarray(n, dtype=float)
    if np.all(d < eps):
        raw = n
    else:
        raw = np.array([n[i] / max(d[i], eps) for i in range(len(models))])
    return raw / raw.sum(), d


def known_distance_models():
    """θ_k = base + c_k·e with Σc_k = 0 and ‖e‖ = 1, so θ̄ = base and d_k = |c_k| = 1, 2, 3."""
    rng = np.random.default_rng(7)
    base = {"a": rng.normal(size=(2, 2)), "b": rng.normal(size=(3,))}
    e = {"a": np.full((2, 2), 0.5), "b": np.zeros(3)}  # ‖e‖ = sqrt(4·0.25) = 1
    c = [1.0, 2.0, -3.0]
    models = [{k: base[k] + ck * e[k] for k in base} for ck in c]
    return base, e, c, models


# --------------------------------------------------------------------------- configuration


def test_params_follow_config_convention():
    p = AggregationParams()
    assert (p.rule, p.include_buffers, p.eps, p.max_update_norm) == ("fedavg", False, 1e-12, None)
    assert p.check() == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.rule = "ida"  # type: ignore[misc]
    for f in dataclasses.fields(AggregationParams):
        assert f.metadata.get("help"), f.name
    assert AggregationParams(rule="bogus").check()[0][0] == "rule"  # type: ignore[arg-type]
    assert [n for n, _ in AggregationParams(eps=math.inf, max_update_norm=-1.0).check()] == [
        "eps",
        "max_update_norm",
    ]


def test_params_build_through_scenario_loader():
    loader = pytest.importorskip("simlab.config")
    p = loader.build(AggregationParams, {"rule": "ida_fedavg", "max_update_norm": 5}, "s.yaml")
    assert p == AggregationParams(rule="ida_fedavg", max_update_norm=5.0)
    with pytest.raises(loader.ScenarioError) as err:
        loader.build(AggregationParams, {"rule": "mode", "eps": 0.0}, "s.yaml")
    text = str(err.value)
    assert "rule" in text and "eps" in text


# --------------------------------------------------------------------------- ida_weights


def test_ida_weights_known_distances_hand_computed():
    _, _, _, models = known_distance_models()
    w, d = ida_weights(models)
    np.testing.assert_allclose(d, [1.0, 2.0, 3.0], rtol=1e-14)
    # 1/d = (1, 1/2, 1/3), Z = 11/6  →  (6/11, 3/11, 2/11)
    np.testing.assert_allclose(w, [6 / 11, 3 / 11, 2 / 11], rtol=1e-14)
    assert w.sum() == pytest.approx(1.0, abs=1e-15)
    assert w[0] > w[1] > w[2]  # weights fall with distance


def test_ida_fedavg_multiplies_by_num_examples():
    _, _, _, models = known_distance_models()
    n = [1, 2, 6]
    w, _ = ida_weights(models, num_examples=n)
    # n/d = (1, 1, 2) → (1/4, 1/4, 1/2)
    np.testing.assert_allclose(w, [0.25, 0.25, 0.5], rtol=1e-14)
    w_plain, _ = ida_weights(models)
    ratio = (w / w_plain) / np.asarray(n, dtype=float)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-13)  # α_IDA+FedAvg ∝ n_k · α_IDA


def test_ida_weights_match_independent_reference_on_random_models():
    rng = np.random.default_rng(0)
    models = [make_model(rng, scale=s) for s in (0.5, 1.0, 1.5, 3.0, 0.2)]
    n = [10, 40, 5, 25, 1]
    for keys in (TRAINABLE, [k for k in models[0] if k != "bn.num_batches_tracked"]):
        for counts in (None, n):
            w, d = ida_weights(models, num_examples=counts, keys=keys)
            w_ref, d_ref = reference_ida(models, keys, counts)
            np.testing.assert_allclose(d, d_ref, rtol=1e-12)
            np.testing.assert_allclose(w, w_ref, rtol=1e-12)
            assert w.sum() == pytest.approx(1.0, abs=1e-14)
            assert w.dtype == np.float64 and d.dtype == np.float64


def test_ida_identical_models_fall_back_to_plain_weights():
    rng = np.random.default_rng(1)
    m = make_model(rng)
    models = [{k: v.copy() for k, v in m.items()} for _ in range(4)]
    w, d = ida_weights(models)
    np.testing.assert_array_equal(d, np.zeros(4))
    np.testing.assert_array_equal(w, np.full(4, 0.25))
    w, _ = ida_weights(models, num_examples=[1, 1, 2, 4])
    np.testing.assert_array_equal(w, [0.125, 0.125, 0.25, 0.5])


def test_ida_single_model_and_two_models():
    rng = np.random.default_rng(2)
    a, b = make_model(rng), make_model(rng)
    w, d = ida_weights([a])
    assert w.tolist() == [1.0] and d.tolist() == [0.0]
    # K = 2: both models are at the same distance from their mean → uniform / ∝ n.
    w, d = ida_weights([a, b])
    assert d[0] == pytest.approx(d[1], rel=1e-12) and d[0] > 0
    np.testing.assert_allclose(w, [0.5, 0.5], rtol=1e-12)
    w, _ = ida_weights([a, b], num_examples=[1, 3])
    np.testing.assert_allclose(w, [0.25, 0.75], rtol=1e-12)


def test_ida_partial_zero_distance_is_clamped_by_eps():
    # θ_0 coincides with the mean of three collinear models: d = (0, 1, 1); 1/max(0, ε) dominates.
    models = [{"w": np.array([0.0])}, {"w": np.array([1.0])}, {"w": np.array([-1.0])}]
    w, d = ida_weights(models, eps=1e-3)
    np.testing.assert_allclose(d, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(w, np.array([1e3, 1.0, 1.0]) / 1002.0, rtol=1e-14)


def test_ida_weights_rejects_bad_inputs():
    m = {"w": np.ones(3)}
    with pytest.raises(ValueError):
        ida_weights([])
    with pytest.raises(ValueError):
        ida_weights([m, {"w": np.ones(4)}])
    with pytest.raises(ValueError):
        ida_weights([m, m], num_examples=[1])
    with pytest.raises(ValueError):
        ida_weights([m, m], num_examples=[0, 0])
    with pytest.raises(ValueError, match="non-finite"):
        ida_weights([m, {"w": np.array([1.0, np.nan, 1.0])}])


# --------------------------------------------------------------------------- aggregate


def test_fedavg_equals_hand_computed_weighted_mean():
    # Exactly representable values and weights (1/4, 3/4): the result must be exact.
    a = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "b": np.array([8.0], dtype=np.float64)}
    b = {"w": np.array([[5.0, 6.0], [7.0, 0.0]], dtype=np.float32), "b": np.array([0.0], dtype=np.float64)}
    res = aggregate([("h0", a, 10), ("h1", b, 30)], AggregationParams(rule="fedavg"))
    assert isinstance(res, AggregateResult)
    np.testing.assert_array_equal(res.model["w"], np.array([[4.0, 5.0], [6.0, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(res.model["b"], [2.0])
    assert res.weights == {"h0": 0.25, "h1": 0.75}
    assert res.num_examples == 40 and res.rejected == {}

    rng = np.random.default_rng(3)
    models = [make_model(rng) for _ in range(3)]
    n = [7, 11, 2]
    res = aggregate([(f"c{i}", m, k) for i, (m, k) in enumerate(zip(models, n))], AggregationParams())
    for key in TRAINABLE | {"bn.running_mean", "bn.running_var"}:
        hand = sum(k * m[key].astype(np.float64) for m, k in zip(models, n)) / sum(n)
        np.testing.assert_allclose(res.model[key], hand.astype(np.float32), rtol=2e-7, atol=1e-7)
    assert sum(res.weights.values()) == pytest.approx(1.0, abs=1e-15)


def test_ida_aggregate_known_distances():
    base, e, _, models = known_distance_models()
    entries = [(f"h{i}", m, n) for i, (m, n) in enumerate(zip(models, [1, 2, 6]))]
    res = aggregate(entries, AggregationParams(rule="ida"))
    # Σ α_k c_k = (6·1 + 3·2 + 2·(−3))/11 = 6/11
    for k in base:
        np.testing.assert_allclose(res.model[k], base[k] + (6 / 11) * e[k], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(list(res.weights.values()), [6 / 11, 3 / 11, 2 / 11], rtol=1e-14)
    np.testing.assert_allclose(list(res.distances.values()), [1.0, 2.0, 3.0], rtol=1e-14)

    res = aggregate(entries, AggregationParams(rule="ida_fedavg"))
    # α = (1/4, 1/4, 1/2): Σ α_k c_k = 1/4 + 2/4 − 3/2 = −3/4
    for k in base:
        np.testing.assert_allclose(res.model[k], base[k] - 0.75 * e[k], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(list(res.weights.values()), [0.25, 0.25, 0.5], rtol=1e-14)


def test_ida_identical_models_equal_fedavg():
    rng = np.random.default_rng(4)
    m = make_model(rng)
    entries = [(f"h{i}", {k: v.copy() for k, v in m.items()}, n) for i, n in enumerate([3, 5, 8])]
    fed = aggregate(entries, AggregationParams(rule="fedavg"))
    both = aggregate(entries, AggregationParams(rule="ida_fedavg"))
    ida = aggregate(entries, AggregationParams(rule="ida"))
    assert both.weights == fed.weights
    assert ida.weights == {"h0": 1 / 3, "h1": 1 / 3, "h2": 1 / 3}
    for k in m:
        np.testing.assert_array_equal(both.model[k], fed.model[k])
        np.testing.assert_allclose(ida.model[k], m[k], rtol=1e-6)


def test_single_client_returns_its_model():
    rng = np.random.default_rng(5)
    m = make_model(rng)
    for rule in RULES:
        res = aggregate([("only", m, 12)], AggregationParams(rule=rule))
        assert res.weights == ({"only": 1.0} if rule in WEIGHTING else {})
        for k in m:
            np.testing.assert_array_equal(res.model[k], m[k])
            assert res.model[k] is not m[k]  # a fresh array, not an alias of the input


def test_arrival_order_does_not_change_result_bitwise():
    rng = np.random.default_rng(6)
    entries = [(f"hosp{i}", make_model(rng, scale=0.5 + i), int(rng.integers(1, 100))) for i in range(6)]
    for cid, m, _ in entries:  # float64 arrays expose any change of summation order (no cast hides it)
        m["double"] = rng.normal(size=(50,)) * (1.0 + int(cid[-1]))
    for rule in RULES:
        params = AggregationParams(rule=rule)
        ref = aggregate(entries, params, trainable_keys=TRAINABLE)
        for seed in range(3):
            order = np.random.default_rng(seed).permutation(len(entries))
            res = aggregate([entries[i] for i in order], params, trainable_keys=TRAINABLE)
            assert list(res.model) == list(ref.model)
            for k in ref.model:
                assert res.model[k].tobytes() == ref.model[k].tobytes()
                assert res.model[k].dtype == ref.model[k].dtype
            assert res.weights == ref.weights and res.distances == ref.distances
            assert list(res.distances) == sorted(cid for cid, _, _ in entries)


def test_dtype_shape_and_key_order_preserved():
    rng = np.random.default_rng(8)
    models = []
    for _ in range(3):
        models.append({
            "half": rng.normal(size=(3, 2)).astype(np.float16),
            "single": rng.normal(size=(5,)).astype(np.float32),
            "double": rng.normal(size=()).astype(np.float64),
            "count": np.array(int(rng.integers(0, 9)), dtype=np.int64),
            "flag": np.array([True, False]),
        })
    res = aggregate([(str(i), m, 1) for i, m in enumerate(models)], AggregationParams(rule="ida"))
    assert list(res.model) == list(models[0])
    for k, v in models[0].items():
        assert res.model[k].dtype == v.dtype, k
        assert res.model[k].shape == v.shape, k
        assert isinstance(res.model[k], np.ndarray), k
    w = np.array([res.weights[str(i)] for i in range(3)])
    hand = sum(wk * m["half"].astype(np.float64) for wk, m in zip(w, models))
    np.testing.assert_array_equal(res.model["half"], hand.astype(np.float16))


def test_integer_buffers_take_the_max_of_accepted_clients():
    rng = np.random.default_rng(9)
    ms = [make_model(rng) for _ in range(3)]
    for m, nbt in zip(ms, (10, 30, 20)):
        m["bn.num_batches_tracked"] = np.array(nbt, dtype=np.int64)
    res = aggregate([("a", ms[0], 5), ("b", ms[1], 1), ("c", ms[2], 5)], AggregationParams(rule="ida"))
    out = res.model["bn.num_batches_tracked"]
    assert out.dtype == np.int64 and out.shape == () and int(out) == 30
    # The client holding the maximum is rejected → its counter does not leak into the aggregate.
    ms[1]["conv.bias"][0] = np.nan
    res = aggregate([("a", ms[0], 5), ("b", ms[1], 1), ("c", ms[2], 5)], AggregationParams(rule="ida"))
    assert int(res.model["bn.num_batches_tracked"]) == 20 and "b" in res.rejected


def test_include_buffers_changes_ida_distances():
    rng = np.random.default_rng(10)
    base = make_model(rng)
    ms = []
    for _ in range(5):
        m = {k: v.copy() for k, v in base.items()}
        m["conv.weight"] = m["conv.weight"] + (0.01 * rng.normal(size=(4, 2, 3, 3))).astype(np.float32)
        ms.append(m)
    ms[4]["bn.running_var"] = ms[4]["bn.running_var"] + np.float32(50.0)  # far only in a buffer
    entries = [(f"h{i}", m, 1) for i, m in enumerate(ms)]
    only_params = aggregate(entries, AggregationParams(rule="ida"), trainable_keys=TRAINABLE)
    with_buffers = aggregate(entries, AggregationParams(rule="ida", include_buffers=True), trainable_keys=TRAINABLE)
    all_float = aggregate(entries, AggregationParams(rule="ida"), trainable_keys=None)
    w_ref, _ = reference_ida(ms, TRAINABLE)
    np.testing.assert_allclose([only_params.weights[f"h{i}"] for i in range(5)], w_ref, rtol=1e-12)
    float_keys = [k for k in base if k != "bn.num_batches_tracked"]
    w_ref, _ = reference_ida(ms, float_keys)
    np.testing.assert_allclose([with_buffers.weights[f"h{i}"] for i in range(5)], w_ref, rtol=1e-12)
    assert with_buffers.weights == all_float.weights
    # Parameters alone: h4 is as close as the others (weight ≈ 1/5); with buffers it is 4× farther.
    assert with_buffers.weights["h4"] < 0.1 < only_params.weights["h4"]


def test_outlier_gets_small_ida_weight():
    # Four hospitals near θ*, one "poisoned" update far away. FedAvg moves the aggregate by
    # 1/5 of the poison; IDA weighs the outlier by ≈ (1/80)/(4/20 + 1/80) ≈ 0.06 and moves far less.
    rng = np.random.default_rng(11)
    target = {"w": rng.normal(size=(64,)), "b": rng.normal(size=(8,))}
    entries = []
    for i in range(4):
        entries.append((f"h{i}", {k: v + 0.01 * rng.normal(size=v.shape) for k, v in target.items()}, 100))
    entries.append(("bad", {k: v + 100.0 for k, v in target.items()}, 100))
    fed = aggregate(entries, AggregationParams(rule="fedavg"))
    ida = aggregate(entries, AggregationParams(rule="ida"))

    def err(model):
        return np.linalg.norm(flat(model, target) - flat(target, target))

    assert fed.weights["bad"] == pytest.approx(0.2)
    assert ida.weights["bad"] == pytest.approx((1 / 80) / (4 / 20 + 1 / 80), rel=1e-3)
    assert ida.weights["bad"] < 0.07
    assert ida.distances["bad"] == pytest.approx(4 * ida.distances["h0"], rel=1e-3)
    assert err(ida.model) < 0.35 * err(fed.model)


# --------------------------------------------------------------------------- update checks


def test_check_update_names_non_finite_key():
    rng = np.random.default_rng(12)
    m = make_model(rng)
    assert check_update(m) is None
    bad = {k: v.copy() for k, v in m.items()}
    bad["bn.running_var"][1] = np.nan
    bad["bn.running_var"][2] = np.inf
    bad["bn.running_var"][3] = -np.inf
    reason = check_update(bad, reference=m)
    assert reason is not None and "'bn.running_var'" in reason
    assert "1 NaN" in reason and "2 Inf" in reason


def test_check_update_structure_and_norm():
    ref = {"w": np.zeros(4, dtype=np.float32), "n": np.array(0, dtype=np.int64)}
    up = {"w": np.array([3.0, 4.0, 0.0, 0.0], dtype=np.float32), "n": np.array(5, dtype=np.int64)}
    assert update_norm(up, ref) == pytest.approx(5.0)
    assert check_update(up, ref, max_norm=5.0) is None
    reason = check_update(up, ref, max_norm=4.9)
    assert reason is not None and "exceeds" in reason
    assert check_update(up, None, max_norm=4.9) is not None  # without reference: the model is the update
    assert "missing" in check_update({"w": up["w"]}, ref)
    assert "unexpected" in check_update({**up, "x": np.ones(1)}, ref)
    assert "shape" in check_update({**up, "w": np.zeros(5, dtype=np.float32)}, ref)
    assert "dtype" in check_update({**up, "w": np.zeros(4, dtype=np.float64)}, ref)
    # norm restricted to chosen keys
    up2 = {"w": up["w"], "v": np.array([100.0])}
    assert check_update(up2, max_norm=6.0, keys=["w"]) is None
    assert check_update(up2, max_norm=6.0) is not None


def test_aggregate_rejects_and_reports():
    rng = np.random.default_rng(13)
    glob = make_model(rng)
    good = [{k: (v + np.float32(0.01) * rng.normal(size=v.shape).astype(np.float32)).astype(v.dtype)
             if v.dtype != np.int64 else v.copy() for k, v in glob.items()} for _ in range(3)]
    nan = {k: v.copy() for k, v in good[0].items()}
    nan["conv.weight"][0, 0, 0, 0] = np.nan
    far = {k: v.copy() for k, v in good[1].items()}
    far["conv.bias"] = far["conv.bias"] + np.float32(1e3)
    wrong = {k: v for k, v in good[2].items() if k != "bn.bias"}
    entries = [
        ("a", good[0], 10), ("b", good[1], 20), ("c", good[2], 30),
        ("nan", nan, 10), ("far", far, 10), ("wrong", wrong, 10), ("idle", good[0], 0),
    ]
    params = AggregationParams(rule="ida_fedavg", max_update_norm=10.0)
    res = aggregate(entries, params, trainable_keys=TRAINABLE, reference=glob)
    assert set(res.weights) == {"a", "b", "c"}
    assert set(res.rejected) == {"nan", "far", "wrong", "idle"}
    assert "'conv.weight'" in res.rejected["nan"] and "NaN" in res.rejected["nan"]
    assert "exceeds" in res.rejected["far"]
    assert "bn.bias" in res.rejected["wrong"]
    assert "num_examples" in res.rejected["idle"]
    # The result equals aggregating the accepted clients alone.
    alone = aggregate(entries[:3], params, trainable_keys=TRAINABLE, reference=glob)
    assert alone.weights == res.weights
    for k in glob:
        assert alone.model[k].tobytes() == res.model[k].tobytes()
    assert sum(res.weights.values()) == pytest.approx(1.0, abs=1e-15)


def test_everything_rejected_raises_empty_aggregation():
    m = {"w": np.array([np.inf, 1.0])}
    with pytest.raises(EmptyAggregation) as err:
        aggregate([("x", m, 3), ("y", {"w": np.ones(2)}, 0)], AggregationParams())
    assert err.value.rejected.keys() == {"x", "y"}
    assert "'w'" in err.value.rejected["x"]
    with pytest.raises(EmptyAggregation):
        aggregate([], AggregationParams(rule="ida"))


def test_aggregate_caller_errors():
    m = {"w": np.ones(2)}
    with pytest.raises(ValueError, match="duplicate"):
        aggregate([("a", m, 1), ("a", m, 1)], AggregationParams())
    with pytest.raises(ValueError):
        aggregate([("a", m, -1)], AggregationParams())
    with pytest.raises(ValueError, match="reference"):
        aggregate([("a", m, 1)], AggregationParams(max_update_norm=1.0))
    with pytest.raises(ValueError):  # structure differs and there is no reference to judge who is wrong
        aggregate([("a", m, 1), ("b", {"w": np.ones(3)}, 1)], AggregationParams())
    with pytest.raises(ValueError, match="trainable"):
        aggregate([("a", m, 1)], AggregationParams(rule="ida"), trainable_keys={"nope"})
    with pytest.raises(ValueError):
        aggregate([("a", m, 1)], AggregationParams(eps=0.0))


def test_model_nbytes():
    rng = np.random.default_rng(14)
    m = make_model(rng)
    expected = 4 * (4 * 2 * 3 * 3 + 4 + 4 + 4 + 4 + 4) + 8
    assert model_nbytes(m) == expected
    assert model_nbytes({}) == 0


# --------------------------------------------------------------------------- median, trimmed mean

WEIGHTING = tuple(r for r, cls in RULES.items() if issubclass(cls, WeightingRule))  # Krum: weights 0 or ∝ n_k


def test_median_and_trimmed_mean_hand_computed():
    values = [1.0, 2.0, 100.0, 4.0, 3.0]  # one outlier
    models = [{"w": np.array([v, -v]), "n": np.array(i, dtype=np.int64)} for i, v in enumerate(values)]
    entries = [(f"h{i}", m, 10 * (i + 1)) for i, m in enumerate(models)]
    med = aggregate(entries, AggregationParams(rule="median"))
    np.testing.assert_array_equal(med.model["w"], [3.0, -3.0])
    assert med.weights == {} and len(med.distances) == 5  # not a weighting; distances still reported
    assert int(med.model["n"]) == 4  # integer counters: the maximum, as for every rule
    trim = aggregate(entries, AggregationParams(rule="trimmed_mean"))  # default beta 0.2
    np.testing.assert_allclose(trim.model["w"], [3.0, -3.0])  # ⌊0.2·5⌋ = 1 cut at each end: mean(2, 3, 4)
    even = aggregate(entries[:4], AggregationParams(rule="median"))
    np.testing.assert_array_equal(even.model["w"], [3.0, -3.0])  # 1, 2, 4, 100: mean of the middle two


def test_trimmed_mean_without_cut_is_the_plain_mean():
    rng = np.random.default_rng(11)
    models = [{"w": rng.normal(size=(4, 3))} for _ in range(4)]
    res = aggregate([(str(i), m, 1 + i) for i, m in enumerate(models)], AggregationParams(rule="trimmed_mean"))
    np.testing.assert_allclose(res.model["w"], np.mean([m["w"] for m in models], axis=0), rtol=1e-15)


def test_robust_rules_resist_an_outlier_that_moves_fedavg():
    rng = np.random.default_rng(12)
    base = rng.normal(size=(20,))
    models = [{"w": base + 0.01 * rng.normal(size=20)} for _ in range(6)] + [{"w": base + 1e3}]
    entries = [(f"h{i}", m, 10) for i, m in enumerate(models)]
    err = {rule: float(np.abs(aggregate(entries, AggregationParams(rule=rule)).model["w"] - base).max())
           for rule in ("fedavg", "median", "trimmed_mean")}
    assert err["fedavg"] > 100 and err["median"] < 0.05 and err["trimmed_mean"] < 0.05


def test_median_and_trimmed_mean_match_flower():
    """The same statistics as Flower 1.41: FedTrimmedAvg's ``trim_mean`` (imported from Flower, by
    the test only: the core never imports it) and FedMedian's ``np.median(np.stack(layers), axis=0)``.
    float64 models, so no cast hides a difference."""
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    rng = np.random.default_rng(13)
    models = [{"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))} for _ in range(7)]
    entries = [(f"h{i}", m, 10 * (i + 1)) for i, m in enumerate(models)]
    ours_median = aggregate(entries, AggregationParams(rule="median")).model
    ours_trim = aggregate(entries, AggregationParams(rule="trimmed_mean",
                                                     trimmed_mean=RULES["trimmed_mean"].Params(beta=0.3))).model
    for k in models[0]:
        layers = np.stack([m[k] for m in models])
        np.testing.assert_array_equal(ours_median[k], np.median(layers, axis=0))
        np.testing.assert_allclose(ours_trim[k], trim_mean(layers, 0.3), rtol=1e-14, atol=0)


def test_trimmed_mean_params_are_validated_through_the_loader():
    from simlab.config import ScenarioError, build

    p = build(AggregationParams, {"rule": "trimmed_mean", "trimmed_mean": {"beta": 0.1}}, "s.yaml")
    assert p.trimmed_mean.beta == 0.1
    with pytest.raises(ScenarioError, match="trimmed_mean.beta"):
        build(AggregationParams, {"rule": "trimmed_mean", "trimmed_mean": {"beta": 0.5}}, "s.yaml")
