"""MiB, PLOP and Riemannian Walk: their terms against their definitions with real numbers, their
defaults, what they do to training, and one run of each through Flower."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simlab.cli import main
from simlab.continual.mib import MiB, MibParams, plain_ce, plain_kd, unbiased_ce, unbiased_kd
from simlab.continual.plop import (PLOP, PlopParams, entropy_thresholds, local_pod, pod_loss, pseudo_label_loss,
                                   pseudo_labels, unet_blocks)
from simlab.continual.registry import ContinualSpec, make_method
from simlab.continual.rwalk import RWalk, RwalkParams
from simlab.continual.sequential import Sequential
from simlab.continual.training import TrainConfig
from simlab.models.unet import ModelSpec, build_model, state_to_numpy
from tests.test_conformance import BlindWindow, windows
from tests.test_federation import TINY, read_rows

CFG = TrainConfig(steps=4, batch_size=4, lr=0.01)


def small_model():
    torch.manual_seed(0)
    return build_model(ModelSpec(channels=[4, 8, 16]), 3)


def distance(a, b) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]).astype(np.float64) ** 2).sum() for k in a if a[k].dtype.kind == "f")))


def trained(method, rounds=(1,), seed=5, state=None):
    """(model before the last round, after it, state after it)."""
    model, state = small_model(), dict(state or {})
    for t in rounds:
        start = state_to_numpy(model)
        state = method.local_update(model, windows, t, state, CFG, seed=seed + t).state
    return start, state_to_numpy(model), state


@pytest.mark.parametrize("name, cls, params, family, keeps", [
    ("mib", MiB, MibParams(kd_weight=10.0), "distillation", False),
    ("plop", PLOP, PlopParams(pod_weight=0.01, scales=3, pseudo_labels=True), "distillation", False),
    ("rwalk", RWalk, RwalkParams(strength=0.4, alpha=0.9, eps=1e-8), "regularisation", True),
])
def test_defaults_and_registration(name, cls, params, family, keeps):
    assert cls.Params() == params
    method = make_method(ContinualSpec(method=name))
    assert isinstance(method, cls) and method.params == params and method.family == family
    assert method.keeps_state == keeps and not method.breaks_no_rehearsal and not method.uses_future_data


# ------------------------------------------------------------------------------------------- MiB
def test_mib_unbiased_losses_reduce_to_the_plain_ones_when_the_classes_do_not_change():
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    y = torch.randint(0, 4, (2, 5, 5), generator=g)
    ce = unbiased_ce(new, y, num_old=4, annotated={0, 1, 2, 3})
    assert ce.item() == pytest.approx(plain_ce(new, y).item(), rel=1e-6)
    assert ce.item() == pytest.approx(F.cross_entropy(new, y).item(), rel=1e-6)
    kd = unbiased_kd(new, old)
    by_hand = -(F.softmax(old, 1) * torch.log(F.softmax(new, 1))).sum(1).mean()
    assert kd.item() == pytest.approx(plain_kd(new, old).item(), rel=1e-6)
    assert kd.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_mib_general_form_moves_probability_into_the_background_as_the_paper_says():
    """Old model: classes 0 (bg), 1, 2; new model adds 3, 4; labels annotate 0, 3, 4 only."""
    new = torch.tensor([0.5, -1.0, 2.0, 0.1, 1.0]).view(1, 5, 1, 1)
    old = torch.tensor([1.0, 0.0, -2.0]).view(1, 3, 1, 1)
    p, q = F.softmax(new.flatten(), 0), F.softmax(old.flatten(), 0)
    for label, prob in ((0, p[0] + p[1] + p[2]), (3, p[3])):  # labelled bg absorbs the old classes
        ce = unbiased_ce(new, torch.tensor([[[label]]]), num_old=3, annotated={0, 3, 4})
        assert ce.item() == pytest.approx(-math.log(prob.item()), rel=1e-5)
    kd = -(q[0] * torch.log(p[0] + p[3] + p[4]) + q[1] * torch.log(p[1]) + q[2] * torch.log(p[2]))
    assert unbiased_kd(new, old).item() == pytest.approx(kd.item(), rel=1e-5)  # old bg ↔ bg + new classes


def test_mib_weight_zero_is_sequential_and_distillation_holds_the_model_back():
    _, seq, _ = trained(Sequential())
    _, zero, _ = trained(MiB(MibParams(kd_weight=0.0)))
    assert all(seq[k].tobytes() == zero[k].tobytes() for k in seq)
    start, strong, _ = trained(MiB(MibParams(kd_weight=50.0)))
    assert distance(strong, start) < distance(seq, start)


# ------------------------------------------------------------------------------------------ PLOP
def loop_pod(h: torch.Tensor, scales: int) -> torch.Tensor:
    """PLOP's loop over windows, by hand, one image: squared activations pooled per window."""
    parts, a = [], h[0] ** 2
    for s in range(scales):
        n = 2 ** s
        k = h.shape[-1] // n
        for i in range(n):
            for j in range(n):
                w = a[:, i * k:(i + 1) * k, j * k:(j + 1) * k]
                parts += [w.mean(dim=2).flatten(), w.mean(dim=1).flatten()]
    v = torch.cat(parts)
    return v / v.norm()


def test_local_pod_pools_each_window_along_width_and_height_at_every_scale():
    h = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = local_pod(h, 3)
    assert emb.shape == (2, 3 * (8 + 8) * (1 + 2 + 4))  # C·(H+W) values per scale, times 2^s windows a row
    assert torch.allclose(emb.norm(dim=1), torch.ones(2))
    assert torch.allclose(emb[0].sort().values, loop_pod(h[:1], 3).sort().values, atol=1e-6)
    assert local_pod(h, 1).shape == (2, 3 * 16)


def test_pod_is_zero_for_the_same_features_and_positive_after_a_change():
    model = small_model().eval()
    blocks = unet_blocks(model)
    assert blocks == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule", "model.1.submodule.2"]
    assert unet_blocks(build_model(ModelSpec(), 3)) == [
        "model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0", "model.1.submodule.1.submodule.1.submodule",
        "model.1.submodule.1.submodule.2", "model.1.submodule.2"]
    feats = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8)]
    assert pod_loss(feats, [f.clone() for f in feats], 3).item() == pytest.approx(0.0, abs=1e-6)
    moved = [feats[0], feats[1] + 0.5 * torch.randn(2, 8, 8, 8)]
    assert pod_loss(moved, feats, 3).item() > 0.05
    plop, x = PLOP(PlopParams(pod_weight=1.0, pseudo_labels=False)), torch.from_numpy(windows(1).images[:2])
    plop.before_training(model, {}, CFG)  # the hooked blocks of the model and of its received copy
    assert plop.loss_term(model, x, None, model(x)).item() == pytest.approx(0.0, abs=1e-6)
    plop.after_step(model)
    with torch.no_grad():
        model.model[0].conv.unit0.conv.weight.mul_(1.5).add_(0.1)
    assert plop.loss_term(model, x, None, model(x)).item() > 1e-3


def test_plop_pseudo_labels_keep_pixels_below_their_class_median_entropy():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.2, 0.2], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1]]).T.reshape(1, 3, 1, 4)
    tau = entropy_thresholds(probs)
    u = -(probs * probs.log()).sum(1).flatten() / math.log(3)
    assert tau[0].item() == pytest.approx(u[1].item(), rel=1e-5)  # median of class 0's three entropies
    assert tau[1].item() == pytest.approx(u[3].item(), rel=1e-5) and tau[2].item() == pytest.approx(0.001)
    target, accepted = pseudo_labels(probs, tau)
    assert target.flatten().tolist() == [0, 0, 0, 1] and accepted.flatten().tolist() == [True, False, False, False]
    logits = torch.randn(1, 3, 1, 4)
    nu, ce = 0.25, -F.log_softmax(logits, 1)[0, 0, 0, 0].item()
    assert pseudo_label_loss(logits, target, accepted).item() == pytest.approx(nu * ce / 4, rel=1e-5)


class Relabelled(BlindWindow):
    """The same window with other labels on its unlabelled images."""

    def __init__(self, t: int, fill: int):
        super().__init__(t)
        self.labels[~self.labeled] = fill


def test_plop_never_reads_the_labels_of_unlabelled_images_but_uses_the_images():
    def run(fill, pseudo=True):
        model = small_model()
        PLOP(PlopParams(pseudo_labels=pseudo)).local_update(model, lambda t: Relabelled(t, fill), 1, {}, CFG, seed=3)
        return state_to_numpy(model)
    a, b, off = run(0), run(2), run(0, pseudo=False)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != off[k].tobytes() for k in a)


def test_plop_distillation_holds_the_model_back():
    """From a model whose BatchNorm running statistics have left their initial values (the received
    model, in eval mode, is the teacher; at initialisation its features are not the trained one's)."""
    base = small_model()
    Sequential().local_update(base, windows, 1, {}, TrainConfig(steps=30, batch_size=4, lr=0.01), seed=1)
    start = state_to_numpy(base)

    def after(method):
        model = small_model()
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in start.items()})
        method.local_update(model, windows, 2, {}, CFG, seed=7)
        return state_to_numpy(model)
    seq, strong = after(Sequential()), after(PLOP(PlopParams(pod_weight=50.0, pseudo_labels=False)))
    assert distance(strong, start) < distance(seq, start)


# ---------------------------------------------------------------------------------- Riemannian Walk
class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor([1.0])), torch.nn.Parameter(torch.tensor([0.0]))


def test_rwalk_fisher_and_path_score_by_hand():
    model, rw = Two(), RWalk(RwalkParams(strength=2.0, alpha=0.9, eps=1e-8))
    rw.before_training(model, {}, CFG)
    for (ga, na), (gb, nb) in (((2.0, 0.5), (1.0, 0.0)), ((-1.0, 0.6), (1.0, 0.2))):  # (grad, θ after step)
        with torch.no_grad():
            model.a.copy_(torch.tensor([na]))
            model.b.copy_(torch.tensor([nb]))
        model.a.grad, model.b.grad = torch.tensor([ga]), torch.tensor([gb])
        rw.after_step(model)
    # a: F1 = .9·4 = 3.6, s1 = −2·(−.5)/(½·3.6·.25) = 2.2222; F2 = .9·1 + .1·3.6 = 1.26, s2 = .1/(½·1.26·.01) = 15.873
    assert rw._fisher["a"].item() == pytest.approx(1.26, rel=1e-6)
    assert rw._score["a"].item() == pytest.approx(1 / 0.45 + 0.1 / 0.0063, rel=1e-5)
    # b: step 1 did not move (score 0); step 2 moved +.2 against a positive gradient: clipped to 0
    assert rw._fisher["b"].item() == pytest.approx(0.9 + 0.1 * 0.9) and rw._score["b"].item() == 0.0
    state = rw.after_round(model, None, None, [1], {}, CFG, 0)
    assert state["score.a"][0] == pytest.approx(1.0) and state["score.b"][0] == 0.0  # normalised by the max
    assert state["anchor.a"][0] == pytest.approx(0.6)
    rw.before_training(model, state, CFG)
    with torch.no_grad():
        model.a.add_(0.1)
    fisher_a = 1.26 / 1.26  # F normalised by its max, plus s; b is at its anchor
    assert rw.loss_term(model, None, None, None).item() == pytest.approx(2.0 * (fisher_a + 1.0) * 0.1 ** 2, rel=1e-5)
    second = rw.after_round(model, None, None, [2], state, CFG, 0)  # no steps: s <- (s + 0)/2, F carries on
    assert second["score.a"][0] == pytest.approx(0.5) and second["fisher.a"][0] == pytest.approx(1.26)


def test_rwalk_sees_every_steps_gradient_and_holds_the_model_back():
    _, _, state = trained(RWalk(), rounds=(1,))
    assert sum(float(v.sum()) for k, v in state.items() if k.startswith("score.")) > 0
    assert max(float(v.max()) for k, v in state.items() if k.startswith("fisher.")) > 0
    start, seq, _ = trained(Sequential(), rounds=(1, 2))
    start_rw, strong, _ = trained(RWalk(RwalkParams(strength=1e3)), rounds=(1, 2))
    assert distance(strong, start_rw) < distance(seq, start)


# ----------------------------------------------------------------------------------- through Flower
@pytest.mark.flower
def test_mib_plop_rwalk_run_end_to_end_through_flower(tmp_path):
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY.format(cache=tmp_path / "cache"))
    out = tmp_path / "run"
    arms = ("arms=[{name: mib, set: {continual.method: mib}}, {name: plop, set: {continual.method: plop}}, "
            "{name: rwalk, set: {continual.method: rwalk}}]")
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--no-report", "--set", "federation.rounds=3",
                 "--set", arms]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = read_rows(out)
    for arm in ("mib", "plop", "rwalk"):
        assert summary["arms"][arm]["method"] == arm
        assert summary["arms"][arm]["failed_updates"] == 0 and summary["arms"][arm]["skipped_rounds"] == 0
        assert {r["round"] for r in rows if r["arm"] == arm and r["metric"] == "train_loss"} == {1, 2, 3}
