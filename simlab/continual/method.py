"""The continual-method plug-in: what a hospital does with one round's window, and the hooks a
method uses to change it. No Flower here; :mod:`simlab.continual.registry` lists the methods.

A method is one class. It declares

- ``name`` (the scenario's ``continual.method``), ``help`` and ``family`` (how reports group it:
  ``baseline`` (sequential), ``regularisation`` (EWC, RWalk), ``distillation`` (LwF, MiB, PLOP),
  ``expansion`` (ODEx), ``rehearsal`` (the references that revisit old images and break the
  no-rehearsal rule: replay, the static upper bound));
- ``Params``: a frozen dataclass of its hyperparameters (scenario section ``continual.<name>``), or None;
- ``keeps_state``: whether it carries hospital-private state from round to round (saved at the
  hospital, never sent; :meth:`after_round` returns it);
- ``breaks_no_rehearsal``: whether it revisits old images (a reference, never a deployable method);
- ``uses_future_data``: whether it also trains on windows of rounds still to come (the static upper
  bound; implies ``breaks_no_rehearsal``);
- ``server``: which federation runs it — ``"global"`` (one shared model) or ``"pool"`` (a model pool
  with shift detection, ODEx);
- ``with_frequency_augmentation``: whether FedDG's augmentation may be combined with it;

may refuse settings it cannot work with before a run (:meth:`scenario_problems`), and overrides the
hooks it needs. :meth:`local_update` calls them in this order, in the spirit of Avalanche's strategy
plugins::

    images, labels, rounds = training_set(...)    # by default the labelled images of the windows
                                                  # training_rounds(t, state) names (only t, unless rehearsal)
    unlabelled = unlabelled_set(...)              # with an unlabelled-data objective: by default the
                                                  # unlabelled images of those windows (images only)
    before_training(model, state, cfg)            # e.g. keep the received model as a teacher
    for each optimiser step:                      # simlab.continual.training.train_local
        loss = segmentation loss(logits, y) [+ loss_term(model, x, y, logits)] [+ objective's term]
        step; after_step(model)
    state = after_round(model, images, labels, rounds, state, cfg, seed)

A method never reads a window's true domain: it gets images and labels only, and never the label of
an image the window marks unlabelled. The unlabelled-data objective (``federation.semi_supervised``,
:mod:`simlab.continual.unlabelled`) is not part of the method: every method combines with it. A
hospital without labels (``label_fraction: 0``) trains through the objective alone: ``images`` is
then empty, and ``loss_term`` is called with the objective's unlabelled batch and ``y = None``, so a
``loss_term`` must not need ``y`` unless it checks for None.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from simlab.continual.training import TrainConfig, train_local


@dataclass
class LocalResult:
    metrics: dict[str, float]
    state: dict[str, np.ndarray]  # hospital-private state carried to the next round (never shared)


class Method:
    name: ClassVar[str]
    help: ClassVar[str] = ""
    family: ClassVar[str] = "baseline"
    Params: ClassVar[type | None] = None
    keeps_state: ClassVar[bool] = False
    breaks_no_rehearsal: ClassVar[bool] = False
    uses_future_data: ClassVar[bool] = False
    server: ClassVar[str] = "global"
    with_frequency_augmentation: ClassVar[bool] = True

    def __init__(self, params=None):
        self.params = params

    @classmethod
    def scenario_problems(cls, scenario) -> list[tuple[str, str]]:
        """(dotted key, message) pairs for settings of ``scenario`` this method cannot work with, found
        at validation instead of in every round's training."""
        return []

    # ------------------------------------------------------------------ hooks
    def training_rounds(self, t: int, state: dict[str, np.ndarray]) -> list[int]:
        """The rounds whose windows this round trains on (default: this round's only)."""
        return [t]

    def before_training(self, model: torch.nn.Module, state: dict[str, np.ndarray], cfg: TrainConfig) -> None:
        """Called with the received model before the first step."""

    def loss_term(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  logits: torch.Tensor) -> torch.Tensor | None:
        """An extra loss added to the segmentation loss of this batch (None: nothing added). ``x`` is
        the batch as the network saw it (augmented if augmentation is on), ``logits`` its output."""
        return None

    def after_step(self, model: torch.nn.Module) -> None:
        """Called after every optimiser step."""

    def training_set(self, windows, t: int, state: dict[str, np.ndarray], seed: int,
                     last_round: int | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The labelled images and labels round t trains on, and the rounds whose windows they come
        from: by default every labelled image of the windows :meth:`training_rounds` names.
        ``last_round`` is the stream's last round (``federation.rounds``), for a method that uses
        future data; ``seed`` is this hospital's and round's training seed."""
        rounds, xs, ys = self.training_rounds(t, state), [], []
        for r in rounds:
            w = windows(r)
            xs.append(w.images[w.labeled])
            ys.append(w.labels[w.labeled])
        return np.concatenate(xs), np.concatenate(ys), rounds

    def unlabelled_set(self, windows, t: int, rounds: list[int], seed: int, last_round: int | None) -> np.ndarray:
        """The unlabelled images an unlabelled-data objective trains on in round t: by default every
        image the windows of ``rounds`` (what :meth:`training_set` returned) mark unlabelled. Images
        only: their labels are never read."""
        parts = [windows(r).images[~windows(r).labeled] for r in rounds]
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def after_round(self, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, rounds: list[int],
                    state: dict[str, np.ndarray], cfg: TrainConfig, seed: int) -> dict[str, np.ndarray]:
        """The state to carry to the next round (empty unless ``keeps_state``); ``images``/``labels``
        are what this round trained on, ``rounds`` the windows they came from."""
        return {}

    # ------------------------------------------------------------------ the round
    def local_update(self, model: torch.nn.Module, windows, t: int, state: dict[str, np.ndarray],
                     cfg: TrainConfig, seed: int, augment=None, last_round: int | None = None,
                     unlabelled=None) -> LocalResult:
        """Train ``model`` in place on :meth:`training_set` (by default the labelled images of
        ``windows(r)`` for the rounds :meth:`training_rounds` names); ``windows`` maps a round to that
        round's window, ``last_round`` is the stream's last round. ``unlabelled``: an unlabelled-data
        objective (:mod:`simlab.continual.unlabelled`) to train with on :meth:`unlabelled_set`, or None."""
        images, labels, rounds = self.training_set(windows, t, state, seed, last_round)
        if unlabelled is not None:
            unlabelled.begin(model, self.unlabelled_set(windows, t, rounds, seed, last_round), t, last_round, cfg, seed)
        self.before_training(model, state, cfg)
        try:
            metrics = train_local(model, images, labels, cfg, seed, augment=augment, hooks=self, unlabelled=unlabelled)
        finally:
            if unlabelled is not None:
                unlabelled.end()
        return LocalResult(metrics, self.after_round(model, images, labels, rounds, state, cfg, seed))


class DistilsReceivedModel(Method):
    """A method that distils the model the hospital received this round (LwF, MiB, PLOP): a frozen
    copy of it, taken before the first step, is the teacher (``self._teacher``), dropped after the round."""

    def __init__(self, params=None):
        super().__init__(params)
        self._teacher: torch.nn.Module | None = None

    def before_training(self, model, state, cfg):
        self._teacher = copy.deepcopy(model).eval()
        for p in self._teacher.parameters():
            p.requires_grad_(False)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._teacher(x)

    def after_round(self, model, images, labels, rounds, state, cfg, seed):
        self._teacher = None
        return {}
