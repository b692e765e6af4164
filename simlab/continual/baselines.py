"""Continual baselines. Each method sees only its hospital's stream and never the true domain.

- ``sequential``: fine-tune the current global model on this round's window only (no data kept;
  forgets when the distribution moves).
- ``joint``: train on *every* window this hospital has trained on so far. This is the UPPER BOUND: it
  breaks the no-rehearsal (privacy) rule on purpose and is labelled as such wherever it is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simlab.continual.training import TrainConfig, train_local
from simlab.data.streams import HospitalStream


@dataclass
class LocalResult:
    metrics: dict[str, float]
    state: dict[str, np.ndarray]  # hospital-private state carried to the next round (never shared)


class Sequential:
    name = "sequential"
    breaks_no_rehearsal = False

    def rounds_to_train_on(self, t: int, state: dict[str, np.ndarray]) -> list[int]:
        return [t]

    def local_update(self, model: torch.nn.Module, stream: HospitalStream, t: int,
                     state: dict[str, np.ndarray], cfg: TrainConfig, seed: int, augment=None) -> LocalResult:
        rounds = self.rounds_to_train_on(t, state)
        xs, ys = [], []
        for r in rounds:
            w = stream.window(r)
            xs.append(w.images[w.labeled])
            ys.append(w.labels[w.labeled])
        metrics = train_local(model, np.concatenate(xs), np.concatenate(ys), cfg, seed, augment=augment)
        return LocalResult(metrics, self.next_state(rounds))

    def next_state(self, rounds: list[int]) -> dict[str, np.ndarray]:
        return {}


class Joint(Sequential):
    name = "joint"
    breaks_no_rehearsal = True

    def rounds_to_train_on(self, t: int, state: dict[str, np.ndarray]) -> list[int]:
        seen = [int(r) for r in state.get("seen_rounds", np.zeros(0, np.int64))]
        return seen + [t]

    def next_state(self, rounds: list[int]) -> dict[str, np.ndarray]:
        return {"seen_rounds": np.asarray(rounds, dtype=np.int64)}


METHODS = {"sequential": Sequential, "joint": Joint}


def make_method(name: str):
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown continual method {name!r} (known: {', '.join(METHODS)})") from None
