"""The unlabelled-data objectives a scenario can name (``federation.semi_supervised.objective``), and
their params: the section ``federation.semi_supervised`` of the scenario.

Adding an objective: write one file with a :class:`~simlab.continual.unlabelled.UnlabelledObjective`
subclass and add one line to ``OBJECTIVES``. Its ``Params`` become the section
``federation.semi_supervised.<name>``; every continual method combines with it.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from simlab.config import assemble
from simlab.continual.mean_teacher import MeanTeacher
from simlab.continual.pseudo_label import PseudoLabel
from simlab.continual.unlabelled import PerturbationParams, UnlabelledObjective

OBJECTIVES: dict[str, type[UnlabelledObjective]] = {
    "mean_teacher": MeanTeacher,
    "pseudo_label": PseudoLabel,
}

SemiSupervisedSpec = assemble(
    "SemiSupervisedSpec",
    "What local training does with a window's unlabelled images (any continual method), and what FedAvg weighs by.",
    [("objective", Literal[("none", *OBJECTIVES)], field(default="none", metadata={
        "help": "none: unlabelled images are not trained on; "
                + "; ".join(f"{k}: {c.help}" for k, c in OBJECTIVES.items())})),
     ("weight_by", Literal["labelled", "all"], field(default="labelled", metadata={
         "help": "the example count a hospital reports, which FedAvg-style rules weigh by: its labelled images, "
                 "or all the images it trained on (labelled + unlabelled; needs an objective)"})),
     ("perturbation", PerturbationParams, field(default_factory=PerturbationParams, metadata={
         "help": "the views the objectives compare: FedDG's amplitude mix or noise and intensity"}))],
    OBJECTIVES,
)


def make_objective(spec, augmenter=None) -> UnlabelledObjective | None:
    """The objective ``spec.objective`` names (None for ``none``), with its own section of params;
    ``augmenter``: the hospital's FedDG augmenter for the ``frequency`` perturbation, or None."""
    if spec.objective == "none":
        return None
    cls = OBJECTIVES[spec.objective]
    return cls(getattr(spec, cls.name), spec.perturbation, augmenter)
