"""Confidence-thresholded pseudo-labels (Lee 2013, "Pseudo-Label"; FixMatch, Sohn et al. 2020), per pixel.

A labeller predicts each unlabelled image; where its softmax is confident, its argmax becomes the
pixel's label and the model being trained is fitted to it by cross-entropy on a perturbed view.
FixMatch's unlabelled loss (their Eq. 4), with q_b the labeller's prediction on the weak view and
A(u_b) the strong view:

    ℓ_u = (1 / μB) Σ_b 1(max(q_b) ≥ τ) · H(argmax(q_b), p_m(y | A(u_b)))

and, per pixel, the slides' self-training loss (Desrosiers, DLMI 2024, "Adversarial model for
self-training", with the discriminator's confidence replaced by the softmax's):

    L_semi = − Σ_{h,w} Σ_c 1(conf^{(h,w)} ≥ τ) · Ŷ^{(h,w,c)} log S(X)^{(h,w,c)},   Ŷ^{(h,w,c*)} = 1 for c* = argmax_c

Here: the weak view is the raw image (no geometric augmentation exists to be weak), the strong view
is the objective's perturbation (:class:`~simlab.continual.unlabelled.Perturbation`), and the loss
is the mean over **every** pixel of the batch (FixMatch's 1/(μB) normalisation, with μ = 1 and pixels
as samples): pixels below the threshold count as zero, so the loss shrinks when few pixels are
confident instead of being renormalised by their number. Total: L_seg + w · ℓ_u.

The labeller (``labeller``): ``current``, the model being trained, without gradient (Lee 2013 and
FixMatch), its BatchNorm in training mode as in FixMatch's joint forward pass; or ``received``, a
frozen copy of the model the hospital received this round in evaluation mode (the choice PLOP makes
for its pseudo-labels, :mod:`simlab.continual.plop`).

Defaults are FixMatch's: τ = 0.95, w = λ_u = 1, no ramp-up (the threshold keeps early, unconfident
predictions out; Lee 2013 ramps α(t) from 0 to 3 instead).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from simlab.continual.training import loss_weight
from simlab.continual.unlabelled import Term, UnlabelledObjective


@dataclass(frozen=True)
class PseudoLabelParams:
    threshold: float = field(default=0.95, metadata={
        "gt": 0.0, "le": 1.0, "help": "τ: a pixel is pseudo-labelled where the labeller's max softmax ≥ τ (FixMatch: 0.95)"})
    weight: float = loss_weight(1.0, "w (FixMatch's λ_u): weight of the pseudo-label loss")
    rampup: float = field(default=0.0, metadata={
        "ge": 0.0, "le": 1.0, "help": "share of federation.rounds over which the weight ramps up (0: constant)"})
    labeller: Literal["current", "received"] = field(default="current", metadata={
        "help": "current: the model being trained, without gradient (Lee 2013, FixMatch); received: the model "
                "the hospital received this round, frozen"})


def confident_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, mask of max softmax ≥ τ) per pixel: [B, C, H, W] → [B, H, W] twice."""
    conf, target = probs.max(dim=1)
    return target, conf >= threshold


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1 / (B·H·W)) Σ_pixels mask · CE(logits, target): the mean over every pixel, unconfident ones as 0."""
    return (F.cross_entropy(logits, target, reduction="none") * mask).mean()


class PseudoLabel(UnlabelledObjective):
    name = "pseudo_label"
    help = "pseudo-labels: cross-entropy to the labeller's confident argmax (max softmax ≥ τ) on perturbed images"
    Params = PseudoLabelParams

    def start(self, model):
        self.labeller = None
        if self.params.labeller == "received":
            self.labeller = copy.deepcopy(model).eval()
            for p in self.labeller.parameters():
                p.requires_grad_(False)

    def term(self, model, x):
        seen = self.perturb(x)
        logits = model(seen)  # first: a method capturing features (PLOP) sees the student's pass
        with torch.no_grad():
            probs = F.softmax((self.labeller or model)(x), dim=1)
        target, mask = confident_labels(probs, self.params.threshold)
        return Term(self.weight * masked_cross_entropy(logits, target, mask), seen, logits)

    def stop(self):
        self.labeller = None
