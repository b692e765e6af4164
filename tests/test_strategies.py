"""The federated strategies taken from Flower's: Krum / Multi-Krum (a rule), the server optimisers
FedAdam / FedYogi / FedAdagrad, and FedProx's proximal term. simlab's core is Flower-free, so each is
written in numpy/torch and cross-checked here against Flower 1.41's own strategy on the same arrays
(no Flower engine is started: strategies are called directly with reply messages)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simlab.aggregation import (AggregationParams, EmptyAggregation, OptState, ServerOptimizerParams, aggregate,
                                make_server_optimizer)
from simlab.aggregation.krum import KrumParams, krum_scores, pairwise_sq_distances
from simlab.aggregation.server_opt import AdamParams
from simlab.config import ScenarioError
from simlab.continual.training import TrainConfig, proximal_term, train_local
from simlab.models.unet import ModelSpec, build_model, state_to_numpy, trainable_keys

RTOL, ATOL = 1e-10, 1e-12  # float64 on both sides: the same operations, only summation order may differ


@pytest.fixture()
def flower_task():
    """Flower's Message needs a task identity, which its runtime sets; here, for the duration of a test."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def replies(models, counts):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    return [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in m.items()}),
                                "metrics": MetricRecord({"num-examples": n})}), dst_node_id=1, message_type="train")
            for m, n in zip(models, counts)]


def float_models(k, seed=0, scale=1.0):
    g = np.random.default_rng(seed)
    return [{"w": scale * g.normal(size=(3, 4)), "b": scale * g.normal(size=(5,))} for _ in range(k)]


def krum(f, m):
    return AggregationParams(rule="krum", krum=KrumParams(num_malicious_nodes=f, num_nodes_to_select=m))


# ------------------------------------------------------------------------------------------ Krum
@pytest.mark.parametrize("f, m", [(0, 1), (1, 1), (2, 1), (1, 3), (2, 4)])
def test_krum_matches_flower_multikrum(flower_task, f, m):
    from flwr.serverapp.strategy import MultiKrum

    ms = float_models(9, seed=f + 10 * m)
    ms[2] = {k: v + 25.0 for k, v in ms[2].items()}  # two Byzantine models far from the rest
    ms[6] = {k: -30.0 * v for k, v in ms[6].items()}
    counts = [5 + 3 * i for i in range(9)]
    ours = aggregate([(f"h{i}", mm, n) for i, (mm, n) in enumerate(zip(ms, counts), start=1)], krum(f, m))
    theirs, _ = MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m).aggregate_train(1, replies(ms, counts))
    for k in ms[0]:
        np.testing.assert_allclose(ours.model[k], theirs[k].numpy(), rtol=RTOL, atol=ATOL)
    kept = {c for c, w in ours.weights.items() if w > 0}
    assert len(kept) == m and not kept & {"h3", "h7"}  # the outliers are never kept
    assert abs(sum(ours.weights.values()) - 1.0) < 1e-12


def test_krum_scores_match_flower_distances():
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy.multikrum import compute_distances

    ms = float_models(6, seed=3)
    sq = pairwise_sq_distances(ms, ["w", "b"])
    theirs = compute_distances([ArrayRecord({k: Array(v) for k, v in mm.items()}) for mm in ms])
    np.testing.assert_allclose(sq, theirs, rtol=1e-9, atol=1e-9)  # Flower: ‖x‖² + ‖y‖² − 2x·y (cancellation)
    closest = 6 - 1 - 2
    hand = [sum(sorted(sq[i, j] for j in range(6) if j != i)[:closest]) for i in range(6)]
    np.testing.assert_allclose(krum_scores(sq, 1), hand, rtol=1e-12)


def test_krum_with_too_few_updates_for_f_is_refused():
    ms = float_models(6)
    with pytest.raises(EmptyAggregation, match=r"f=2 needs at least 2f\+3 = 7 accepted updates.*got 6"):
        aggregate([(f"h{i}", mm, 10) for i, mm in enumerate(ms)], krum(2, 1))
    assert aggregate([(f"h{i}", mm, 10) for i, mm in enumerate(ms[:2])], krum(0, 1)).weights  # f = 0: as Flower


def test_krum_distances_use_simlab_keys_and_counters_take_the_max():
    ms = float_models(5, seed=4)
    for i, mm in enumerate(ms):
        mm["bn.running_mean"] = np.full(3, 1e6 * (i == 0))  # a buffer far off: not a trainable key
        mm["bn.num_batches_tracked"] = np.array(i, dtype=np.int64)
    res = aggregate([(f"h{i}", mm, 10) for i, mm in enumerate(ms)], krum(1, 2), trainable_keys={"w", "b"})
    sq = pairwise_sq_distances(ms, ["w", "b"])
    expected = {f"h{i}" for i in np.argsort(krum_scores(sq, 1), kind="stable")[:2]}
    assert {c for c, w in res.weights.items() if w > 0} == expected
    assert int(res.model["bn.num_batches_tracked"]) == 4


def test_krum_needs_enough_hospitals_at_validation(tmp_path):
    from simlab.scenario.schema import load_scenario_dict

    raw = {"name": "k", "domains": {"A": {}}, "hospitals": [{"id": f"h{i}", "drift": {"type": "none", "domain": "A"}}
                                                            for i in range(4)],
           "federation": {"aggregation": {"rule": "krum", "krum": {"num_malicious_nodes": 1}}}}
    with pytest.raises(ScenarioError, match=r"krum with f=1 needs at least 2f\+3 = 5 hospitals per round"):
        load_scenario_dict(raw, "s.yaml")
    raw["hospitals"].append({"id": "h9", "drift": {"type": "none", "domain": "A"}})
    assert load_scenario_dict(raw, "s.yaml").base.federation.aggregation.krum.num_malicious_nodes == 1


# ------------------------------------------------------------------------------------------ server optimisers
def _flower_opt(name, **kw):
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi

    return {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}[name](**kw)


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_server_optimisers_match_flower_over_rounds(flower_task, name):
    """Four rounds of FedAvg + the optimiser, Flower's strategy and simlab's on the same replies."""
    strategy = _flower_opt(name)
    opt, state = make_server_optimizer(ServerOptimizerParams(name=name)), OptState()
    ours = theirs = float_models(1, seed=7)[0]
    for r in range(1, 5):
        sent = float_models(3, seed=100 + r, scale=0.3)
        clients = [{k: ours[k] + d[k] for k in ours} for d in sent]
        counts = [10, 20 + r, 7]
        strategy.current_arrays = {k: v.copy() for k, v in theirs.items()}  # what configure_train stores
        rec, _ = strategy.aggregate_train(r, replies(clients, counts))
        theirs = {k: a.numpy() for k, a in rec.items()}
        agg = aggregate([(f"h{i}", c, n) for i, (c, n) in enumerate(zip(clients, counts))], AggregationParams()).model
        ours = opt.apply(state, ours, agg, {"w", "b"})
        for k in ours:
            np.testing.assert_allclose(ours[k], theirs[k], rtol=RTOL, atol=ATOL)
    for k in ours:
        np.testing.assert_allclose(state.m[k], strategy.m_t[k], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(state.v[k], strategy.v_t[k], rtol=RTOL, atol=ATOL)
    assert state.step == 4


def test_server_optimiser_defaults_are_flowers():
    for name, (eta, b1, b2, tau) in {"adam": (0.1, 0.9, 0.99, 1e-3), "yogi": (0.01, 0.9, 0.99, 1e-3),
                                     "adagrad": (0.1, 0.0, None, 1e-3)}.items():
        own = getattr(ServerOptimizerParams(), name)
        flower = _flower_opt(name)
        assert (own.eta, getattr(own, "beta_1", 0.0), own.tau) == (flower.eta, flower.beta_1, flower.tau) == (eta, b1, tau)
        if b2 is not None:
            assert own.beta_2 == flower.beta_2 == b2


def test_server_optimiser_steps_trainable_keys_only_and_keeps_dtypes():
    g = np.random.default_rng(2)
    cur = {"conv.weight": g.normal(size=(2, 3)).astype(np.float32), "bn.running_var": np.ones(3, np.float32),
           "bn.num_batches_tracked": np.array(5, dtype=np.int64)}
    agg = {"conv.weight": cur["conv.weight"] + 0.5, "bn.running_var": np.full(3, 0.01, np.float32),
           "bn.num_batches_tracked": np.array(9, dtype=np.int64)}
    opt, state = make_server_optimizer(ServerOptimizerParams(name="adam", adam=AdamParams(eta=1.0))), OptState()
    new = opt.apply(state, cur, agg, {"conv.weight"})
    assert new["bn.running_var"] is agg["bn.running_var"] and new["bn.num_batches_tracked"] is agg["bn.num_batches_tracked"]
    assert new["conv.weight"].dtype == np.float32 and list(state.m) == list(state.v) == ["conv.weight"]
    # Δ = 0.5 everywhere: m = 0.05, v = 0.0025, η_1 = √(1 − 0.99²)/(1 − 0.9²)
    eta1 = np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(new["conv.weight"], cur["conv.weight"] + eta1 * 0.05 / (0.05 + 1e-3), rtol=1e-6)


def test_server_optimiser_state_round_trip_continues_bit_for_bit():
    opt = make_server_optimizer(ServerOptimizerParams(name="yogi"))
    a, model = OptState(), float_models(1, seed=1)[0]
    for r in range(3):
        model = opt.apply(a, model, {k: v + 0.1 * r + 0.01 for k, v in model.items()}, {"w", "b"})
    b = OptState.from_arrays(a.to_arrays())
    step = {k: v - 0.2 for k, v in model.items()}
    x, y = opt.apply(a, model, step, {"w", "b"}), opt.apply(b, model, step, {"w", "b"})
    assert all(x[k].tobytes() == y[k].tobytes() for k in x) and a.step == b.step == 4


def test_no_server_optimiser_by_default():
    assert make_server_optimizer(ServerOptimizerParams()) is None


# ------------------------------------------------------------------------------------------ FedProx
SMALL = ModelSpec(channels=[4, 8])


def _data(n=8, size=16):
    g = np.random.default_rng(0)
    y = g.integers(0, 2, size=(n, size, size)).astype(np.uint8)
    return (y[:, None] + 0.1 * g.standard_normal((n, 1, size, size))).astype(np.float32), y


def _train(mu=None, steps=6):
    torch.manual_seed(0)
    model = build_model(SMALL, 2)
    start = state_to_numpy(model)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=0.05) if mu is None else TrainConfig(steps=steps, batch_size=4,
                                                                                          lr=0.05, proximal_mu=mu)
    train_local(model, *_data(), cfg, seed=3)
    end, keys = state_to_numpy(model), trainable_keys(model)
    return end, float(np.sqrt(sum(((end[k] - start[k]).astype(np.float64) ** 2).sum() for k in keys)))


def test_fedprox_mu_zero_is_bit_identical_to_no_fedprox():
    a, _ = _train(None)
    b, _ = _train(0.0)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_fedprox_keeps_the_model_closer_to_the_received_one():
    _, d0 = _train(0.0, steps=10)
    _, d1 = _train(1.0, steps=10)
    _, d2 = _train(50.0, steps=10)
    assert d2 < d1 < d0


def test_proximal_term_is_half_mu_times_the_squared_norm():
    w = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert float(proximal_term(w, anchor, 0.1)) == pytest.approx(0.05 * (1 + 4 + 4))


def test_hospital_training_takes_proximal_mu_from_the_federation():
    from simlab.hospital import train_config
    from simlab.scenario.schema import load_scenario_dict
    from simlab.scenario.task import task_of

    raw = {"name": "p", "domains": {"A": {}}, "hospitals": [{"id": "h1", "drift": {"type": "none", "domain": "A"}}],
           "federation": {"proximal_mu": 0.01}}
    sc = load_scenario_dict(raw, "s.yaml").base
    assert train_config(task_of(sc, "h1"), "cpu").proximal_mu == 0.01


# ------------------------------------------------------------------------------------------ state across rounds
def test_odex_pool_keeps_one_optimiser_state_per_member_and_a_fork_copies_its_parents(tmp_path):
    from simlab.checkpoint import load_checkpoint, save_checkpoint
    from simlab.continual.odex import Decision, OdexParams, fit_entry
    from simlab.continual.odex_pool import Pool, Update

    params, g = OdexParams(), np.random.default_rng(0)
    opt = make_server_optimizer(ServerOptimizerParams(name="adam"))
    init = float_models(1, seed=5)[0]
    pool = Pool(params, init, ["h1", "h2"], server_opt=opt, opt_keys={"w", "b"})

    def entry(shift):
        return fit_entry(g.standard_normal((40, 8)) + shift, {}, params.shift, 1)

    mean = lambda items, ref: {k: np.mean([u.model[k] for u in items], axis=0) for k in ref}  # noqa: E731
    first = [Update(h, {k: v + 0.2 for k, v in init.items()}, 10, entry(0.0), "A") for h in ("h1", "h2")]
    pool.apply(1, {"h1": Decision(0, False), "h2": Decision(0, False)}, first, mean, lambda *a: None)
    after1 = {k: v.copy() for k, v in pool.members[0].state.items()}
    parent = pool.opt[0].copy()  # member 0 after one step
    assert parent.step == 1
    updates = [Update("h1", {k: v + 1.0 for k, v in after1.items()}, 10, entry(50.0), "B"),
               Update("h2", {k: v + 0.5 for k, v in after1.items()}, 10, entry(0.0), "A")]
    pool.apply(2, {"h1": Decision(0, True), "h2": Decision(0, False)}, updates, mean, lambda *a: None)
    assert sorted(pool.members) == sorted(pool.opt) == [0, 1]
    fork_expected = opt.apply(parent.copy(), after1, updates[0].model, {"w", "b"})  # the parent's state, copied
    member0 = opt.apply(parent.copy(), after1, updates[1].model, {"w", "b"})
    np.testing.assert_array_equal(pool.members[1].state["w"], fork_expected["w"])
    np.testing.assert_array_equal(pool.members[0].state["w"], member0["w"])
    assert pool.opt[1].step == pool.opt[0].step == 2 and not np.array_equal(pool.opt[1].m["w"], pool.opt[0].m["w"])

    meta, arrays = pool.snapshot()
    save_checkpoint(tmp_path / "p.npz", meta, arrays)
    meta, arrays = load_checkpoint(tmp_path / "p.npz")
    other = Pool(params, init, ["h1", "h2"], server_opt=opt, opt_keys={"w", "b"})
    other.restore(meta, arrays)
    for m, st in pool.opt.items():
        got = other.opt[m]
        assert got.step == st.step and all(got.m[k].tobytes() == st.m[k].tobytes() for k in st.m)
        assert all(got.v[k].tobytes() == st.v[k].tobytes() for k in st.v)

