"""Drift schedules: which distribution a hospital's window comes from in each round.

A plan for round t (1-based) is either a *mixture* over named domains (every image of the window draws
its domain from the weights) or an *interpolation* between two domains' scanner and population
parameters. ``true_domain`` is what the simulator knows about a window, for evaluation only: the
domain with the largest mixture weight (ties go to the earlier-listed domain) or, for interpolation,
the nearer end point (t < 0.5 → the first domain). Methods never see it.

Each drift type is one file in :mod:`simlab.data.drifts` (a :class:`~simlab.data.drifts.base.DriftType`)
and one line in ``DRIFTS``; ``DriftSpec`` is assembled from the shared keys and the keys each type
declares, so a new type's keys appear in the scenario schema when it is registered.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from simlab.config import assemble
from simlab.data.drifts.abrupt import Abrupt
from simlab.data.drifts.base import DriftType, WindowPlan
from simlab.data.drifts.gradual import Gradual
from simlab.data.drifts.none import NoDrift
from simlab.data.drifts.population import Population
from simlab.data.drifts.shifting import Shifting
from simlab.data.drifts.recurring import Recurring

__all__ = ["DRIFTS", "DriftSpec", "WindowPlan", "contribution_span", "describe", "plan", "true_domains"]

DRIFTS: dict[str, type[DriftType]] = {
    "none": NoDrift,
    "abrupt": Abrupt,
    "recurring": Recurring,
    "gradual": Gradual,
    "population": Population,
    "shifting": Shifting,
}


def _check(self) -> list[tuple[str, str]]:
    kind = DRIFTS[self.type]
    if kind.min_domains and len(self.domains) < kind.min_domains:
        return [("domains", f"drift type '{self.type}' needs at least {kind.min_domains} domains"), *kind.check(self)]
    return kind.check(self)


def _referenced_domains(self) -> list[str]:
    return DRIFTS[self.type].referenced_domains(self)


def _describe(self) -> str:
    return DRIFTS[self.type].describe(self)


def _round_problems(self, last: int) -> list[tuple[str, str]]:
    return DRIFTS[self.type].round_problems(self, last)


DriftSpec = assemble(
    "DriftSpec",
    "How a hospital's domain changes over rounds (the methods are never told). "
    + " ".join(f"{k}: {c.help}." for k, c in DRIFTS.items()),
    [
        ("type", Literal[tuple(DRIFTS)], field(default="none", metadata={"help": "the drift type"})),
        ("domain", str | None, field(default=None, metadata={"help": "none: the one domain"})),
        ("domains", list[str], field(default_factory=list, metadata={"help": "the domains, in order"})),
        ("start", int, field(default=1, metadata={"ge": 1, "help": "gradual, population, shifting: first round of the change"})),
        ("end", int, field(default=1, metadata={"ge": 1, "help": "gradual, population, shifting: round the change is complete"})),
        *[f for c in DRIFTS.values() for f in c.fields],
    ],
    {},
    namespace={"check": _check, "referenced_domains": _referenced_domains, "describe": _describe,
               "round_problems": _round_problems},
)


def plan(drift, t: int) -> WindowPlan:
    if t < 1:
        raise ValueError(f"rounds start at 1, got {t}")
    if drift.type not in DRIFTS:
        raise ValueError(f"unknown drift type {drift.type!r}")
    return DRIFTS[drift.type].plan(drift, t)


def true_domains(drift, rounds: int) -> list[str]:
    """True domain of every round's window, rounds 1..rounds (index 0 = round 1)."""
    return [plan(drift, t).true_domain for t in range(1, rounds + 1)]


def contribution_span(drift, rounds: int) -> dict[str, tuple[int, int]]:
    """Per domain the window draws on in rounds 1..rounds: (first, last) round it contributes to a window
    (:attr:`WindowPlan.contributing`). A domain fading out of a gradual or population transition
    contributes until its weight reaches 0, and an interpolation contributes to both of its ends."""
    span: dict[str, tuple[int, int]] = {}
    for t in range(1, rounds + 1):
        for d in plan(drift, t).contributing:
            span[d] = (span.get(d, (t, t))[0], t)
    return span


def describe(drift: dict) -> str:
    """The schedule of a drift written as a plain mapping (a resolved ``scenario.yaml``), in words; a type
    this version does not know (an old run) is named as it is."""
    from simlab.config import ScenarioError, build

    try:
        return build(DriftSpec, drift, "scenario.yaml").describe()
    except ScenarioError:
        return str(drift.get("type", "?"))
