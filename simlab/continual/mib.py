"""Modeling the Background, MiB (Cermelli et al., CVPR 2020), and its domain-incremental form.

MiB is a class-incremental method: at step t the labels annotate only the classes C^t new to the
step, every other pixel (old classes included) is labelled background b. MiB corrects the two
losses for that:

- unbiased cross-entropy (their Eq. 4-5): the ground-truth background may be an old class, so its
  probability is the background's plus that of every old class,

      ℓ_ce = −(1/|I|) Σ_i log q̃(i, y_i),   q̃(i, c) = q(i, c) for c ≠ b,   q̃(i, b) = Σ_{k ∈ Y^{t−1}} q(i, k);

- unbiased knowledge distillation (their Eq. 6-7): the old model's background may be a new class,
  so the new model's probability for it is the background's plus that of every new class,

      ℓ_kd = −(1/|I|) Σ_i Σ_{c ∈ Y^{t−1}} q_old(i, c) log q̂(i, c),
      q̂(i, c) = q(i, c) for c ≠ b,   q̂(i, b) = Σ_{k ∈ C^t} q(i, k);

  the total being ℓ_ce + λ_kd · ℓ_kd.

Written for any old class set and any set of classes annotated now (:func:`unbiased_ce`,
:func:`unbiased_kd`): the labelled background stands for the background and the old classes *not
annotated* now; the old model's background stands for the background and the classes *new* to the
model. With the paper's sets (annotated now = {b} ∪ C^t, disjoint from the old foreground) these are
Eq. 5 and Eq. 7. In the domain-incremental stream here the class set never changes and every class is
annotated in every window, so both sets are {b} alone and the losses reduce to the plain ones
(tested numerically):

    ℓ_ce = −(1/|I|) Σ_i log q(i, y_i)                 (the usual pixel cross-entropy)
    ℓ_kd = −(1/|I|) Σ_i Σ_c q_old(i, c) log q(i, c)   (softmax distillation, no temperature)

What :class:`MiB` adds to the segmentation loss (Dice + CE, applied by train_local): **only**
λ_kd · ℓ_kd. The unbiased cross-entropy *is* the cross-entropy already in the segmentation loss, so
adding it again would only double the CE weight. MiB's third piece, initialising the classifier of
new classes from the background, does not arise: there are no new classes.

Deviations and choices:

- ℓ_kd is the cross-entropy of the paper's Eq. 7, not a KL: it differs from the KL by the old model's
  entropy (a constant, same gradient), so it is not 0 when nothing changed.
- MiB's code (and Lifelong-nnU-Net's copy of it) also divides the class sum by the number of old
  classes and scales the old logits by ``alpha`` (default 1) before the softmax; neither is in the
  paper's equations, so neither is here (alpha = 1 is a no-op; the 1/|Y^{t−1}| factor makes λ_kd
  here |Y^{t−1}| times stronger than the same number there).
- Which model is "old" in a task-agnostic stream: nobody tells a hospital when its data changed,
  so the old model is the one the hospital **received this round**, as for LwF. The alternative
  (the model at the last detected shift) would need a shift detector inside the method and a model
  kept at the hospital across rounds; it is not offered.

Default: λ_kd = 10, the ``lkd`` default of Lifelong-nnU-Net's ``nnUNetTrainerMiB`` (MiB's own
Pascal-VOC runs use ``--loss_kd 10``). The ODEx paper lowered it for its baselines "to prevent loss
explosion" without giving the value; with three classes and no 1/|Y^{t−1}| factor, sweep it.
No state is kept between rounds.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from simlab.continual.method import DistilsReceivedModel
from simlab.continual.training import loss_weight


@dataclass(frozen=True)
class MibParams:
    kd_weight: float = loss_weight(10.0, "λ_kd: weight of the (unbiased) distillation of the received model's "
                                         "predictions")


def unbiased_ce(logits: torch.Tensor, labels: torch.Tensor, num_old: int, annotated: Collection[int]) -> torch.Tensor:
    """MiB's unbiased cross-entropy, mean over pixels. ``logits`` [B, C, H, W] of the new model,
    ``labels`` [B, H, W]; the first ``num_old`` channels are the old model's classes (0 = background);
    ``annotated``: the classes the labels can name (always with 0). The labelled background's
    probability is that of the background plus every old class not annotated now."""
    log_q = F.log_softmax(logits, dim=1)
    absorbed = [0] + [k for k in range(1, num_old) if k not in annotated]
    log_bg = torch.logsumexp(log_q[:, absorbed], dim=1, keepdim=True)
    log_q = torch.cat([log_bg, log_q[:, 1:]], dim=1)
    return F.nll_loss(log_q, labels.long())


def unbiased_kd(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """MiB's unbiased distillation, −mean over pixels of Σ_{c old} q_old(c) log q̂(c). The new model
    has C ≥ C_old channels, its first C_old the old classes; the old background is matched by the
    new model's background plus every class new to it (channels C_old … C−1)."""
    num_old = old_logits.shape[1]
    log_q = F.log_softmax(logits, dim=1)
    log_bg = torch.logsumexp(torch.cat([log_q[:, :1], log_q[:, num_old:]], dim=1), dim=1, keepdim=True)
    log_q_hat = torch.cat([log_bg, log_q[:, 1:num_old]], dim=1)
    q_old = F.softmax(old_logits, dim=1)
    return -(q_old * log_q_hat).sum(dim=1).mean()


def plain_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reduction of :func:`unbiased_ce` when every class is annotated: the pixel cross-entropy."""
    return F.cross_entropy(logits, labels.long())


def plain_kd(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """The reduction of :func:`unbiased_kd` when the class set is unchanged: −mean Σ_c q_old log q."""
    return -(F.softmax(old_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class MiB(DistilsReceivedModel):
    name = "mib"
    help = "Modeling the Background (domain-incremental: CE + λ_kd·distillation of the received model)"
    family = "distillation"
    Params = MibParams

    def __init__(self, params: MibParams | None = None):
        super().__init__(params or MibParams())

    def loss_term(self, model, x, y, logits):
        if self.params.kd_weight == 0.0:
            return None
        # the class set is the same before and after: unbiased_kd(logits, old) == plain_kd(logits, old)
        return self.params.kd_weight * plain_kd(logits, self.teacher_logits(x))
