"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017): consistency between the model being trained (the
student, weights θ) and a teacher whose weights θ' are an exponential moving average of the student's.

Their consistency cost and teacher update (Section 2):

    J(θ) = E_{x, η', η} [ ‖ f(x, θ', η') − f(x, θ, η) ‖² ]
    θ'_t = α θ'_{t−1} + (1 − α) θ_t                                  (after every optimiser step)

f the softmax output, η and η' independent input perturbations (:class:`~simlab.continual.unlabelled.
Perturbation`). Per pixel and class, as SSL4MIS's 2D mean teacher computes it for segmentation, the
cost is the mean over the batch, classes and pixels of (p_student − p_teacher)², and the total loss
is L_seg + w(t) · J, w(t) the sigmoid ramp-up to ``weight`` (:func:`~simlab.continual.unlabelled.
sigmoid_rampup`). The teacher's output carries no gradient. The slides' temporal-ensembling summary
says the same ("the Teacher's weights are an EMA of the Student's at previous training iterations,
α ≈ 1"); LE-UDA's dual teacher builds on this model.

In a federation the teacher is the model the hospital **received this round** (the federation's
knowledge before the hospital adapts it), updated by the EMA of the student within the round and
dropped after it; it never leaves the hospital. What the server averages is the student.

Choices, and where they deviate:

- α = 0.99 (SSL4MIS's ``ema_decay``; Tarvainen & Valpola use 0.99 during ramp-up, 0.999 after).
  Constant: the paper's code uses min(1 − 1/(step + 1), α) so that the teacher is the true average of
  the first steps; here it starts as the received model, which that warm-up would overwrite with the
  first student step. With few local steps per round the teacher stays close to the received model.
- Only parameters are averaged (as in the paper's code); the teacher's BatchNorm runs in training
  mode, normalising with its own batch's statistics, as in SSL4MIS and the paper's code.
- Both views are perturbed, independently (the paper's η and η'); SSL4MIS perturbs the teacher's only.
- w_max = 0.1 (SSL4MIS's ``consistency``), ramp-up over the first quarter of the rounds.
- Student and teacher see an unlabelled batch of ``federation.batch_size`` images, drawn
  independently of the labelled batch (SSL4MIS mixes both into one batch of a fixed split).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from simlab.continual.training import loss_weight
from simlab.continual.unlabelled import Term, UnlabelledObjective


@dataclass(frozen=True)
class MeanTeacherParams:
    weight: float = loss_weight(0.1, "w_max: weight of the consistency cost after ramp-up (SSL4MIS's 2D mean "
                                     "teacher: 0.1)")
    rampup: float = field(default=0.25, metadata={
        "ge": 0.0, "le": 1.0, "help": "share of federation.rounds over which the weight ramps up "
                                      "(sigmoid, Laine & Aila 2017); 0: constant"})
    ema_decay: float = field(default=0.99, metadata={
        "ge": 0.0, "le": 1.0, "help": "α of θ' ← α θ' + (1 − α) θ after every step (1: the teacher stays "
                                      "the received model)"})


def consistency(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """mean over batch, classes and pixels of (softmax(student) − p_teacher)²."""
    return ((F.softmax(student_logits, dim=1) - teacher_probs) ** 2).mean()


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """θ' ← α θ' + (1 − α) θ for every parameter (buffers are left alone)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)


class MeanTeacher(UnlabelledObjective):
    name = "mean_teacher"
    help = "mean teacher: consistency with an EMA of the student that starts as the received model"
    Params = MeanTeacherParams

    def start(self, model):
        self.teacher = copy.deepcopy(model).train()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def term(self, model, x):
        seen = self.perturb(x)
        logits = model(seen)
        with torch.no_grad():
            target = F.softmax(self.teacher(self.perturb(x)), dim=1)
        return Term(self.weight * consistency(logits, target), seen, logits)

    def after_step(self, model):
        ema_update(self.teacher, model, self.params.ema_decay)

    def stop(self):
        self.teacher = None
