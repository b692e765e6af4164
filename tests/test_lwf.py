"""LwF: the distillation term against its definition, and what it does to training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simlab.continual.lwf import LwF, LwfParams, distillation
from simlab.continual.registry import ContinualSpec, make_method
from simlab.continual.sequential import Sequential
from simlab.continual.training import TrainConfig
from simlab.models.unet import ModelSpec, build_model, state_to_numpy
from tests.test_conformance import windows

CFG = TrainConfig(steps=4, batch_size=4, lr=0.01)


def test_distillation_is_the_pixelwise_kl_of_softened_outputs():
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    T = 2.0
    p_old = F.softmax(old / T, dim=1)
    ref = F.kl_div(F.log_softmax(new / T, dim=1), p_old, reduction="none").sum(dim=1).mean()
    assert distillation(new, old, T).item() == pytest.approx(ref.item(), rel=1e-6)
    # cross-entropy form of Li & Hoiem differs by the old model's entropy only (same gradient)
    ce = -(p_old * F.log_softmax(new / T, dim=1)).sum(dim=1).mean()
    entropy = -(p_old * F.log_softmax(old / T, dim=1)).sum(dim=1).mean()
    assert distillation(new, old, T).item() == pytest.approx((ce - entropy).item(), rel=1e-5)
    assert distillation(old, old, T).item() == pytest.approx(0.0, abs=1e-7)


def test_defaults_and_registration():
    assert LwfParams() == LwfParams(temperature=2.0, weight=1.0)
    method = make_method(ContinualSpec(method="lwf"))
    assert isinstance(method, LwF) and method.params == LwfParams()
    assert not method.keeps_state and not method.breaks_no_rehearsal and method.family == "distillation"


def _train(method, seed=5):
    torch.manual_seed(0)
    model = build_model(ModelSpec(channels=[4, 8, 16]), 3)
    start = state_to_numpy(model)
    method.local_update(model, windows, 1, {}, CFG, seed=seed)
    return start, state_to_numpy(model)


def _distance(a, b) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]).astype(np.float64) ** 2).sum() for k in a if a[k].dtype.kind == "f")))


def test_weight_zero_is_sequential_and_distillation_holds_the_model_back():
    _, seq = _train(Sequential())
    _, zero = _train(LwF(LwfParams(weight=0.0)))
    assert all(seq[k].tobytes() == zero[k].tobytes() for k in seq)
    start, strong = _train(LwF(LwfParams(weight=50.0)))
    assert _distance(strong, start) < _distance(seq, start)  # the teacher (received model) pulls back
