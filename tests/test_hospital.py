"""The Flower-free hospital: what one site does for each message, called directly."""

from __future__ import annotations

import pytest
import torch

from simlab.continual.odex_features import first_block_keys
from simlab.hospital import Hospital, train_config
from simlab.models.unet import build_model, state_to_numpy
from simlab.scenario.schema import load_scenario_dict
from simlab.scenario.task import task_from_json, task_json, task_of


@pytest.fixture()
def scenario(tmp_path):
    raw = {"name": "h", "seed": 3, "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache")},
           "domains": {"A": {}, "B": {"scanner": {"contrast": "inverted"}}, "C": {}},
           "hospitals": [{"id": "h1", "size": 6, "label_fraction": 0.5, "drift": {"type": "abrupt", "domains": ["A", "B"],
                                                                                 "at": [2]}},
                         {"id": "h2", "size": 6, "drift": {"type": "none", "domain": "C"}}],
           "model": {"channels": [4, 8, 16]}, "federation": {"rounds": 3, "local_steps": 2, "batch_size": 3},
           "evaluation": {"test_size": 4, "domains": ["A", "B"]}, "continual": {"method": "odex"}}
    return load_scenario_dict(raw, "<test>").base


def test_a_task_holds_only_what_its_hospital_needs(scenario):
    task = task_of(scenario, "h1")
    assert task.hospital.id == "h1" and sorted(task.domains) == ["A", "B"]  # C is neither read nor tested
    assert task.eval_domains == ["A", "B"] and task.num_classes == 3
    assert task_from_json(task_json(task)) == task
    cfg = train_config(task, "cpu")
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.device) == (2, 3, scenario.federation.lr, "cpu")


def test_train_is_a_pure_function_of_task_model_round_and_state(scenario):
    state = state_to_numpy(build_model(scenario.model, 3))
    a = Hospital(task_of(scenario, "h1")).train(state, 2, {}, want_entry=True)
    b = Hospital(task_of(scenario, "h1")).train(state, 2, {}, want_entry=True)
    assert all(a.state[k].tobytes() == b.state[k].tobytes() for k in a.state)
    assert a.metrics["num_examples"] == 3.0  # label_fraction 0.5 of 6 images
    assert a.method_state == {} and a.entry is not None and a.entry.first_block == {}  # the server adds it
    other = Hospital(task_of(scenario, "h1")).train(state, 3, {})
    assert any(a.state[k].tobytes() != other.state[k].tobytes() for k in a.state) and other.entry is None


def test_evaluate_and_score(scenario):
    model = build_model(scenario.model, 3)
    state = state_to_numpy(model)
    h = Hospital(task_of(scenario, "h1"))
    rows = h.evaluate(state)
    assert {k.split("/")[1] for k in rows} == {"A", "B"}
    assert {"dice/A", "dice_c1/A", "dice_c2/A", "hd95/A", "hd95_missed/A"} <= set(rows)
    keys = first_block_keys(model, scenario.continual.odex.features, torch.zeros(1, 1, 32, 32))
    fb = {k: state[k] for k in keys}
    entry = h.window_entry(model, 1, "cpu")
    entry = type(entry)(fb, entry.stats, entry.calibration, entry.round)
    decision = h.window_decision({0: [entry]}, 1)
    assert decision["member"] == 0 and len(decision["m0"]) == 1
    pool = h.evaluate_pool({0: state}, {0: [entry]}, {"A": 0})
    assert pool["routing_purity/A"] == 1.0 and "dice_oracle/A" in pool and "dice_oracle/B" not in pool
    assert pool["dice/A"] == pytest.approx(rows["dice/A"])  # one member: routed = the member itself
    only_b = h.evaluate(state, domains=["B"])  # a shared model's evaluator tests only its domains
    assert {k.split("/")[1] for k in only_b} == {"B"} and only_b["dice/B"] == rows["dice/B"]
    assert set(h.evaluate_pool({0: state}, {0: [entry]}, {"A": 0}, domains=["A"])) == {k for k in pool if k.endswith("/A")}
    with pytest.raises(ValueError, match="asked to evaluate domain.*C"):
        h.evaluate(state, domains=["C"])
    blocks = Hospital(task_of(scenario, "h2")).amplitudes(1)
    assert blocks.ndim == 4 and blocks.shape[0] >= 1
