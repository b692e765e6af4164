"""Online EWC (Schwarz et al. 2018, "Progress & compress") with a diagonal Fisher, per hospital.

After each round the hospital estimates the diagonal Fisher of its trained local model on its window
(squared gradients of the loss, averaged over a few batches: the empirical Fisher of the mini-batch
mean loss), decays the running Fisher and adds the new one: F ← γ·F + F_window. The anchor θ* is the
local model after training. The next round's local loss adds

    (λ/2) · Σ_i F_i · (θ_i − θ*_i)²

Task-agnostic: no boundary is needed. The state (F, θ*) stays at the hospital and is never sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from simlab.continual.method import Method
from simlab.continual.training import TrainConfig
from simlab.models.unet import build_loss


@dataclass(frozen=True)
class EwcParams:
    """Online EWC with a diagonal Fisher, kept by each hospital (never shared)."""

    strength: float = field(default=100.0, metadata={"ge": 0.0, "help": "lambda of the quadratic penalty"})
    decay: float = field(default=0.9, metadata={"ge": 0.0, "le": 1.0,
                                                "help": "online EWC: F <- decay*F + F_window after each round"})
    fisher_batches: int = field(default=4, metadata={"ge": 1, "help": "batches used to estimate the Fisher"})


class EWC(Method):
    name = "ewc"
    help = "online EWC"
    family = "regularisation"
    Params = EwcParams
    keeps_state = True

    def __init__(self, params: EwcParams | None = None):
        super().__init__(params or EwcParams())
        self._fisher: dict[str, torch.Tensor] | None = None
        self._anchor: dict[str, torch.Tensor] = {}

    def before_training(self, model, state, cfg):
        self._fisher = None
        if state:
            device = torch.device(cfg.device)
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            self._fisher = {n: torch.from_numpy(state[f"fisher.{n}"]).to(device) for n in names}
            self._anchor = {n: torch.from_numpy(state[f"anchor.{n}"]).to(device) for n in names}

    def loss_term(self, model, x, y, logits):
        if self._fisher is None:
            return None
        fisher, anchor = self._fisher, self._anchor
        return 0.5 * self.params.strength * sum((fisher[n] * (p - anchor[n]) ** 2).sum()
                                                for n, p in model.named_parameters() if n in fisher)

    def after_round(self, model, images, labels, rounds, state, cfg, seed):
        new = fisher_diagonal(model, images, labels, cfg, seed, self.params.fisher_batches)
        params = dict(model.named_parameters())
        out = {}
        for n in new:
            old = state.get(f"fisher.{n}")
            out[f"fisher.{n}"] = (self.params.decay * old if old is not None else 0.0) + new[n]
            out[f"anchor.{n}"] = params[n].detach().cpu().numpy().copy()
        return out


def fisher_diagonal(model, images, labels, cfg: TrainConfig, seed: int, batches: int) -> dict[str, np.ndarray]:
    """Mean squared gradient of the training loss over ``batches`` batches (empirical Fisher)."""
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
