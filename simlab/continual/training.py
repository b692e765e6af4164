"""Local training: a few optimiser steps of the U-Net on a hospital's images (no Flower here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, dataclass, field

import numpy as np
import torch

from simlab.models.unet import build_loss


MAX_LOSS_WEIGHT = 1e4
LOSS_WEIGHT_WHY = "the segmentation loss has weight 1: a term 10,000 times heavier leaves nothing of the task to learn"


def loss_weight(default: float, help: str) -> Field:
    """The field of a loss term's weight (a method's penalty or distillation, an unlabelled-data objective,
    FedProx's μ): ≥ 0 and at most :data:`MAX_LOSS_WEIGHT`, with the reason in the error."""
    return field(default=default, metadata={"ge": 0.0, "le": MAX_LOSS_WEIGHT, "why": LOSS_WEIGHT_WHY, "help": help})


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    epochs: int | None = None  # when set: full passes over the data instead of `steps`
    flip: bool = False
    device: str = "cpu"
    episodic: bool = False  # FedDG episodic step (needs an augmentation); meta step size = lr
    proximal_mu: float = 0.0  # FedProx: (mu/2)·‖w − w_t‖² added to every batch's loss (0: off)


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is 'cuda' but torch sees no CUDA device")
    return choice


def _batches(n: int, cfg: TrainConfig, gen: torch.Generator):
    """Index batches: `steps` batches (reshuffling after each pass) or `epochs` full passes."""
    if cfg.epochs is not None:
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            yield from (perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
        return
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(cfg.steps):
        if pos + min(cfg.batch_size, n) > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size


def _episodic_loss(model, loss_fn, x, x_aug, y, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_inner + L_outer, the raw batch, the inner logits)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(x)
    inner = loss_fn(logits, y)
    grads = torch.autograd.grad(inner, params, retain_graph=True)
    fast = {n: p - beta * g.detach().clamp(-100, 100) for n, p, g in zip(names, params, grads)}
    outer = loss_fn(torch.func.functional_call(model, fast, (x_aug,)), y)
    return inner + outer, x, logits


def proximal_anchor(params: list[torch.nn.Parameter], mu: float) -> list[torch.Tensor] | None:
    """FedProx's w_t: a detached copy of the trainable parameters as they are before the first local
    step (the model received this round, as Flower's FedProx copies the network after loading the
    global weights and before training); None when mu = 0, so that nothing changes."""
    return [p.detach().clone() for p in params] if mu > 0.0 else None


def proximal_term(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020, "Federated optimization in heterogeneous networks", eq. 2): the local
    objective is h_k(w; w_t) = F_k(w) + (mu/2)·‖w − w_t‖², the squared norm over every trainable
    parameter. (The example in Flower's ``FedProx`` docstring adds the unsquared norm; the paper and
    Flower's FedProx baseline square it, and so does this.)"""
    return (mu / 2.0) * sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchor))


def train_local(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hooks=None,
    unlabelled=None,
) -> dict[str, float]:
    """Train ``model`` in place; returns mean loss and counts. Deterministic for a given seed.

    ``augment`` maps a batch of images to a batch of (partly) augmented images. With
    ``cfg.episodic`` each step is FedDG's episodic (meta) step, first-order as in the released code:
    an inner loss on the raw batch gives fast weights θ' = θ − β∇L_inner (β = lr, gradient detached),
    an outer loss on the augmented batch is taken with θ', and θ is updated on L_inner + L_outer.

    ``hooks`` (a :class:`simlab.continual.method.Method`): ``hooks.loss_term(model, x, y, logits)`` is
    added to each batch's loss (x as the network saw it, logits its output; for the episodic step,
    the inner pass on the raw batch), and ``hooks.after_step(model)`` runs after each step. FedProx's
    :func:`proximal_term` (``cfg.proximal_mu`` > 0) is anchored to ``model`` as passed in (as received).

    ``unlabelled`` (a begun :class:`simlab.continual.unlabelled.UnlabelledObjective`, or None): each step
    adds its term on ``batch_size`` unlabelled images it draws; with no labelled image at all the steps
    run over the unlabelled images, without segmentation loss, flip or episodic step
    (:func:`_unlabelled_loss`). Its ``after_step`` runs after the method's.
    """
    if cfg.episodic and augment is None:
        raise ValueError("the episodic step needs an augmentation (augmentation.frequency.enabled)")
    u = unlabelled if unlabelled is not None and unlabelled.count else None
    if len(images) == 0 and u is None:
        raise ValueError("no labelled images to train on, and no unlabelled-data objective with images")
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    loss_fn = build_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    anchor = proximal_anchor(params, cfg.proximal_mu)
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(np.ascontiguousarray(labels)).long().unsqueeze(1)
    losses = []
    for idx in _batches(len(x_all) if len(x_all) else u.count, cfg, gen):
        opt.zero_grad(set_to_none=True)
        if len(x_all):
            loss = _labelled_loss(model, loss_fn, x_all[idx].to(device), y_all[idx].to(device), cfg, gen, augment, hooks)
            loss = loss if u is None else loss + u.term(model, u.batch(size=cfg.batch_size)).loss
        else:
            loss = _unlabelled_loss(model, u, idx, hooks)
        if anchor is not None:
            loss = loss + proximal_term(params, anchor, cfg.proximal_mu)
        loss.backward()
        opt.step()
        for hook in (h for h in (hooks, u) if h is not None):
            hook.after_step(model)
        losses.append(float(loss.detach()))
    return {"train_loss": float(np.mean(losses)), "steps": float(len(losses)), "num_examples": float(len(images)),
            "num_unlabelled": float(u.count if u is not None else 0)}


def _unlabelled_loss(model, u, idx: torch.Tensor, hooks) -> torch.Tensor:
    """A step without labelled images: the objective's term on the unlabelled images ``idx``, plus the
    method's ``loss_term`` on that batch as the student saw it, with ``y = None``."""
    term = u.term(model, u.batch(index=idx))
    extra = hooks.loss_term(model, term.seen, None, term.logits) if hooks is not None else None
    return term.loss if extra is None else term.loss + extra


def _labelled_loss(model, loss_fn, x, y, cfg: TrainConfig, gen: torch.Generator, augment, hooks) -> torch.Tensor:
    """One labelled batch's loss: the segmentation loss (episodic or plain, augmented or not, flipped
    with ``cfg.flip``) plus the method's ``loss_term``."""
    if cfg.flip:
        flip = torch.rand(len(x), generator=gen) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
    if cfg.episodic:
        loss, seen, logits = _episodic_loss(model, loss_fn, x, augment(x), y, cfg.lr)
    else:
        seen = augment(x) if augment is not None else x
        logits = model(seen)
        loss = loss_fn(logits, y)
    extra = hooks.loss_term(model, seen, y, logits) if hooks is not None else None
    return loss if extra is None else loss + extra
