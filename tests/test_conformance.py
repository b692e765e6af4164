"""Conformance: every registered continual method and aggregation rule passes the same checks, so a
plug-in is tested the moment it is registered (in the spirit of scikit-learn's check_estimator)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from simlab.aggregation import RULES, AggregationParams, aggregate
from simlab.checkpoint import HospitalStateStore
from simlab.continual.method import Method
from simlab.continual.registry import METHODS, ContinualSpec, make_method
from simlab.continual.semi_supervised import OBJECTIVES, SemiSupervisedSpec, make_objective
from simlab.continual.training import TrainConfig
from simlab.data.streams import labelled_count
from simlab.models.unet import ModelSpec, build_model, state_to_numpy

FAMILIES = {"baseline", "regularisation", "distillation", "expansion", "rehearsal"}
SERVERS = {"global", "pool"}
SMALL = ModelSpec(channels=[4, 8, 16])
CFG = TrainConfig(steps=3, batch_size=4, lr=0.01)
LAST = 3  # the stream's last round (methods that use future data draw up to it)


class BlindWindow:
    """A window whose true domain cannot be read: a method that looks at it fails the test."""

    def __init__(self, t: int, n: int = 8, size: int = 32, label_fraction: float = 0.5, fill: int | None = None):
        g = np.random.default_rng(100 + t)
        self.labels = g.integers(0, 3, size=(n, size, size)).astype(np.uint8)
        self.images = (self.labels[:, None] / 2 + 0.1 * g.standard_normal((n, 1, size, size)) + 0.2 * t
                       ).astype(np.float32)
        self.labeled = np.zeros(n, bool)
        self.labeled[: labelled_count(label_fraction, n)] = True
        if fill is not None:  # what the unlabelled images' labels say: nothing may read them
            self.labels[~self.labeled] = fill if fill >= 0 else g.integers(0, 3, size=self.labels[~self.labeled].shape)

    @property
    def true_domain(self) -> str:
        raise AssertionError("a continual method read the window's true domain")


def windows(t: int) -> BlindWindow:
    return BlindWindow(t)


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(SMALL, 3)


def run(name: str, rounds=(1, 2, 3), state=None, model=None, objective: str = "none", stream=windows):
    """(model, method state, metrics per round) after ``rounds`` with a fresh method object (and a fresh
    unlabelled-data ``objective`` each round)."""
    method = make_method(ContinualSpec(method=name))
    model = model or fresh_model()
    state, metrics = dict(state or {}), []
    for t in rounds:
        res = method.local_update(model, stream, t, state, CFG, seed=1000 + t, last_round=LAST,
                                  unlabelled=make_objective(SemiSupervisedSpec(objective=objective)))
        state = res.state
        metrics.append(res.metrics)
    return model, state, metrics


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_declares_what_it_is(name):
    cls = METHODS[name]
    assert issubclass(cls, Method) and cls.name == name and cls.help
    assert cls.family in FAMILIES and cls.server in SERVERS
    assert isinstance(cls.keeps_state, bool) and isinstance(cls.breaks_no_rehearsal, bool)
    assert isinstance(cls.uses_future_data, bool) and (cls.breaks_no_rehearsal or not cls.uses_future_data)
    if cls.Params is not None:
        assert dataclasses.is_dataclass(cls.Params) and cls.Params.__dataclass_params__.frozen
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls.Params)), name
        assert isinstance(getattr(ContinualSpec(), name), cls.Params)  # its section of the schema


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_is_deterministic_for_a_seed_and_blind_to_the_true_domain(name):
    model_a, state_a, metrics_a = run(name)
    model_b, state_b, metrics_b = run(name)
    assert same_state(state_to_numpy(model_a), state_to_numpy(model_b))
    assert same_state(state_a, state_b) and metrics_a == metrics_b
    assert not same_state(state_to_numpy(model_a), state_to_numpy(fresh_model()))  # it trained


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_state_survives_a_checkpoint_round_trip(name, tmp_path):
    """Round 2 from the state saved to disk after round 1, by a new method object (a restart), is
    the round 2 of an uninterrupted run."""
    model, state, _ = run(name, rounds=(1,))
    assert bool(state) == METHODS[name].keeps_state
    store = HospitalStateStore(tmp_path, "run-key", "h1")
    store.save(1, state)
    restored = store.load(1)
    assert same_state(restored, state)
    after = state_to_numpy(model)
    model_a, state_a, _ = run(name, rounds=(2,), state=state, model=model)
    model_b = build_model(SMALL, 3)
    model_b.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in after.items()})
    model_b, state_b, _ = run(name, rounds=(2,), state=restored, model=model_b)
    assert same_state(state_to_numpy(model_a), state_to_numpy(model_b)) and same_state(state_a, state_b)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_on_labelled_images_only(name):
    """label_fraction < 1: the loss sees only labelled images of the windows the method says it trains
    on, and only rounds up to the current one unless the method declares that it uses future data."""
    method = make_method(ContinualSpec(method=name))
    model, state, _ = run(name, rounds=(1,))
    images, labels, rounds = method.training_set(windows, 2, state, 7, LAST)
    assert METHODS[name].uses_future_data or max(rounds) <= 2
    pairs = {(x.tobytes(), y.tobytes()) for r in rounds
             for x, y in zip(windows(r).images[windows(r).labeled], windows(r).labels[windows(r).labeled])}
    assert len(images) == len(labels) > 0 and all((x.tobytes(), y.tobytes()) in pairs for x, y in zip(images, labels))
    res = method.local_update(model, windows, 2, state, CFG, seed=7, last_round=LAST)
    assert res.metrics["num_examples"] == len(images)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_with_an_objective_never_reads_a_label_of_an_unlabelled_image(name, objective):
    """Every method with every unlabelled-data objective (label_fraction 0.5): the unlabelled images'
    labels set to 255 (no class: a loss or a Fisher reading one fails) or to other classes give the
    same model bit for bit."""
    def sentinel(t):
        return BlindWindow(t, fill=255)

    def other(t):
        return BlindWindow(t, fill=-1)

    model_a, state_a, metrics_a = run(name, rounds=(1, 2), objective=objective, stream=sentinel)
    model_b, state_b, metrics_b = run(name, rounds=(1, 2), objective=objective, stream=other)
    assert same_state(state_to_numpy(model_a), state_to_numpy(model_b)) and same_state(state_a, state_b)
    assert metrics_a == metrics_b and metrics_a[0]["num_unlabelled"] > 0


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_a_hospital_without_labels_through_an_objective(name, objective):
    """label_fraction 0, every label 255: no labelled image, the objective alone trains the model."""
    def blank(t):
        return BlindWindow(t, label_fraction=0.0, fill=255)

    model, state, metrics = run(name, rounds=(1, 2), objective=objective, stream=blank)
    assert [m["num_examples"] for m in metrics] == [0.0, 0.0] and all(m["num_unlabelled"] > 0 for m in metrics)
    assert all(np.isfinite(m["train_loss"]) for m in metrics)
    assert not same_state(state_to_numpy(model), state_to_numpy(fresh_model()))
    assert bool(state) == METHODS[name].keeps_state
    with pytest.raises(ValueError, match="no labelled images to train on"):
        run(name, rounds=(1,), stream=blank)


# ------------------------------------------------------------------------------ aggregation rules
def models(k: int = 5, seed: int = 0) -> list[dict[str, np.ndarray]]:
    g = np.random.default_rng(seed)
    return [{"w": g.normal(size=(3, 4)).astype(np.float32), "b": g.normal(size=(4,)),
             "bn.num_batches_tracked": np.array(10 * i, dtype=np.int64)} for i in range(k)]


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_declares_what_it_is(rule):
    cls = RULES[rule]
    assert cls.name == rule and cls.help
    if cls.Params is not None:
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls.Params)), rule


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_conventions(rule):
    ms = models()
    entries = [(f"h{i}", m, 10 + i) for i, m in enumerate(ms)]
    res = aggregate(entries, AggregationParams(rule=rule))
    again = aggregate(list(reversed(entries)), AggregationParams(rule=rule))
    assert same_state(res.model, again.model)  # arrival order does not matter, bit for bit
    assert list(res.model) == list(ms[0]) and all(res.model[k].dtype == ms[0][k].dtype for k in ms[0])
    assert int(res.model["bn.num_batches_tracked"]) == 40  # counters: the maximum
    assert not res.weights or abs(sum(res.weights.values()) - 1.0) < 1e-12
    for k in ("w", "b"):  # every coordinate stays within the clients' range
        stack = np.stack([m[k] for m in ms])
        assert (res.model[k] >= stack.min(axis=0) - 1e-6).all() and (res.model[k] <= stack.max(axis=0) + 1e-6).all()
    same = aggregate([(f"h{i}", ms[0], 10 + i) for i in range(4)], AggregationParams(rule=rule))
    assert same_state({k: v for k, v in same.model.items() if k != "bn.num_batches_tracked"},
                      {k: v for k, v in ms[0].items() if k != "bn.num_batches_tracked"})


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_never_sees_a_rejected_update(rule):
    ms = models()
    bad = {k: v.copy() for k, v in ms[0].items()}
    bad["w"][0, 0] = np.nan
    res = aggregate([("bad", bad, 10)] + [(f"h{i}", m, 10) for i, m in enumerate(ms[1:])], AggregationParams(rule=rule))
    assert "bad" in res.rejected and "bad" not in res.distances and np.isfinite(res.model["w"]).all()
