"""Normalisation in a federation: FedBN (``federation.norm: local``) and AdaBN (``evaluation.adaptation``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from simlab.hospital import NORM, Hospital
from simlab.models.norm import adapt_batchnorm, norm_state_keys
from simlab.models.unet import ModelSpec, build_model, state_to_numpy
from simlab.scenario.schema import load_scenario_dict
from simlab.scenario.task import task_of


def test_norm_state_keys_are_exactly_the_normalisation_layers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.GroupNorm(1, 2))
    assert norm_state_keys(model) == ["1.weight", "1.bias", "1.running_mean", "1.running_var",
                                      "1.num_batches_tracked", "4.weight", "4.bias"]
    unet = build_model(ModelSpec(channels=[4, 8]), 3)
    keys = norm_state_keys(unet)
    assert keys and all(".adn.N." in k or ".N." in k or k.endswith(("running_mean", "running_var")) for k in keys)
    assert not any("conv.weight" in k for k in keys)


def test_adabn_gives_the_images_own_statistics_and_changes_no_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    images = (np.random.default_rng(0).standard_normal((10, 1, 5, 5)) * 3 + 7).astype(np.float32)
    adapted = adapt_batchnorm(model, images, batch_size=64, device="cpu")
    with torch.no_grad():
        z = model[0](torch.from_numpy(images))
    bn = adapted[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), z.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), z.var(dim=(0, 2, 3), unbiased=True).numpy(), rtol=1e-4)
    assert not adapted.training and torch.equal(adapted[0].weight, model[0].weight)
    assert torch.equal(model[1].running_mean, torch.zeros(3))  # the original is untouched


@pytest.fixture()
def scenario(tmp_path):
    def make(**sets):
        raw = {"name": "n", "seed": 2, "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache")},
               "domains": {"A": {}, "B": {"scanner": {"contrast": "inverted"}}},
               "hospitals": [{"id": "h1", "size": 6, "drift": {"type": "none", "domain": "A"}},
                             {"id": "h2", "size": 6, "drift": {"type": "none", "domain": "B"}}],
               "model": {"channels": [4, 8, 16]}, "federation": {"rounds": 2, "local_steps": 2, "batch_size": 3},
               "evaluation": {"test_size": 4}}
        for k, v in sets.items():
            section, key = k.split("__")
            raw.setdefault(section, {})[key] = v
        return load_scenario_dict(raw, "<test>").base
    return make


def test_local_norm_keeps_normalisation_at_the_hospital(scenario):
    sc = scenario(federation__norm="local")
    model = build_model(sc.model, 3)
    state, local = state_to_numpy(model), set(norm_state_keys(model))
    h1 = Hospital(task_of(sc, "h1"))
    out = h1.train(state, 1, {})
    assert set(out.state) == set(state) - local  # never sent
    assert {k[len(NORM):] for k in out.method_state} == local
    again = h1.train(state, 2, out.method_state)  # round 2 starts from its own normalisation layers
    shared = Hospital(task_of(scenario(), "h1")).train(state, 2, {})
    assert any(again.state[k].tobytes() != shared.state[k].tobytes() for k in again.state)
    rows_own = h1.evaluate(state, out.method_state)
    rows_global = h1.evaluate(state, {})
    assert rows_own != rows_global  # the deployed model at h1 uses h1's normalisation


def test_shared_norm_sends_everything_and_ignores_private_state(scenario):
    sc = scenario()
    state = state_to_numpy(build_model(sc.model, 3))
    out = Hospital(task_of(sc, "h1")).train(state, 1, {})
    assert set(out.state) == set(state) and out.method_state == {}


def test_adabn_evaluation_differs_from_plain_and_is_deterministic(scenario):
    state = state_to_numpy(build_model(scenario().model, 3))
    plain = Hospital(task_of(scenario(), "h2")).evaluate(state)
    ada = Hospital(task_of(scenario(evaluation__adaptation="adabn"), "h2")).evaluate(state)
    again = Hospital(task_of(scenario(evaluation__adaptation="adabn"), "h2")).evaluate(state)
    assert ada == again and ada["dice/B"] != plain["dice/B"]


def test_pool_refuses_local_norm_and_adaptation(scenario):
    from simlab.config import ScenarioError

    for key, value in (("federation__norm", "local"), ("evaluation__adaptation", "adabn")):
        with pytest.raises(ScenarioError, match="not combined with"):
            scenario(continual__method="odex", **{key: value})
