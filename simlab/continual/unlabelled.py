"""Unlabelled-data objectives: what local training does with the images of a window that carry no
label, whatever the continual method. No Flower here; :mod:`simlab.continual.semi_supervised` lists
the objectives and assembles their parameters into the scenario section ``federation.semi_supervised``.

An objective composes with every continual method the way FedProx's proximal term does: it is not a
method, it adds a term to the loss of every local step. :meth:`Method.local_update
<simlab.continual.method.Method.local_update>` drives it::

    images_u = method.unlabelled_set(...)        # by default the unlabelled images of the windows
                                                 # the method trains on this round: images, never labels
    objective.begin(model, images_u, t, last_round, cfg, seed)   # the received model: teachers, generators
    for each optimiser step:                     # simlab.continual.training.train_local
        labelled batch present: loss = L_seg + method terms + objective.term(model, a drawn batch).loss
        no labelled image at all: loss = objective.term(model, the step's batch).loss + method terms
        step; method.after_step(model); objective.after_step(model)
    objective.end()

An objective is given image arrays only, never a window: it cannot read a label, nor the window's
true domain.

**Perturbation.** Consistency and FixMatch-style pseudo-labels compare predictions on perturbed
views of an image (:class:`Perturbation`, section ``federation.semi_supervised.perturbation``):

- ``frequency``: FedDG's continuous amplitude mix (:mod:`simlab.augment.frequency`), as the scenario's
  ``augmentation.frequency`` configures it, with the amplitude blocks other hospitals shared (needs
  ``augmentation.frequency.enabled``; draws from its own generator, not the labelled batches');
- ``noise``: x' = (1 + a)·x + b + clip(ε, −2σ, 2σ), ε ~ N(0, σ²) per pixel, a, b ~ U(−s, s) per image
  (σ = ``noise_std``, s = ``intensity``). The clipped Gaussian is the input noise of SSL4MIS's 2D
  mean teacher (σ = 0.1, clipped at ±0.2; images here lie in [0, 1] like theirs); the per-image gain
  and offset are a photometric change of the kind a scanner makes;
- ``auto`` (default): ``frequency`` when the hospital holds other hospitals' amplitude blocks, else
  ``noise``.

Every perturbation is photometric: no pixel moves, so two views are compared pixel by pixel and no
inverse transform T⁻¹ is needed (the slides' transformation consistency ℓ_reg(T(f(x)), f(T(x)))
with T the identity on geometry).

**Weight ramp-up** (:func:`sigmoid_rampup`): w(t) = w_max · exp(−5 (1 − min(t, L)/L)²), the sigmoid
ramp-up of Laine & Aila (2017) that Tarvainen & Valpola (2017) use for the consistency weight, over
L = ``rampup`` × ``federation.rounds`` rounds (a round is the federation's unit of progress; Laine &
Aila ramp over the first 80 of 300 epochs, about a quarter). ``rampup: 0`` is a constant weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch

from simlab.seeding import derive_seed


@dataclass(frozen=True)
class PerturbationParams:
    kind: Literal["auto", "frequency", "noise"] = field(default="auto", metadata={
        "help": "frequency: FedDG's amplitude mix with other hospitals' shared blocks (needs "
                "augmentation.frequency.enabled); noise: Gaussian noise and a per-image gain and offset; "
                "auto: frequency when the hospital holds other hospitals' blocks, else noise"})
    noise_std: float = field(default=0.1, metadata={
        "ge": 0.0, "le": 1.0, "why": "images are scaled to about [0, 1]; more noise than signal perturbs nothing useful",
        "help": "σ of the per-pixel Gaussian noise, clipped at ±2σ (SSL4MIS's mean teacher: 0.1)"})
    intensity: float = field(default=0.1, metadata={
        "ge": 0.0, "lt": 1.0, "help": "s: per-image gain 1 + a and offset b, a, b ~ U(−s, s) (0: none)"})


def sigmoid_rampup(t: int, length: float) -> float:
    """exp(−5 (1 − min(t, L)/L)²), 1 for L = 0 (Laine & Aila 2017; Tarvainen & Valpola 2017)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(float(t), length) / length
    return float(math.exp(-5.0 * phase * phase))


class Perturbation:
    """A random photometric view of a batch (see the module docstring); draws come from ``gen`` (CPU),
    so they do not depend on the device; ``augmenter`` is FedDG's, or None."""

    def __init__(self, params: PerturbationParams, gen: torch.Generator, augmenter=None):
        self.params, self.gen = params, gen
        active = augmenter is not None and augmenter.active
        if params.kind == "frequency" and not active:
            raise ValueError("perturbation 'frequency' needs other hospitals' amplitude blocks "
                             "(augmentation.frequency.enabled)")
        self.augmenter = augmenter if active and params.kind != "noise" else None

    @property
    def kind(self) -> str:
        return "frequency" if self.augmenter is not None else "noise"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.augmenter is not None:
            return self.augmenter(x)
        p, n = self.params, x.shape[0]
        gain = 1.0 + p.intensity * (2.0 * torch.rand(n, 1, 1, 1, generator=self.gen) - 1.0)
        offset = p.intensity * (2.0 * torch.rand(n, 1, 1, 1, generator=self.gen) - 1.0)
        noise = (p.noise_std * torch.randn(x.shape, generator=self.gen)).clamp(-2 * p.noise_std, 2 * p.noise_std)
        return gain.to(x) * x + offset.to(x) + noise.to(x)


@dataclass
class Term:
    """One step's unlabelled term: ``loss`` (weighted), the batch as the student saw it and its logits
    (what a continual method's ``loss_term`` gets in a step without labelled images)."""

    loss: torch.Tensor
    seen: torch.Tensor
    logits: torch.Tensor


class UnlabelledObjective:
    """The plug-in: ``name`` (``federation.semi_supervised.objective``), ``help``, ``Params`` (section
    ``federation.semi_supervised.<name>``; every objective's has ``weight`` and ``rampup``), and
    :meth:`start`, :meth:`term`, optionally :meth:`after_step` and :meth:`stop`."""

    name: ClassVar[str]
    help: ClassVar[str] = ""
    Params: ClassVar[type]

    def __init__(self, params, perturbation: PerturbationParams | None = None, augmenter=None):
        self.params = params
        self.perturbation = perturbation or PerturbationParams()
        self.augmenter = augmenter
        self.images: torch.Tensor | None = None
        self.weight = 0.0

    # ------------------------------------------------------------------ the round (not overridden)
    def begin(self, model: torch.nn.Module, images: np.ndarray, t: int, last_round: int | None, cfg, seed: int
              ) -> None:
        """Hold this round's unlabelled ``images``, seed the draws, set the ramped weight w(t), and
        :meth:`start` with the received model."""
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.device = torch.device(cfg.device)
        self.gen = torch.Generator().manual_seed(derive_seed(seed, "unlabelled", "batches"))
        self.perturb = Perturbation(self.perturbation, torch.Generator().manual_seed(
            derive_seed(seed, "unlabelled", "perturb")), self.augmenter)
        self.weight = self.params.weight * sigmoid_rampup(t, self.params.rampup * (last_round or t))
        self.start(model)

    @property
    def count(self) -> int:
        return 0 if self.images is None else len(self.images)

    def batch(self, index: torch.Tensor | None = None, size: int = 0) -> torch.Tensor:
        """The images at ``index``, or ``size`` drawn at random (a step that also has a labelled batch)."""
        if index is None:
            index = torch.randperm(self.count, generator=self.gen)[:size]
        return self.images[index].to(self.device)

    def end(self) -> None:
        self.stop()
        self.images = None

    # ------------------------------------------------------------------ what an objective defines
    def start(self, model: torch.nn.Module) -> None:
        """Called with the received model before the first step."""

    def term(self, model: torch.nn.Module, x: torch.Tensor) -> Term:
        """The weighted loss on the unlabelled batch ``x`` (raw images; the objective perturbs them)."""
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module) -> None:
        """Called after every optimiser step."""

    def stop(self) -> None:
        """Drop what :meth:`start` kept."""
