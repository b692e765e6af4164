"""The test-time adaptation plug-in: what a hospital does with the deployed model and one test set's
images before (or while) it predicts them. No Flower here; :mod:`simlab.adaptation.registry` lists
the adaptations and contributes their parameters to the scenario schema (``evaluation.<name>``).

An adaptation is one class. It declares

- ``name`` (the scenario's ``evaluation.adaptation``) and ``help``;
- ``Params``: a frozen dataclass of its hyperparameters (scenario section ``evaluation.<name>``), or None;
- ``needs_bank``: whether it reads the FedDG amplitude bank (``augmentation.frequency``: the
  low-frequency amplitude blocks the hospitals share). The server then collects the bank even when
  the augmentation is off and sends it with every evaluate message;
- ``reads_source``: whether it reads labelled images of the evaluating hospital's own training
  window (a *source* domain of the federation; never the test set's labels);

and implements :meth:`Adaptation.predict`, and :meth:`Adaptation.scenario_problems` when some
settings cannot work with it (validation, before anything runs).

Rules every adaptation keeps (``tests/test_adaptation.py`` checks every registered one):

- it never sees a test label: :meth:`predict` gets the test images only;
- it never changes the model it is given: it adapts a copy, so every test set (every domain)
  starts from the deployed model and nothing carries over from one test set to the next;
- given the same context (its ``seed``) it gives the same predictions, bit for bit on CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from simlab.metrics.segmentation import predict

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class AdaptationContext:
    """What a hospital gives an adaptation besides the model and the test images.

    ``seed`` derives from the scenario seed, the test domain and the round; ``bank`` maps hospital
    id → ``[n, C, 2b+1, 2b+1]`` amplitude blocks (only for adaptations with ``needs_bank``);
    ``source`` returns ``(images, labels)`` of the labelled images of the evaluating hospital's own
    window (only called by adaptations with ``reads_source``; unlabelled images are not in it)."""

    batch_size: int
    device: str
    seed: int
    bank: Mapping[str, np.ndarray] | None = None
    source: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None


@dataclass
class Adapted:
    """The adapted predictions of one test set (label maps, int64 ``[N, H, W]`` on the CPU) and the
    model that made them: the deployed model itself when the adaptation changes no weight or
    statistic, else the adapted copy."""

    pred: torch.Tensor
    model: nn.Module


class Adaptation:
    name: ClassVar[str]
    help: ClassVar[str] = ""
    Params: ClassVar[type | None] = None
    needs_bank: ClassVar[bool] = False
    reads_source: ClassVar[bool] = False

    def __init__(self, params=None):
        self.params = params

    @classmethod
    def scenario_problems(cls, scenario) -> Problems:
        """(dotted key, message) pairs for settings of ``scenario`` this adaptation cannot work with."""
        return []

    def predict(self, model: nn.Module, images: np.ndarray, ctx: AdaptationContext) -> Adapted:
        """Label maps of ``images`` ``[N, C, H, W]`` after adapting (a copy of) ``model``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ helpers
def frozen_copy(model: nn.Module, device: str) -> nn.Module:
    """A copy of ``model`` on ``device`` in eval mode with every gradient off; the original is untouched."""
    out = copy.deepcopy(model).to(device).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).float()


def plain_predict(model: nn.Module, images: np.ndarray, ctx: AdaptationContext) -> torch.Tensor:
    """Label maps of the model as it is (eval mode, running statistics)."""
    return predict(model, images, ctx.batch_size, ctx.device)


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax prediction at every pixel, ``−Σ_c p_c log p_c`` (``[B, H, W]``)."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)
