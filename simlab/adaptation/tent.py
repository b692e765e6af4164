"""TENT (Wang, Shelhamer, Liu, Olshausen & Darrell, ICLR 2021, "Tent: Fully Test-Time Adaptation by
Entropy Minimization") at a hospital, on one test set.

The paper's test-time objective is the Shannon entropy of the model's prediction,

    H(ŷ) = − Σ_c p(ŷ_c) log p(ŷ_c),

minimised with respect to the channel-wise affine parameters of the normalisation layers only: each
BatchNorm layer normalises with the statistics of the current test batch, x̄ = (x − μ) / σ (μ, σ
estimated on the batch, not the running averages), and transforms x' = γ·x̄ + β; tent updates γ and β
by the gradient of H, every other weight frozen, "online on each batch" (one optimiser step per
batch). For segmentation the entropy is taken per pixel and averaged over the batch's pixels.
Optimiser as in the paper: Adam (lr 1e-3, its CIFAR setting; default) or SGD with momentum 0.9 (its
ImageNet setting uses lr 2.5e-4).

Choices and deviations, stated:

- *State per test set.* The adapted γ, β and the optimiser state start from the deployed model for
  every test set (every domain) and carry over from batch to batch within it (online, as the paper);
  nothing leaks from one domain to the next. ``episodic: true`` resets them before every batch (the
  released code's ``episodic`` option).
- *Prediction.* Each batch is predicted with the parameters after its own update (one extra
  forward per step); the released code returns the outputs of the forward that computed the loss,
  i.e. updated by the earlier batches only (``predict_after_step: false``). Either way the
  prediction normalises with the batch's own statistics, as tent does at test time.
- *Only BatchNorm.* Other normalisation layers have no batch statistics; the U-Net uses BatchNorm
  throughout. Every other module stays in eval mode (no dropout). Running statistics are neither used
  nor updated (``track_running_stats`` off on the copy), so every buffer stays bit-identical.
- *Batches.* ``batch_size`` test images per step (default 16: 65,536 pixels per statistic at
  64² px); the last batch may be smaller. The images are taken in test-set order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from simlab.adaptation.base import Adaptation, Adapted, as_tensor, batches, entropy_map, frozen_copy


@dataclass(frozen=True)
class TentParams:
    optimizer: Literal["adam", "sgd"] = field(default="adam", metadata={
        "help": "adam (the paper's CIFAR setting) or sgd with momentum (its ImageNet setting)"})
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "le": 1.0, "why": "a step this large only diverges",
                                              "help": "learning rate of the affine parameters"})
    momentum: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0, "help": "SGD momentum (sgd only)"})
    batch_size: int = field(default=16, metadata={"ge": 1, "le": 65_536, "why": "one batch is held in memory",
                                                  "help": "test images per step (batch statistics are taken over them)"})
    steps: int = field(default=1, metadata={"ge": 1, "le": 100, "why": "tent takes one step per batch",
                                            "help": "optimiser steps per batch (the paper: 1)"})
    episodic: bool = field(default=False, metadata={"help": "reset the parameters before every batch (default: "
                                                            "online within a test set)"})
    predict_after_step: bool = field(default=True, metadata={
        "help": "predict each batch with the parameters after its own update (false: the outputs of the forward "
                "that computed the loss, as the released code)"})


def configure(model: nn.Module) -> list[nn.Parameter]:
    """Tent's model set-up on a frozen copy: BatchNorm layers in train mode with batch statistics
    (running statistics neither used nor updated), their affine γ, β trainable; the rest frozen, in
    eval mode. Returns the trainable parameters in module order."""
    params = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False  # normalise with the batch's statistics; buffers stay as they are
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    return params


class Tent(Adaptation):
    name = "tent"
    help = ("TENT (Wang et al. 2021): minimise the entropy of the prediction w.r.t. the BatchNorm affine "
            "parameters only, batch statistics, one step per batch, reset per test set")
    Params = TentParams

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        p = self.params
        if p.optimizer == "sgd":
            return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum)
        return torch.optim.Adam(params, lr=p.lr, betas=(0.9, 0.999))

    def predict(self, model, images, ctx) -> Adapted:
        p = self.params
        adapted = frozen_copy(model, ctx.device)
        params = configure(adapted)
        if not params:
            raise ValueError("tent adapts BatchNorm affine parameters, and the model has none")
        start = [q.detach().clone() for q in params]
        opt = self._optimizer(params)
        x_all, preds = as_tensor(images), []
        for sl in batches(len(x_all), p.batch_size):
            if p.episodic:
                with torch.no_grad():
                    for q, q0 in zip(params, start):
                        q.copy_(q0)
                opt = self._optimizer(params)
            x = x_all[sl].to(ctx.device)
            for _ in range(p.steps):
                logits = adapted(x)
                loss = entropy_map(logits).mean()
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError("tent: the entropy of a test batch is not finite")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if p.predict_after_step:
                with torch.no_grad():
                    logits = adapted(x)
            preds.append(logits.detach().argmax(dim=1).cpu())
        for q in params:
            q.requires_grad_(False)
        return Adapted(torch.cat(preds).to(torch.int64), adapted)
