"""The aggregation rules a scenario can name (``federation.aggregation.rule``), and their params.

Adding a rule: write one file with a :class:`~simlab.aggregation.core.Rule` subclass (a weighting:
:class:`~simlab.aggregation.core.WeightingRule`; a coordinate-wise statistic:
:class:`~simlab.aggregation.core.CoordinateRule`) and add one line to ``RULES``. Its ``Params``, if
any, become the section ``federation.aggregation.<name>`` of the scenario.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Literal

from simlab.aggregation.core import Rule
from simlab.aggregation.fedavg import FedAvg
from simlab.aggregation.ida import Ida, IdaFedAvg
from simlab.aggregation.krum import Krum
from simlab.aggregation.median import Median
from simlab.aggregation.trimmed_mean import TrimmedMean
from simlab.config import assemble

RULES: dict[str, type[Rule]] = {
    "fedavg": FedAvg,
    "ida": Ida,
    "ida_fedavg": IdaFedAvg,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
}


def _check(self) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if self.rule not in RULES:
        problems.append(("rule", f"unknown rule {self.rule!r} (known: {', '.join(RULES)})"))
    if not (math.isfinite(self.eps) and self.eps > 0.0):
        problems.append(("eps", f"must be a finite number > 0, found {self.eps!r}"))
    if self.max_update_norm is not None and not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0.0):
        problems.append(("max_update_norm", f"must be a finite number > 0 or null, found {self.max_update_norm!r}"))
    return problems


AggregationParams = assemble(
    "AggregationParams",
    "How the server combines the client models of one round (see :mod:`simlab.aggregation`).",
    [
        ("rule", Literal[tuple(RULES)], field(
            default="fedavg", metadata={"help": "; ".join(f"{k}: {c.help}" for k, c in RULES.items())})),
        ("include_buffers", bool, field(default=False, metadata={
            "help": "distances (IDA weights, monitoring) also over normalisation buffers (running mean/var), "
                    "not only trainable parameters"})),
        ("eps", float, field(default=1e-12, metadata={
            "gt": 0.0, "le": 1.0, "why": "ε only keeps 1/d_k finite; an ε as large as the distances between trained "
                                         "models turns IDA into the plain mean without saying so",
            "help": "IDA distance floor ε in 1/max(d_k, ε); all d_k < ε falls back to plain weights"})),
        ("max_update_norm", float | None, field(default=None, metadata={
            "gt": 0.0, "le": 1e6, "why": "an update this long comes from a diverged model; null sets no limit",
            "help": "reject a client whose ‖θ_k − θ_global‖₂ exceeds this (None: no limit)"})),
    ],
    RULES,
    namespace={"check": _check},
)


def make_rule(params) -> Rule:
    """The rule object ``params.rule`` names, given its own section of ``params``."""
    cls = RULES[params.rule]
    return cls(params, getattr(params, params.rule, None))
