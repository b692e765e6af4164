"""Self-training of early features (Sheikh & Schultz, MIDL 2022, "Unsupervised Domain Adaptation for
Medical Image Segmentation via Self-Training of Early Features") at a hospital, on its unlabelled
test images.

The paper adds an "Early Features Segmentor", a second segmentation head on the U-Net's first
features, and proceeds in two steps (its Sect. 2.2):

1. *Head initialisation on the source domain*: every weight of the base model frozen, the head is
   trained with the source loss (its Eq. 1), with ground-truth masks,
   ``l(x, y)_source = −(1/N_S) Σ_n Σ_c y_{n,c} log p_c(x_n)``.
2. *Refinement on the target domain*: the head's weak prediction p̃ is the student, the network's
   final prediction p the teacher, with the loss (its Eq. 2)
   ``l(x)_target = −(1/N_T) Σ_n Σ_c p_c(x_n) log p̃_c(x_n)``,
   "only [updating] the weights of the early convolutional blocks that are shared between the two
   branches, freezing the weights in the early segmentation head itself"; p is a target (no gradient
   reaches the rest of the U-Net) but changes as the early layers change. The refinement stops when
   the Dice between the early and the final segmentations changes by less than 0.005 from one epoch
   to the next; the paper needed "up to five epochs" (Adam, lr 1e-3, its optimiser).

Here, stated:

- *Where the head sits.* MONAI's U-Net downsamples in its first block, so there are no
  full-resolution features "before the first downsampling"; the head reads the output of the first
  encoder block (``model.model[0]``, half resolution) and its logits are upsampled bilinearly to the
  image size, as the paper resolves the same mismatch for its deeper heads (its Appendix C). The
  refined weights are exactly that block's (convolutions and its BatchNorm's γ, β); its running
  statistics are kept (eval mode throughout), so no other parameter or buffer changes.
- *The head*: 3×3 convolution (C₀ → C₀), PReLU, 1×1 convolution (C₀ → classes), initialised from
  the context's seed. The paper's figure shows a small convolutional head without its exact layers.
- *Source data for step 1*: the labelled images of the evaluating hospital's own window of the
  evaluated round (round 1's for round 0's evaluation): in a federation the hospitals are the
  source domains, and this is the only labelled data the evaluator holds. (Deployed at a new site,
  the head would be trained by a source hospital and shipped with the model: a few hundred
  weights.) The test set's labels are never read; unlabelled window images are not used.
- *Episodic per test set*: each test set (domain) starts from the deployed model, is refined on its
  own images (the paper's transductive setting: refine on the target images, then segment them)
  and predicted with the refined model; nothing carries over to the next test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simlab.adaptation.base import Adaptation, Adapted, as_tensor, batches, frozen_copy
from simlab.metrics.segmentation import dice_per_class


@dataclass(frozen=True)
class EarlyFeaturesParams:
    lr: float = field(default=1e-3, metadata={"gt": 0.0, "le": 1.0, "why": "a step this large only diverges",
                                              "help": "Adam learning rate of both steps (the paper: 1e-3)"})
    batch_size: int = field(default=16, metadata={"ge": 1, "le": 65_536, "why": "one batch is held in memory",
                                                  "help": "images per step, head initialisation and refinement"})
    head_steps: int = field(default=100, metadata={"ge": 1, "le": 100_000, "why": "steps on the source window",
                                                   "help": "Adam steps fitting the early head on the labelled source "
                                                           "window (base model frozen)"})
    max_epochs: int = field(default=5, metadata={"ge": 1, "le": 1_000, "why": "epochs over one test set",
                                                 "help": "refinement epochs at most (the paper: up to five)"})
    tolerance: float = field(default=0.005, metadata={
        "ge": 0.0, "le": 1.0, "help": "stop when the early-vs-final Dice changes by less than this between epochs "
                                      "(the paper: 0.005)"})


def first_block(model: nn.Module) -> nn.Module:
    """The U-Net's first encoder block (the early layers refined)."""
    seq = getattr(model, "model", None)
    if not isinstance(seq, nn.Sequential) or len(seq) == 0:
        raise ValueError(f"early_features needs a MONAI U-Net (model.model[0] is its first block), got "
                         f"{type(model).__name__}")
    return seq[0]


def make_head(channels: int, classes: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.PReLU(), nn.Conv2d(channels, classes, 1))


def early_logits(block: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's logits on the first block's features, upsampled to the image size."""
    return F.interpolate(head(block(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class EarlyFeatures(Adaptation):
    name = "early_features"
    help = ("early-feature self-training (Sheikh & Schultz 2022): a head on the first block's features, fitted on "
            "the labelled source window, teaches the first block with the network's own soft predictions on the "
            "test images")
    Params = EarlyFeaturesParams
    reads_source = True

    @classmethod
    def scenario_problems(cls, scenario) -> list[tuple[str, str]]:
        """The head is fitted on the evaluating hospital's labelled window, and any hospital whose stream
        reads a domain may be the one that evaluates it: every hospital needs labelled images."""
        return [(f"hospitals[{i}].label_fraction",
                 "evaluation.adaptation early_features fits its head on the evaluating hospital's labelled "
                 "window; this hospital has none (label_fraction 0)")
                for i, h in enumerate(scenario.hospitals) if h.label_fraction == 0]

    def predict(self, model, images, ctx) -> Adapted:
        p = self.params
        net = frozen_copy(model, ctx.device)
        block = first_block(net)
        x_all = as_tensor(images)
        with torch.no_grad():
            out = net(x_all[:1].to(ctx.device))
            channels = block(x_all[:1].to(ctx.device)).shape[1]
        head = make_head(channels, out.shape[1], ctx.seed).to(ctx.device)
        self._fit_head(block, head, ctx)
        for q in head.parameters():
            q.requires_grad_(False)
        final = self._refine(net, block, head, x_all, ctx, out.shape[1])
        return Adapted(final, net)

    def _fit_head(self, block: nn.Module, head: nn.Module, ctx) -> None:
        """Step 1: the head learns the source labels from the frozen first block's features (Eq. 1)."""
        if ctx.source is None:
            raise ValueError("early_features fits its head on the evaluating hospital's labelled window, and none "
                             "was given")
        images, labels = ctx.source()
        if len(images) == 0:
            raise ValueError("early_features fits its head on labelled images, and the evaluating hospital's window "
                             "has none")
        x_src, y_src = as_tensor(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
        gen = torch.Generator().manual_seed(ctx.seed)
        opt = torch.optim.Adam(head.parameters(), lr=self.params.lr)
        for _ in range(self.params.head_steps):
            idx = torch.randperm(len(x_src), generator=gen)[: self.params.batch_size]
            x = x_src[idx].to(ctx.device)
            with torch.no_grad():
                feats = block(x)
            logits = F.interpolate(head(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y_src[idx].to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def _segmentations(self, net, block, head, x_all, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Final and early label maps of every test image (no gradient)."""
        final, early = [], []
        with torch.no_grad():
            for sl in batches(len(x_all), ctx.batch_size):
                x = x_all[sl].to(ctx.device)
                final.append(net(x).argmax(dim=1).cpu())
                early.append(early_logits(block, head, x).argmax(dim=1).cpu())
        return torch.cat(final).to(torch.int64), torch.cat(early).to(torch.int64)

    def _refine(self, net, block, head, x_all, ctx, classes: int) -> torch.Tensor:
        """Step 2: Eq. 2 on the test images, only the first block's weights; stops on the early-vs-final
        Dice (tolerance) or after ``max_epochs``. Returns the final segmentation after refinement."""
        p = self.params
        params = list(block.parameters())
        for q in params:
            q.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=p.lr)
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        final, early = self._segmentations(net, block, head, x_all, ctx)
        agreement = float(dice_per_class(early, final, classes).mean())
        for _ in range(p.max_epochs):
            order = torch.randperm(len(x_all), generator=gen)
            for sl in batches(len(order), p.batch_size):
                x = x_all[order[sl]].to(ctx.device)
                with torch.no_grad():
                    teacher = torch.softmax(net(x), dim=1)
                student = torch.log_softmax(early_logits(block, head, x), dim=1)
                loss = -(teacher * student).sum(dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            final, early = self._segmentations(net, block, head, x_all, ctx)
            now = float(dice_per_class(early, final, classes).mean())
            if abs(now - agreement) < p.tolerance:
                break
            agreement = now
        for q in params:
            q.requires_grad_(False)
        return final
