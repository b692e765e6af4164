"""Riemannian Walk, RWalk (Chaudhry et al., ECCV 2018), kept by each hospital, online across rounds.

RWalk regularises like EWC, with an importance that adds a path integral to the Fisher:

- EWC++ Fisher, a running average of the diagonal empirical Fisher updated at every step t
  (their Eq. 5): F^t = α · F_batch^t + (1 − α) · F^{t−1}, with F_batch^t = g(t)² the squared
  gradient of the step's mini-batch loss;
- path-integral importance (their Eq. 6-7), accumulated over the optimiser steps of a task:
  s_i += −g_i(t) · Δθ_i(t) / (½ · F_i^t · Δθ_i(t)² + ε), Δθ(t) = θ(t+1) − θ(t);
- the objective on a new task (their Eq. 8): L(θ) + λ · Σ_i (F_i + s_i) · (θ_i − θ*_i)², with F, s
  and the anchor θ* taken at the end of the previous task.

Per step (:meth:`RWalk.after_step`, called after every optimiser step, when ``param.grad`` still
holds the gradient the step used: train_local clears gradients only at the start of the next step),
with θ(t) recorded before the step (at :meth:`before_training`, then after each step):
F is updated with g(t)² first, then s uses that F^t (the paper's index t). g(t) is the gradient of
the step's whole loss: with an unlabelled-data objective it includes the objective's term, and at a
hospital without labels it is that term's alone (the empirical Fisher of a loss with no labels).

Choices, and where they deviate:

- "Task" in a task-agnostic stream: every round is a task (as EWC here consolidates online). At the
  end of a round the anchor θ* becomes the local model, the round's score is normalised and
  averaged into the running one, s ← ½ (s + ŝ_round) (the paper averages old and new scores so the
  sum does not grow with the number of tasks; on the first round s = ŝ_round), and F carries on.
  F is EWC++'s single running Fisher, not one per task; it is never reset between rounds.
- Normalisation: F and the round's score are divided by their largest entry over all parameters
  (into [0, 1]) before use, as the MiB and Lifelong-nnU-Net re-implementations (min-max) do so that
  F and s, of very different scales, can be added; the paper's equations do not show it. The
  raw running F is what is kept, so EWC++'s average is unaffected by the normalisation.
- Negative per-step contributions to s (a step that raised the loss along a coordinate, common with
  Adam, whose steps are not along −g) are set to 0, as Lifelong-nnU-Net does; the paper's Eq. has no
  clip, but its importance is meant to be non-negative.
- g is the gradient of the whole loss the step descended (segmentation loss + the penalty), the
  one the optimiser used; the paper's g is that of its task loss, which includes no other term.
- Every step updates F and s (Lifelong-nnU-Net: every 10th step, ``fisher_update_after = 10``; a
  round here has only a few local steps).
- F, s, θ* stay at the hospital (``keeps_state``) and are never sent.

Defaults: α = 0.9 (``rw_alpha``), λ = 0.4 (``rw_lambda``), ε = 1e-8 (``EPSILON``): Lifelong-nnU-Net's
``nnUNetTrainerRW``, which the ODEx paper ran with its suggested hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from simlab.continual.method import Method
from simlab.continual.training import loss_weight


@dataclass(frozen=True)
class RwalkParams:
    strength: float = loss_weight(0.4, "λ of the penalty λ·Σ (F_i + s_i)(θ_i − θ*_i)² (F and s normalised to [0, 1])")
    alpha: float = field(default=0.9, metadata={"gt": 0.0, "le": 1.0,
                                                "help": "EWC++: F <- alpha*g² + (1-alpha)*F after every step"})
    eps: float = field(default=1.0e-8, metadata={
        "gt": 0.0, "le": 1.0, "why": "ε only keeps ½FΔθ² + ε away from zero; at 1 it outweighs ½FΔθ² of any normal "
                                     "step and flattens every score",
        "help": "ε in the score's denominator ½FΔθ² + ε"})


def ewcpp_update(fisher: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
    """EWC++'s running Fisher after one step: α · g² + (1 − α) · F."""
    return alpha * grad ** 2 + (1.0 - alpha) * fisher


def path_score(grad: torch.Tensor, delta: torch.Tensor, fisher: torch.Tensor, eps: float) -> torch.Tensor:
    """One step's contribution to the importance, −g·Δθ / (½ F Δθ² + ε), negatives set to 0."""
    return (-grad * delta / (0.5 * fisher * delta ** 2 + eps)).clamp(min=0.0)


def normalised(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every entry divided by the largest over all parameters (all zeros stay zeros)."""
    top = max((float(v.max()) for v in values.values()), default=0.0)
    return {n: v / top if top > 0 else v for n, v in values.items()}


class RWalk(Method):
    name = "rwalk"
    help = "Riemannian Walk: EWC++ Fisher + path-integral importance, kept by the hospital"
    family = "regularisation"
    Params = RwalkParams
    keeps_state = True

    def __init__(self, params: RwalkParams | None = None):
        super().__init__(params or RwalkParams())
        self._fisher: dict[str, torch.Tensor] = {}    # raw running Fisher, updated every step
        self._score: dict[str, torch.Tensor] = {}     # this round's path integral
        self._before: dict[str, torch.Tensor] = {}    # θ before the coming step
        self._weight: dict[str, torch.Tensor] | None = None  # F + s of the penalty (from the last round)
        self._anchor: dict[str, torch.Tensor] = {}

    def before_training(self, model, state, cfg):
        device = torch.device(cfg.device)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        load = lambda key: torch.from_numpy(state[key]).to(device)  # noqa: E731
        self._fisher = {n: load(f"fisher.{n}") if state else torch.zeros_like(p.detach()) for n, p in params.items()}
        self._score = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
        self._before = {n: p.detach().clone() for n, p in params.items()}
        self._weight, self._anchor = None, {}
        if state:
            fisher = normalised({n: state[f"fisher.{n}"] for n in params})
            self._weight = {n: torch.from_numpy(fisher[n] + state[f"score.{n}"]).to(device) for n in params}
            self._anchor = {n: load(f"anchor.{n}") for n in params}

    def loss_term(self, model, x, y, logits):
        if self._weight is None or self.params.strength == 0.0:
            return None
        w, a = self._weight, self._anchor
        return self.params.strength * sum((w[n] * (p - a[n]) ** 2).sum() for n, p in model.named_parameters() if n in w)

    @torch.no_grad()
    def after_step(self, model):
        for n, p in model.named_parameters():
            if n not in self._fisher or p.grad is None:
                continue
            delta = p.detach() - self._before[n]
            self._fisher[n] = ewcpp_update(self._fisher[n], p.grad, self.params.alpha)
            self._score[n] += path_score(p.grad, delta, self._fisher[n], self.params.eps)
            self._before[n] = p.detach().clone()

    def after_round(self, model, images, labels, rounds, state, cfg, seed):
        params = dict(model.named_parameters())
        score = normalised({n: s.cpu().numpy() for n, s in self._score.items()})
        out = {}
        for n in self._fisher:
            old = state.get(f"score.{n}")
            out[f"fisher.{n}"] = self._fisher[n].cpu().numpy().copy()
            out[f"score.{n}"] = score[n] if old is None else 0.5 * (old + score[n])
            out[f"anchor.{n}"] = params[n].detach().cpu().numpy().copy()
        self._fisher, self._score, self._before, self._weight, self._anchor = {}, {}, {}, None, {}
        return out
