"""Unlabelled-data objectives (mean teacher, pseudo-labels), hospitals without labels and hospitals that
do not participate: the equations on hand-made numbers, the flow through local training and a hospital,
and one Flower run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simlab.augment.frequency import FrequencyAugmenter, FrequencyParams
from simlab.continual.ewc import EWC, sampled_labels
from simlab.continual.mean_teacher import MeanTeacher, MeanTeacherParams, consistency, ema_update
from simlab.continual.pseudo_label import PseudoLabel, PseudoLabelParams, confident_labels, masked_cross_entropy
from simlab.continual.semi_supervised import OBJECTIVES, SemiSupervisedSpec, make_objective
from simlab.continual.sequential import Sequential
from simlab.continual.training import TrainConfig, train_local
from simlab.continual.unlabelled import Perturbation, PerturbationParams, sigmoid_rampup
from simlab.hospital import Hospital
from simlab.models.unet import ModelSpec, build_model, state_to_numpy
from simlab.scenario.schema import load_scenario_dict
from simlab.scenario.task import task_of

SMALL = ModelSpec(channels=[4, 8, 16])
CFG = TrainConfig(steps=3, batch_size=4, lr=0.01)


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(SMALL, 3)


def images(n=8, size=32, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.random((n, 1, size, size)).astype(np.float32)


def changed(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = state_to_numpy(a), state_to_numpy(b)
    return any(sa[k].tobytes() != sb[k].tobytes() for k in sa)


# ------------------------------------------------------------------------------ the equations
def test_sigmoid_rampup_is_laine_and_ailas_curve():
    assert sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2, 5) == pytest.approx(math.exp(-5 * 0.6 ** 2))
    assert sigmoid_rampup(5, 5) == 1.0 and sigmoid_rampup(9, 5) == 1.0 and sigmoid_rampup(1, 0) == 1.0


def test_ema_update_is_the_mean_teacher_equation():
    """θ'_t = α θ'_{t−1} + (1 − α) θ_t, parameter by parameter; buffers untouched."""
    student, teacher = fresh_model(), fresh_model()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        for b in student.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    before = [p.detach().clone() for p in teacher.parameters()]
    buffers = [b.clone() for b in teacher.buffers()]
    ema_update(teacher, student, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s.detach(), rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(buffers, teacher.buffers()))


def test_the_mean_teacher_starts_as_the_received_model_and_follows_the_student_by_ema():
    model = fresh_model()
    received = copy.deepcopy(model)
    mt = MeanTeacher(MeanTeacherParams(ema_decay=0.75))
    mt.begin(model, images(), t=1, last_round=4, cfg=CFG, seed=3)
    assert not changed(mt.teacher, received)
    assert mt.weight == pytest.approx(0.1 * math.exp(-5 * (1 - 1 / 1.0) ** 2))  # L = 0.25 · 4 = 1 round
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = [p.detach().clone() for p in received.parameters()]
    for _ in range(2):
        opt.zero_grad()
        mt.term(model, mt.batch(size=4)).loss.backward()
        opt.step()
        mt.after_step(model)
        expected = [0.75 * e + 0.25 * p.detach() for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, mt.teacher.parameters()):
        torch.testing.assert_close(p, e, rtol=0, atol=1e-6)
    mt.end()
    assert mt.teacher is None and mt.images is None


def test_consistency_is_the_mean_squared_softmax_difference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    manual = sum(float((a - b) ** 2) for a, b in zip(F.softmax(s, 1).flatten(), F.softmax(t, 1).flatten())) / s.numel()
    assert float(consistency(s, F.softmax(t, 1))) == pytest.approx(manual, rel=1e-6)
    assert float(consistency(t, F.softmax(t, 1))) == pytest.approx(0.0, abs=1e-12)


def test_pseudo_labels_keep_only_pixels_at_or_above_the_threshold():
    """Hand-made logits: 2 classes, 1 image of 1×3 pixels with max softmax 0.5, exactly τ and 0.99."""
    tau = 0.8
    p = torch.tensor([[0.5, 0.8, 0.01], [0.5, 0.2, 0.99]]).view(1, 2, 1, 3)  # [B, C, H, W]
    target, mask = confident_labels(p, tau)
    assert mask.tolist() == [[[False, True, True]]] and target[0, 0, 1:].tolist() == [0, 1]
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]).view(1, 2, 1, 3)
    logp = F.log_softmax(logits, dim=1)
    manual = -(float(logp[0, 0, 0, 1]) + float(logp[0, 1, 0, 2])) / 3  # mean over all 3 pixels
    assert float(masked_cross_entropy(logits, target, mask)) == pytest.approx(manual, rel=1e-6)
    nothing = torch.zeros_like(mask)
    assert float(masked_cross_entropy(logits, target, nothing)) == 0.0


def test_the_pseudo_label_loss_is_taken_on_the_perturbed_view_with_labels_from_the_raw_one():
    model = fresh_model()
    pl = PseudoLabel(PseudoLabelParams(threshold=0.0, labeller="received"))  # every pixel labelled
    pl.begin(model, images(), t=1, last_round=1, cfg=CFG, seed=0)
    x = pl.batch(size=2)
    state = pl.perturb.gen.get_state()
    term = pl.term(model, x)
    pl.perturb.gen.set_state(state)
    seen = pl.perturb(x)
    torch.testing.assert_close(term.seen, seen)
    target = F.softmax(pl.labeller(x), 1).argmax(1)
    torch.testing.assert_close(term.loss, F.cross_entropy(model(seen), target), rtol=1e-5, atol=1e-6)


def test_noise_perturbation_is_bounded_and_frequency_needs_a_bank():
    x = torch.full((3, 1, 8, 8), 0.5)
    params = PerturbationParams(noise_std=0.1, intensity=0.0)
    y = Perturbation(params, torch.Generator().manual_seed(0))(x)
    assert (y - x).abs().max() <= 0.2 + 1e-6 and (y != x).any()
    with pytest.raises(ValueError, match="needs other hospitals' amplitude blocks"):
        Perturbation(PerturbationParams(kind="frequency"), torch.Generator())
    bank = {"other": torch.rand(4, 1, 1, 1) * 50}
    aug = FrequencyAugmenter(FrequencyParams(enabled=True, prob=1.0), bank, "me", torch.Generator().manual_seed(1))
    assert Perturbation(PerturbationParams(), torch.Generator(), aug).kind == "frequency"  # auto
    assert Perturbation(PerturbationParams(kind="noise"), torch.Generator(), aug).kind == "noise"


# ------------------------------------------------------------------------------ local training
def test_an_objective_with_weight_zero_leaves_training_as_without_it():
    """The objective's extra forward passes (BatchNorm statistics aside) change nothing at weight 0."""
    x, y = images(), np.random.default_rng(1).integers(0, 3, (8, 32, 32)).astype(np.uint8)
    a, b = fresh_model(), fresh_model()
    train_local(a, x, y, CFG, seed=5)
    pl = PseudoLabel(PseudoLabelParams(weight=0.0))
    pl.begin(b, images(seed=2), 1, 1, CFG, 5)
    out = train_local(b, x, y, CFG, seed=5, unlabelled=pl)
    assert out["num_unlabelled"] == 8 and out["num_examples"] == 8
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_without_labelled_images_training_needs_an_objective_and_then_changes_the_model():
    empty_x, empty_y = np.zeros((0, 1, 32, 32), np.float32), np.zeros((0, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="no labelled images to train on"):
        train_local(fresh_model(), empty_x, empty_y, CFG, seed=0)
    for name in OBJECTIVES:
        model = fresh_model()
        obj = make_objective(SemiSupervisedSpec(objective=name))
        obj.begin(model, images(), 5, 5, CFG, 0)
        out = train_local(model, empty_x, empty_y, CFG, seed=0, unlabelled=obj)
        assert out["steps"] == 3 and out["num_examples"] == 0 and out["num_unlabelled"] == 8
        assert changed(model, fresh_model()), name


def test_ewc_without_labels_takes_the_fisher_at_labels_sampled_from_the_model():
    model = fresh_model()
    x = images()
    a, b = sampled_labels(model, x, CFG, 4), sampled_labels(model, x, CFG, 4)
    assert a.shape == (8, 32, 32) and a.dtype == np.uint8 and np.array_equal(a, b) and len(np.unique(a)) == 3

    class Blank:  # a window without labels whose labels would break anything that read them
        images, labels, labeled = x, np.full((8, 32, 32), 255, np.uint8), np.zeros(8, bool)

    ewc = EWC()
    mt = MeanTeacher(MeanTeacherParams(rampup=0.0))
    res = ewc.local_update(model, lambda t: Blank, 1, {}, CFG, seed=4, last_round=2, unlabelled=mt)
    fisher = [v for k, v in res.state.items() if k.startswith("fisher.")]
    assert fisher and all(np.isfinite(f).all() for f in fisher) and sum(float(f.sum()) for f in fisher) > 0


# ------------------------------------------------------------------------------ a hospital
@pytest.fixture()
def few_labels(tmp_path):
    raw = {"name": "f", "seed": 2, "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache")},
           "domains": {"A": {}},
           "hospitals": [{"id": "h1", "size": 8, "label_fraction": 0.25, "drift": {"type": "none", "domain": "A"}},
                         {"id": "h2", "size": 8, "label_fraction": 0, "drift": {"type": "none", "domain": "A"}}],
           "model": {"channels": [4, 8, 16]}, "federation": {
               "rounds": 2, "local_steps": 2, "batch_size": 4,
               "semi_supervised": {"objective": "mean_teacher", "weight_by": "all"}},
           "evaluation": {"test_size": 4}}
    return raw


def test_a_hospital_reports_every_image_it_trained_on_with_weight_by_all(few_labels):
    sc = load_scenario_dict(few_labels, "<test>").base
    state = state_to_numpy(build_model(sc.model, 3))
    h1 = Hospital(task_of(sc, "h1")).train(state, 1, {})
    assert (h1.metrics["num_examples"], h1.metrics["num_unlabelled"]) == (8.0, 6.0)  # 2 labelled + 6
    h2 = Hospital(task_of(sc, "h2")).train(state, 1, {})
    assert h2.metrics["num_examples"] == 8.0 and any(h2.state[k].tobytes() != state[k].tobytes() for k in state)
    few_labels["federation"]["semi_supervised"]["weight_by"] = "labelled"
    few_labels["hospitals"][1]["participates"] = False  # a site without labels that only tests
    sc = load_scenario_dict(few_labels, "<test>").base
    assert Hospital(task_of(sc, "h1")).train(state, 1, {}).metrics["num_examples"] == 2.0


@pytest.mark.parametrize("edit, key, fragment", [
    ({"objective": "none", "weight_by": "labelled"}, "hospitals[1].label_fraction", "nothing to train on"),
    ({"weight_by": "labelled"}, "federation.semi_supervised.weight_by", "reports 0 examples"),
    ({"objective": "none", "weight_by": "all"}, "federation.semi_supervised.weight_by", "no objective trains on"),
    ({"perturbation": {"kind": "frequency"}}, "federation.semi_supervised.perturbation.kind",
     "augmentation.frequency.enabled"),
])
def test_combinations_that_cannot_train_are_refused_naming_the_key(few_labels, edit, key, fragment):
    from simlab.config import ScenarioError

    few_labels["federation"]["semi_supervised"].update(edit)
    with pytest.raises(ScenarioError) as info:
        load_scenario_dict(few_labels, "<test>")
    problems = dict(info.value.problems)
    assert key in problems and fragment in problems[key], info.value.problems


def test_no_participating_hospital_or_too_many_sampled_is_refused(few_labels):
    from simlab.config import ScenarioError

    few_labels["hospitals"][1]["participates"] = False
    few_labels["federation"]["clients_per_round"] = 2
    with pytest.raises(ScenarioError, match=r"expected <= 1 \(hospitals that participate\)"):
        load_scenario_dict(few_labels, "<test>")
    few_labels["hospitals"][0]["participates"] = False
    del few_labels["federation"]["clients_per_round"]
    with pytest.raises(ScenarioError, match="at least one must train"):
        load_scenario_dict(few_labels, "<test>")
    few_labels["continual"] = {"method": "odex", "odex": {"expansion": "dice"}}
    few_labels["hospitals"][0]["participates"] = True
    few_labels["hospitals"][1]["participates"] = True
    with pytest.raises(ScenarioError, match="DiceEx"):
        load_scenario_dict(few_labels, "<test>")


def test_sequential_trains_on_no_unlabelled_image_without_an_objective():
    assert Sequential().unlabelled_set(lambda t: type("W", (), {"images": images(), "labeled": np.ones(8, bool)}),
                                       1, [1], 0, 1).shape[0] == 0


# ------------------------------------------------------------------------------ through Flower
SCENARIO = """\
name: ssl
seed: 4
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{contrast: inverted, noise: 0.03}}}}
hospitals:
  - {{id: h1, size: 8, drift: {{type: abrupt, domains: [A, B], at: [2]}}}}
  - {{id: h2, size: 8, label_fraction: 0, drift: {{type: none, domain: A}}}}
  - {{id: h3, size: 8, label_fraction: 0, participates: false, drift: {{type: none, domain: B}}}}
model: {{channels: [4, 8, 16]}}
federation:
  rounds: 3
  local_steps: 2
  batch_size: 4
  semi_supervised: {{objective: pseudo_label, weight_by: all}}
evaluation: {{every: 1, test_size: 4, domains: [A, B]}}
engine: {{cpus_per_client: 1}}
"""


@pytest.mark.flower
def test_a_site_that_does_not_participate_is_never_trained_but_evaluated(tmp_path):
    from simlab.cli import main

    p = tmp_path / "ssl.yaml"
    p.write_text(SCENARIO.format(cache=tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", str(p), "--out", str(out), "--quiet", "--no-report"]) == 0
    costs = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert all(c["sent"] == ["h1", "h2"] and c["replied"] == ["h1", "h2"] for c in costs if c["round"] > 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {(r["hospital"], r["round"]) for r in rows if r["metric"] == "train_loss"}
    assert trained == {(h, t) for h in ("h1", "h2") for t in (1, 2, 3)}  # h2 trains with no labels
    weights = {r["hospital"]: r["value"] for r in rows if r["metric"] == "agg_weight" and r["round"] == 1}
    assert weights == pytest.approx({"h1": 0.5, "h2": 0.5})  # weight_by all: 8 images each
    assert all(c.get("evaluators") and "h3" in c["evaluators"] for c in costs if c["evaluated"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["sequential"]["semi_supervised"] == {"objective": "pseudo_label", "weight_by": "all"}
    h3 = summary["arms"]["sequential"]["per_hospital"]["h3"]  # its domain's Dice, read as its own
    assert [s["domain"] for s in h3["stages"]] == ["B"] and h3["R"][0][0] is not None
