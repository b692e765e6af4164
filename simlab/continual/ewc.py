"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) with a diagonal Fisher, kept by each hospital,
consolidated online across rounds (Schwarz et al. 2018, "Progress & compress").

The penalty added to the local loss is the paper's (its Eq. 3):

    L(θ) = L_seg(θ) + Σ_i (λ/2) · F_i · (θ_i − θ*_i)²

with F the diagonal of the Fisher information at the anchor θ*. The Fisher is estimated from
**per-sample** gradients of the log-likelihood over the N labelled images of the window the hospital
has just trained on:

    F_i = (1/N) · Σ_n ( ∂ log p(y_n | x_n, θ) / ∂θ_i )²    at θ = θ*,

    log p(y_n | x_n, θ) = (1/P) · Σ_p log softmax(z_n(θ))[y_np]     (P pixels of image n)

Choices, and where they deviate:

- A sample is an **image**, and its log-likelihood is the mean over its pixels of the pixel's
  log-probability of the true class. The mean (not the sum) keeps F, and so the scale of λ,
  independent of the image size; with the sum, F would grow with P².
- The **empirical** Fisher: gradients at the true labels y_n of the window, not at labels sampled from
  the model's own prediction (the paper's Fisher is an expectation over the model's predictive
  distribution). The true labels are there (only labelled images are used), one backward pass per
  image suffices and the estimate is deterministic (Lifelong-nnU-Net's EWC also uses the true labels).
- The likelihood is the cross-entropy part of the training loss only: the Dice term is not a
  log-likelihood.
- BatchNorm is in eval mode while the Fisher is computed (the trained model's running statistics,
  so each image's gradient does not depend on the others in its batch).

A hospital **without labels** (``label_fraction: 0``, training through an unlabelled-data objective)
has no labelled image to take the empirical Fisher on. Its window's Fisher is the paper's own
expectation over the model's predictive distribution, estimated with one sample: each pixel's label
is drawn from the trained model's softmax (BatchNorm in eval mode, seeded per hospital and round),
on the window's unlabelled images, and F_window is computed at those labels as above. No label of
an unlabelled image is read. A hospital with labels keeps the empirical Fisher in every round (its
windows always hold at least one labelled image), so one hospital never mixes the two estimators.

Not the square of the gradient of a *mini-batch mean* loss: that is the square of a mean,
(1/N Σ_n g_n)², not the mean of squares, (1/N) Σ_n g_n²; it depends on the batch size, and with the
Dice term in the loss it is not a log-likelihood at all. A λ tuned on it does not carry over.

Consolidation in a task-agnostic stream: nobody says when a stage ends, so every round is treated as
a "task". After each round the hospital computes F_window on the window it trained on, decays the
running Fisher and adds the new one, F ← γ·F + F_window (γ = ``decay``), and sets the anchor θ* to its
local model after training. On a stationary stream F tends to F_window / (1 − γ), so the effective
strength there is about λ / (1 − γ) times one window's Fisher. (F, θ*) stay at the hospital and are
never sent.

λ: the ODEx paper takes its baselines' hyperparameters from their code bases. Lifelong-nnU-Net's EWC
(MECLabTUDA/Lifelong-nnUNet, ``nnUNetTrainerEWC``) defaults to ``ewc_lambda = 0.4``, with the penalty
λ·Σ F (θ − θ*)² (no ½) summed over past tasks and F the squared gradient of one mini-batch's
Dice+CE loss, taken once a task's training ends. Neither that Fisher's scale nor its number of consolidations
carries over to a per-image Fisher consolidated every round, so the default here, λ = 1e5, comes from
a sweep on this Fisher (docs/results.md, "EWC: Fisher and λ"): below 1e3 the penalty has no effect,
at 1e5 the old domain is kept (BWT ≈ 0) at the cost of plasticity (the paper's behaviour), at 1e6
the model is rigid even within the first stage. λ depends on the model, the window size and the
local steps; sweep it again for a very different scenario.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from simlab.continual.method import Method
from simlab.continual.training import TrainConfig
from simlab.seeding import derive_seed


@dataclass(frozen=True)
class EwcParams:
    """Online EWC with a diagonal per-sample Fisher, kept by each hospital (never shared)."""

    strength: float = field(default=1.0e5, metadata={
        "ge": 0.0, "le": 1.0e9, "why": "three orders of magnitude past λ = 1e6, where the penalty already holds the "
                                       "model at its anchor (docs/results.md, the EWC sweep)",
        "help": "λ of the penalty (λ/2)·Σ F_i (θ_i − θ*_i)²"})
    decay: float = field(default=0.9, metadata={"ge": 0.0, "le": 1.0,
                                                "help": "online EWC: F <- decay*F + F_window after each round"})


class EWC(Method):
    name = "ewc"
    help = "online EWC (per-image empirical Fisher)"
    family = "regularisation"
    Params = EwcParams
    keeps_state = True

    def __init__(self, params: EwcParams | None = None):
        super().__init__(params or EwcParams())
        self._fisher: dict[str, torch.Tensor] | None = None
        self._anchor: dict[str, torch.Tensor] = {}
        self._unlabelled: np.ndarray | None = None

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

    def training_set(self, windows, t, state, seed, last_round):
        images, labels, rounds = super().training_set(windows, t, state, seed, last_round)
        # no labelled image: keep the unlabelled ones (images only) for the sampled-label Fisher
        self._unlabelled = self.unlabelled_set(windows, t, rounds, seed, last_round) if len(images) == 0 else None
        return images, labels, rounds

    def after_round(self, model, images, labels, rounds, state, cfg, seed):
        if len(images) == 0 and self._unlabelled is not None:
            images, labels = self._unlabelled, sampled_labels(model, self._unlabelled, cfg, seed)
        self._unlabelled = None
        new = fisher_diagonal(model, images, labels, cfg)
        params = dict(model.named_parameters())
        out = {}
        for n in new:
            old = state.get(f"fisher.{n}")
            out[f"fisher.{n}"] = (self.params.decay * old if old is not None else 0.0) + new[n]
            out[f"anchor.{n}"] = params[n].detach().cpu().numpy().copy()
        return out


def image_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y | x) of each image: the mean over its pixels of log softmax(logits)[true class].
    ``logits`` [n, C, H, W], ``labels`` [n, H, W] (integers); returns [n]."""
    logp = torch.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1))
    return logp.flatten(1).mean(dim=1)


@torch.no_grad()
def sampled_labels(model: torch.nn.Module, images: np.ndarray, cfg: TrainConfig, seed: int, chunk: int = 16
                   ) -> np.ndarray:
    """One label per pixel drawn from the model's softmax (eval mode; the model is left as found):
    y_np ~ Categorical(softmax(z_n(θ))_p), for the Fisher of a window without labels."""
    device, gen = torch.device(cfg.device), torch.Generator().manual_seed(derive_seed(seed, "ewc", "fisher labels"))
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).to(device)
            probs = torch.softmax(model(x), dim=1).movedim(1, -1).cpu()  # [n, H, W, C]
            flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen)
            out.append(flat.reshape(probs.shape[:-1]).numpy().astype(np.uint8))
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, *images.shape[2:]), np.uint8)


def fisher_diagonal(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig,
                    chunk: int = 8) -> dict[str, np.ndarray]:
    """F_i = (1/N) Σ_n (∂ log p(y_n | x_n, θ) / ∂θ_i)² over the N images, per trainable parameter.

    Per-image gradients with torch.func (vmap of grad, ``chunk`` images at a time), BatchNorm in eval
    mode; the model is left as it was found (mode and weights)."""
    device = torch.device(cfg.device)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loglik(p, x, y):
        logits = functional_call(model, {**buffers, **p}, (x.unsqueeze(0),))
        return image_log_likelihood(logits, y.unsqueeze(0))[0]

    per_image = vmap(grad(loglik), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).to(device)
            y = torch.from_numpy(np.ascontiguousarray(labels[start:start + chunk]).astype(np.int64)).to(device)
            for n, g in per_image(params, x, y).items():
                acc[n] += (g ** 2).sum(dim=0)
    finally:
        model.train(was_training)
    return {n: (a / max(1, len(images))).cpu().numpy() for n, a in acc.items()}
