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
    keeps_state = False  # whether LocalResult.state carries anything to the next round

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
    keeps_state = True

    def rounds_to_train_on(self, t: int, state: dict[str, np.ndarray]) -> list[int]:
        seen = [int(r) for r in state.get("seen_rounds", np.zeros(0, np.int64))]
        return seen + [t]

    def next_state(self, rounds: list[int]) -> dict[str, np.ndarray]:
        return {"seen_rounds": np.asarray(rounds, dtype=np.int64)}


class EWC(Sequential):
    """Online EWC (Schwarz et al. 2018) with a diagonal Fisher, per hospital.

    After each round the hospital estimates the diagonal Fisher of its trained local model on its
    window (squared gradients of the loss, averaged over a few batches), decays the running Fisher and
    adds the new one; the anchor is the local model after training. The next round's local loss adds
    (strength/2)·Σ F·(θ − θ*)². Task-agnostic: no boundary is needed. State stays at the hospital.
    """

    name = "ewc"
    keeps_state = True

    def __init__(self, strength: float = 100.0, decay: float = 0.9, fisher_batches: int = 4):
        self.strength, self.decay, self.fisher_batches = strength, decay, fisher_batches

    def local_update(self, model, stream, t, state, cfg, seed, augment=None) -> LocalResult:
        w = stream.window(t)
        x, y = w.images[w.labeled], w.labels[w.labeled]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        penalty = None
        if state:
            device = torch.device(cfg.device)
            fisher = {n: torch.from_numpy(state[f"fisher.{n}"]).to(device) for n in names}
            anchor = {n: torch.from_numpy(state[f"anchor.{n}"]).to(device) for n in names}

            def penalty(m):
                return 0.5 * self.strength * sum((fisher[n] * (p - anchor[n]) ** 2).sum()
                                                 for n, p in m.named_parameters() if n in fisher)

        metrics = train_local(model, x, y, cfg, seed, augment=augment, penalty=penalty)
        new = fisher_diagonal(model, x, y, cfg, seed, self.fisher_batches)
        out = {}
        for n in names:
            old = state.get(f"fisher.{n}")
            out[f"fisher.{n}"] = (self.decay * old if old is not None else 0.0) + new[n]
            out[f"anchor.{n}"] = dict(model.named_parameters())[n].detach().cpu().numpy().copy()
        return LocalResult(metrics, out)


def fisher_diagonal(model, images, labels, cfg: TrainConfig, seed: int, batches: int) -> dict[str, np.ndarray]:
    """Mean squared gradient of the training loss over ``batches`` batches (empirical Fisher)."""
    from simlab.models.unet import build_loss

    device = torch.device(cfg.device)
    loss_fn = build_loss()
    gen = torch.Generator().manual_seed(seed + 1)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()  # BatchNorm statistics of the trained model, not of the Fisher batches
    for _ in range(batches):
        idx = torch.randperm(len(images), generator=gen)[: cfg.batch_size]
        x = torch.from_numpy(images[idx.numpy()]).to(device)
        y = torch.from_numpy(labels[idx.numpy()]).long().unsqueeze(1).to(device)
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        for n, p in params.items():
            acc[n] += p.grad.detach() ** 2 / batches
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: a.cpu().numpy() for n, a in acc.items()}


METHODS = {"sequential": Sequential, "joint": Joint, "ewc": EWC}


def make_method(spec):
    """The hospital-side method of a ContinualSpec (ODEx trains like sequential on its member)."""
    if spec.method == "ewc":
        return EWC(spec.ewc.strength, spec.ewc.decay, spec.ewc.fisher_batches)
    if spec.method in ("sequential", "odex"):
        return Sequential()
    if spec.method == "joint":
        return Joint()
    raise ValueError(f"unknown continual method {spec.method!r}")
