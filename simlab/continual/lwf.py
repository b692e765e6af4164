"""Learning without Forgetting (Li & Hoiem 2017), pixel-wise, in its domain-incremental form.

The classes do not change between domains, so there is one head and LwF is a distillation of the
"old" model's predictions into the model being trained, on the current images. Per batch:

    L = L_seg(z, y) + λ_o · mean over pixels of KL( softmax(z_old / T) ‖ softmax(z / T) )

z are the logits of the model being trained, z_old those of the old model on the same (possibly
augmented) images, T the temperature. Li & Hoiem write the old-task term as the cross-entropy
−Σ y'_o log ŷ'_o between the temperature-softened outputs; the KL differs from it by the old model's
entropy, a constant, so the gradient is the same and the term is 0 when nothing changed. Like the
paper (and unlike Hinton et al.'s distillation) the term is not multiplied by T².

Which model is "old" in a task-agnostic stream: nobody tells a hospital when its data changed, so
the old model is the one the hospital **received this round** (the federation's knowledge before the
hospital adapts it to its window). Defaults: T = 2 (Lifelong-nnU-Net's ``-lwf_temperature`` default,
also the paper's), λ_o = 1 (the paper's loss balance weight). No state is kept between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from simlab.continual.method import DistilsReceivedModel
from simlab.continual.training import loss_weight


@dataclass(frozen=True)
class LwfParams:
    temperature: float = field(default=2.0, metadata={
        "gt": 0.0, "le": 100.0, "why": "softmax(z/T) flattens towards uniform as T grows: at T = 100 logits a few units "
                                       "apart give nearly equal probabilities and almost nothing is distilled",
        "help": "softmax temperature T of the distillation"})
    weight: float = loss_weight(1.0, "λ_o: weight of the distillation term")


def distillation(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over pixels (and the batch) of KL(softmax(old/T) ‖ softmax(new/T)); channels = classes."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    log_q = F.log_softmax(old_logits / temperature, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()


class LwF(DistilsReceivedModel):
    name = "lwf"
    help = "Learning without Forgetting: distil the received model's predictions"
    family = "distillation"
    Params = LwfParams

    def __init__(self, params: LwfParams | None = None):
        super().__init__(params or LwfParams())

    def loss_term(self, model, x, y, logits):
        if self.params.weight == 0.0:
            return None
        return self.params.weight * distillation(logits, self.teacher_logits(x), self.params.temperature)
