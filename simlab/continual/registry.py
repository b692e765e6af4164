"""The continual methods a scenario can name (``continual.method``), and their params.

Adding a method: write one file with a :class:`~simlab.continual.method.Method` subclass and add one
line to ``METHODS``. Its ``Params``, if any, become the section ``continual.<name>`` of the scenario;
the schema, the server, the hospital and the summary read the method's declarations from here.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from simlab.config import assemble
from simlab.continual.ewc import EWC
from simlab.continual.lwf import LwF
from simlab.continual.method import Method
from simlab.continual.mib import MiB
from simlab.continual.odex import Odex
from simlab.continual.plop import PLOP
from simlab.continual.replay import Replay
from simlab.continual.rwalk import RWalk
from simlab.continual.sequential import Sequential
from simlab.continual.upper_bound import UpperBound

METHODS: dict[str, type[Method]] = {
    "sequential": Sequential,
    "replay": Replay,
    "upper_bound": UpperBound,
    "ewc": EWC,
    "odex": Odex,
    "lwf": LwF,
    "mib": MiB,
    "plop": PLOP,
    "rwalk": RWalk,
}

# Method names a scenario may still use, with what to write instead (a validation error, not an alias).
RENAMED = {
    "joint": "was renamed to 'replay' (every window seen so far, same steps per round: a compute-matched "
             "replay reference that breaks the no-rehearsal rule, not an upper bound); the static upper bound "
             "(i.i.d. training on all of the stream's data) is 'upper_bound'",
}

ContinualSpec = assemble(
    "ContinualSpec",
    "Which continual method every hospital runs, and each method's hyperparameters.",
    [("method", Literal[tuple(METHODS)], field(
        default="sequential", metadata={"help": "; ".join(f"{k}: {c.help}" for k, c in METHODS.items()),
                                        "renamed": RENAMED}))],
    METHODS,
)


def method_class(spec) -> type[Method]:
    """The class of ``spec.method`` (a ContinualSpec)."""
    return METHODS[spec.method]


def make_method(spec) -> Method:
    """The hospital-side method of a ContinualSpec, with its own section of params."""
    cls = method_class(spec)
    return cls(getattr(spec, cls.name)) if cls.Params is not None else cls()
