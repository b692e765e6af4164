"""The test-time adaptations a scenario can name (``evaluation.adaptation``), and their params.

Adding an adaptation: write one file with an :class:`~simlab.adaptation.base.Adaptation` subclass and
add one line to ``ADAPTATIONS``. Its ``Params``, if any, become the section ``evaluation.<name>`` of
the scenario (:func:`evaluation_fields` and ``config.assemble`` in the schema), an arm may set it, and
the hospital, the server and the tests read the adaptation's declarations from here.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from simlab.adaptation.adabn import AdaBN
from simlab.adaptation.base import Adaptation
from simlab.adaptation.early_features import EarlyFeatures
from simlab.adaptation.fda import Fda
from simlab.adaptation.none import NoAdaptation
from simlab.adaptation.tent import Tent

ADAPTATIONS: dict[str, type[Adaptation]] = {
    "none": NoAdaptation,
    "adabn": AdaBN,
    "tent": Tent,
    "fda": Fda,
    "early_features": EarlyFeatures,
}


def adaptation_field() -> tuple:
    """The ``adaptation`` field of the evaluation section: one of the registered names."""
    return ("adaptation", Literal[tuple(ADAPTATIONS)], field(
        default="none", metadata={"help": "; ".join(f"{k}: {c.help}" for k, c in ADAPTATIONS.items())}))


def param_sections() -> tuple[str, ...]:
    """The evaluation sections the registered adaptations own (``evaluation.<name>``)."""
    return tuple(f"evaluation.{k}" for k, c in ADAPTATIONS.items() if c.Params is not None)


def adaptation_class(evaluation) -> type[Adaptation]:
    """The class ``evaluation.adaptation`` names (an evaluation section)."""
    return ADAPTATIONS[evaluation.adaptation]


def make_adaptation(evaluation) -> Adaptation:
    """The adaptation of an evaluation section, with its own section of params."""
    cls = adaptation_class(evaluation)
    return cls(getattr(evaluation, cls.name)) if cls.Params is not None else cls()
