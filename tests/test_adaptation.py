"""Test-time adaptation plug-ins (``evaluation.adaptation``): every registered adaptation through the same
checks (what it declares, determinism, the deployed model untouched, no label read), and the property
of each method: AdaBN changes no weight, TENT only BatchNorm's affine parameters, early-feature
self-training only the first block's weights, FDA only the amplitude inside the radius-β disk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from simlab.adaptation.base import Adaptation, AdaptationContext
from simlab.adaptation.early_features import first_block
from simlab.adaptation.fda import disk, nearest_donors, swap_low_frequency
from simlab.adaptation.registry import ADAPTATIONS, make_adaptation, param_sections
from simlab.augment.frequency import FrequencyParams, amplitude_block, make_bank_entries
from simlab.config import ScenarioError
from simlab.hospital import Hospital
from simlab.models.unet import ModelSpec, build_model, state_to_numpy
from simlab.scenario.schema import EvaluationSpec, load_scenario_dict
from simlab.scenario.task import task_of

SMALL = ModelSpec(channels=[4, 8, 16])
SIZE = 32


def images(seed: int, n: int = 6, gain: float = 1.0) -> np.ndarray:
    """Blobs on a smooth background: structure at every scale, so adaptations have something to move."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        cy, cx, r = g.uniform(0.3, 0.7), g.uniform(0.3, 0.7), g.uniform(0.15, 0.3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(float)
        out.append(gain * (0.6 * blob + 0.3 * xx + 0.05 * g.standard_normal((SIZE, SIZE))))
    return np.asarray(out, dtype=np.float32)[:, None]


def trained_model() -> torch.nn.Module:
    """A tiny U-Net with non-trivial BatchNorm statistics (a few forward passes in train mode)."""
    torch.manual_seed(0)
    model = build_model(SMALL, 3)
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(torch.from_numpy(images(50 + s, n=8)))
    return model.eval()


def source() -> tuple[np.ndarray, np.ndarray]:
    x = images(7, n=8)
    return x, (x[:, 0] > 0.45).astype(np.uint8) + (x[:, 0] > 0.75).astype(np.uint8)


def bank() -> dict[str, np.ndarray]:
    params = FrequencyParams(alpha=0.1)  # b = 3 at 32 px
    return {f"h{i}": make_bank_entries(torch.from_numpy(images(20 + i, n=5, gain=1.5)), params,
                                       np.random.default_rng(i)).numpy() for i in range(3)}


def context(seed: int = 11) -> AdaptationContext:
    return AdaptationContext(batch_size=4, device="cpu", seed=seed, bank=bank(), source=source)


QUICK = {"early_features": {"head_steps": 10, "max_epochs": 2}}
"""Fewer steps than the defaults where a default run takes seconds (the fast tier stays fast)."""


def adaptation(name: str, **params) -> Adaptation:
    ev = EvaluationSpec(adaptation=name)
    params = QUICK.get(name, {}) | params
    if params:
        ev = dataclasses.replace(ev, **{name: dataclasses.replace(getattr(ev, name), **params)})
    return make_adaptation(ev)


def state_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k].tobytes() != after[k].tobytes()}


# ------------------------------------------------------------------------------ conformance
@pytest.mark.parametrize("name", sorted(ADAPTATIONS))
def test_adaptation_declares_what_it_is(name):
    cls = ADAPTATIONS[name]
    assert issubclass(cls, Adaptation) and cls.name == name and cls.help
    assert isinstance(cls.needs_bank, bool) and isinstance(cls.reads_source, bool)
    if cls.Params is not None:
        assert dataclasses.is_dataclass(cls.Params) and cls.Params.__dataclass_params__.frozen
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls.Params)), name
        assert isinstance(getattr(EvaluationSpec(), name), cls.Params)  # its section of the schema
        assert f"evaluation.{name}" in param_sections()


@pytest.mark.parametrize("name", sorted(ADAPTATIONS))
def test_adaptation_is_deterministic_and_leaves_the_deployed_model_alone(name):
    model, x = trained_model(), images(3)
    before = state_of(model)
    a = adaptation(name).predict(model, x, context())
    b = adaptation(name).predict(model, x, context())
    assert a.pred.shape == (len(x), SIZE, SIZE) and a.pred.dtype == torch.int64
    assert torch.equal(a.pred, b.pred)
    assert not changed(state_of(a.model), state_of(b.model))
    assert not changed(before, state_of(model)) and not model.training
    assert all(p.requires_grad for p in model.parameters())  # the deployed model's gradients untouched


@pytest.mark.parametrize("name", sorted(set(ADAPTATIONS) - {"none"}))
def test_adaptation_changes_the_prediction_of_a_shifted_test_set(name):
    """Each adaptation does something: on images far from the statistics the model saw, its label maps
    differ from the unadapted model's."""
    model, x = trained_model(), images(3, gain=3.0) + 0.5
    plain = adaptation("none").predict(model, x, context()).pred
    assert not torch.equal(adaptation(name).predict(model, x, context()).pred, plain)


@pytest.mark.parametrize("name", sorted(ADAPTATIONS))
def test_no_adaptation_reads_a_label_it_must_not(name, tmp_path, monkeypatch):
    """Through the hospital: the predictions do not change when the test labels change or when the
    window's unlabelled images carry labels no loss could take (255: out of range for every class)."""
    raw = {"name": "n", "seed": 1, "data": {"image_size": SIZE, "cache_dir": str(tmp_path / "cache")},
           "domains": {"A": {}, "B": {"scanner": {"bias_field": 0.4, "gamma": 1.5}}},
           "hospitals": [{"id": "h1", "size": 6, "label_fraction": 0.5, "drift": {"type": "none", "domain": "A"}}],
           "model": {"channels": [4, 8, 16]}, "federation": {"rounds": 2},
           "augmentation": {"frequency": {"alpha": 0.1}},
           "evaluation": {"test_size": 4, "adaptation": name, "fda": {"donors": 2},
                          "early_features": {"head_steps": 3, "max_epochs": 2}}}
    h = Hospital(task_of(load_scenario_dict(raw, "<test>").base, "h1"))
    window = h.stream.window(1)
    window.labels[~window.labeled] = 255
    state, preds = state_to_numpy(build_model(SMALL, 3)), []
    monkeypatch.setattr("simlab.hospital.metric_rows", lambda domain, pred, *a, **k: preds.append(pred) or {})
    test_sets = h.test_sets()
    h.evaluate(state, t=1, bank={"h1": h.amplitudes(1)})
    scrambled = {d: (x, np.random.default_rng(0).permutation(y.ravel()).reshape(y.shape)) for d, (x, y) in test_sets.items()}
    monkeypatch.setattr(h, "test_sets", lambda domains=None: scrambled)
    h.evaluate(state, t=1, bank={"h1": h.amplitudes(1)})
    assert len(preds) == 4 and all(torch.equal(a, b) for a, b in zip(preds[:2], preds[2:]))


# ------------------------------------------------------------------------------ properties
def test_adabn_changes_running_statistics_only():
    model = trained_model()
    adapted = adaptation("adabn").predict(model, images(3, gain=2.0), context()).model
    before, after = state_of(model), state_of(adapted)
    assert changed(before, after) and all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                          for k in changed(before, after))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), adapted.parameters()))


def test_tent_changes_only_batchnorm_affine_parameters():
    model = trained_model()
    bn_affine = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 for p in ("weight", "bias")}
    for params in ({}, {"optimizer": "sgd", "lr": 0.05}, {"episodic": True}, {"predict_after_step": False}):
        adapted = adaptation("tent", batch_size=2, **params).predict(model, images(3, gain=2.0), context()).model
        diff = changed(state_of(model), state_of(adapted))
        assert diff and diff <= bn_affine, params  # every other parameter and every buffer bit-identical


def test_tent_minimises_the_entropy_of_its_batches():
    """Many steps on one batch: the mean prediction entropy on it goes down (the objective works)."""
    from simlab.adaptation.base import entropy_map

    model, x = trained_model(), images(3, n=4, gain=2.0)
    adapted = adaptation("tent", batch_size=4, steps=30, lr=0.01).predict(model, x, context()).model
    fresh = adaptation("tent", batch_size=4, steps=1, lr=1e-12).predict(model, x, context()).model
    with torch.no_grad():
        assert entropy_map(adapted(torch.from_numpy(x))).mean() < entropy_map(fresh(torch.from_numpy(x))).mean()


def test_early_features_refines_only_the_first_block():
    model = trained_model()
    adapted = adaptation("early_features", head_steps=5, max_epochs=2, tolerance=0.0).predict(
        model, images(3, gain=2.0), context()).model
    first = {f"model.0.{k}" for k, _ in first_block(model).named_parameters()}
    diff = changed(state_of(model), state_of(adapted))
    assert diff and diff <= first  # no running statistic, nothing deeper changes


def test_early_features_needs_labelled_source_images():
    ctx = dataclasses.replace(context(), source=lambda: (np.zeros((0, 1, SIZE, SIZE), np.float32),
                                                         np.zeros((0, SIZE, SIZE), np.uint8)))
    with pytest.raises(ValueError, match="labelled images"):
        adaptation("early_features").predict(trained_model(), images(3), ctx)


def test_fda_keeps_the_phase_and_changes_only_the_disk():
    x = torch.from_numpy(images(3, n=3)).double()
    donors = amplitude_block(torch.from_numpy(images(9, n=3, gain=2.5)).double(), 3)
    radius = 2.5
    out = swap_low_frequency(x, donors, radius)
    f_in, f_out = torch.fft.fft2(x), torch.fft.fft2(out)
    ky, kx = disk(radius, 3)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[ky % SIZE, kx % SIZE] = True
    assert int(inside.sum()) == len(ky) == 21  # |k| <= 2.5: 21 frequencies
    scale = f_in.abs().max()
    assert torch.allclose(f_out[..., ~inside], f_in[..., ~inside], atol=1e-9 * scale, rtol=0)  # outside: untouched
    new, old = f_out[:, :, ky % SIZE, kx % SIZE], f_in[:, :, ky % SIZE, kx % SIZE]
    assert torch.allclose(new.abs(), donors[:, :, ky + 3, kx + 3], rtol=1e-9, atol=1e-9 * scale)  # the donor's amplitude
    unit = torch.ones_like(new.abs())
    assert torch.allclose(torch.polar(unit, new.angle()), torch.polar(unit, old.angle()), atol=1e-9)  # the same phase
    assert not torch.allclose(out, x)


def test_fda_with_the_image_own_amplitude_is_the_identity():
    x = torch.from_numpy(images(3, n=2)).double()
    assert torch.allclose(swap_low_frequency(x, amplitude_block(x, 2), 2.0), x, atol=1e-12)


def test_fda_donor_similarity_ignores_gain_and_offset():
    """The distance compares the shape of the low-frequency amplitudes: a donor bank rescaled and
    shifted in intensity gives the same donors, in the same order."""
    targets = amplitude_block(torch.from_numpy(images(3, n=4)), 3)
    donor_images = torch.from_numpy(images(30, n=10))
    plain = nearest_donors(targets, amplitude_block(donor_images, 3), 4)
    restyled = nearest_donors(targets, amplitude_block(2.7 * donor_images + 0.4, 3), 4)
    assert torch.equal(plain, restyled)
    own = nearest_donors(targets, torch.cat([amplitude_block(donor_images, 3), targets]), 1)
    assert own.ravel().tolist() == [10, 11, 12, 13]  # an image's own block is its nearest donor


def test_fda_without_a_bank_is_refused():
    with pytest.raises(ValueError, match="amplitude bank"):
        adaptation("fda").predict(trained_model(), images(3), dataclasses.replace(context(), bank=None))


# ------------------------------------------------------------------------------ validation
def scenario(**evaluation) -> dict:
    return {"name": "n", "data": {"image_size": 64}, "domains": {"A": {}},
            "hospitals": [{"id": "h1", "size": 8, "drift": {"type": "none", "domain": "A"}},
                          {"id": "h2", "size": 8, "drift": {"type": "none", "domain": "A"}}],
            "augmentation": {"frequency": {"alpha": 0.05}}, "evaluation": evaluation}


def test_fda_needs_bank_blocks_that_hold_its_disk_and_donors():
    load_scenario_dict(scenario(adaptation="fda"), "<t>")  # b = 3 at 64 px; r = 1.92; 16 blocks >= 7 donors
    small = scenario(adaptation="fda", fda={"beta": 0.1})  # r = 6.4 > 3
    with pytest.raises(ScenarioError, match="augmentation.frequency.alpha: .*half-width >= 6"):
        load_scenario_dict(small, "<t>")
    dc_only = scenario(adaptation="fda") | {"augmentation": {"frequency": {"alpha": 0.01}}}
    with pytest.raises(ScenarioError, match="augmentation.frequency.alpha"):
        load_scenario_dict(dc_only, "<t>")
    with pytest.raises(ScenarioError, match="evaluation.fda.donors: 17 donors per image, but the bank holds 16"):
        load_scenario_dict(scenario(adaptation="fda", fda={"donors": 17}), "<t>")
    load_scenario_dict(scenario(adaptation="tent", fda={"donors": 17}), "<t>")  # only the chosen one is checked


def test_early_features_needs_labelled_windows_at_every_hospital():
    """Its head is fitted on the evaluating hospital's labelled window; a site without labels may be
    the one that evaluates a domain."""
    raw = scenario(adaptation="early_features")
    raw["hospitals"][1] |= {"label_fraction": 0, "participates": False}
    with pytest.raises(ScenarioError, match=r"hospitals\[1\].label_fraction: evaluation.adaptation early_features"):
        load_scenario_dict(raw, "<t>")
    load_scenario_dict(raw | {"evaluation": {"adaptation": "adabn"}}, "<t>")


def test_arms_may_set_the_adaptation_and_its_params_and_the_pool_refuses_them():
    raw = scenario() | {"arms": [{"name": "tent", "set": {"evaluation.adaptation": "tent", "evaluation.tent.lr": 0.01}},
                                 {"name": "ef", "set": {"evaluation.early_features": {"max_epochs": 2}}}]}
    loaded = load_scenario_dict(raw, "<t>")
    assert loaded.arms["tent"].evaluation.tent.lr == 0.01 and loaded.arms["ef"].evaluation.early_features.max_epochs == 2
    with pytest.raises(ScenarioError, match=r"evaluation.tent.lr: expected a value <= 1.0 \(a step this large only diverges\), found 5.0"):
        load_scenario_dict(scenario(adaptation="tent", tent={"lr": 5.0}), "<t>")
    with pytest.raises(ScenarioError, match="not combined with a routed model pool"):
        load_scenario_dict(scenario(adaptation="fda") | {"continual": {"method": "odex"}}, "<t>")


# ------------------------------------------------------------------------------ through Flower
TINY = """\
name: tiny-tta
seed: 4
data: {{image_size: 32, cache_dir: {cache}}}
domains:
  A: {{}}
  B: {{scanner: {{bias_field: 0.2, noise: 0.02}}}}
  newcomer: {{scanner: {{bias_field: 0.5, gamma: 1.6, intensity_scale: [0.6, 0.8]}}}}
hospitals:
  - {{id: h1, size: 8, drift: {{type: none, domain: A}}}}
  - {{id: h2, size: 8, label_fraction: 0.5, drift: {{type: none, domain: B}}}}
model: {{channels: [8, 16, 32]}}
federation: {{rounds: 3, local_steps: 2, batch_size: 4, lr: 0.005}}
augmentation: {{frequency: {{alpha: 0.1}}}}
evaluation: {{every: 2, test_size: 6, early_features: {{head_steps: 10, max_epochs: 2}}}}
arms:
  - {{name: none, set: {{evaluation.adaptation: none}}}}
  - {{name: adabn, set: {{evaluation.adaptation: adabn}}}}
  - {{name: tent, set: {{evaluation.adaptation: tent, evaluation.tent.batch_size: 3}}}}
  - {{name: fda, set: {{evaluation.adaptation: fda}}}}
  - {{name: early_features, set: {{evaluation.adaptation: early_features}}}}
"""


@pytest.mark.flower
def test_every_adaptation_through_flower(tmp_path):
    """One tiny federation, one arm per adaptation: every arm trains the same models (the adaptation
    touches evaluation only), the bank travels with evaluate messages of the fda arm only (never with
    its training messages), and each adaptation changes some test domain's Dice."""
    import json

    from simlab.cli import main

    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY.format(cache=tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--no-report"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["metric"] in ("train_failed", "eval_failed", "update_rejected")]
    arms = list(ADAPTATIONS)
    loss = {a: [(r["round"], r["hospital"], r["value"]) for r in rows if r["arm"] == a and r["metric"] == "train_loss"]
            for a in arms}
    assert all(loss[a] == loss["none"] for a in arms) and len(loss["none"]) == 6
    dice = {a: {(r["round"], r["domain"]): r["value"] for r in rows if r["arm"] == a and r["metric"] == "dice"}
            for a in arms}
    assert set(dice["none"]) == {(t, d) for t in (0, 2, 3) for d in ("A", "B", "newcomer")}
    assert all(dice[a] != dice["none"] for a in arms if a != "none")
    costs = {(c["arm"], c["round"]): c for c in map(json.loads, (out / "rounds.jsonl").read_text().splitlines())}
    assert costs[("fda", 0)]["bytes_bank"] > 0 and "bytes_bank" not in costs[("none", 0)]
    assert costs[("fda", 1)]["bytes_down"] == costs[("none", 1)]["bytes_down"]  # training messages: no bank
    assert costs[("fda", 2)]["eval_bytes_down"] > costs[("none", 2)]["eval_bytes_down"]  # evaluate messages: the bank
