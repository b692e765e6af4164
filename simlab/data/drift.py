"""Drift schedules: which distribution a hospital's window comes from in each round.

A plan for round t (1-based) is either a *mixture* over named domains (every image of the window draws
its domain from the weights) or an *interpolation* between two domains' scanner and population
parameters. ``true_domain`` is what the simulator knows about a window, for evaluation only: the
domain with the largest mixture weight (ties go to the earlier-listed domain) or, for interpolation,
the nearer end point (t < 0.5 → the first domain). Methods never see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class DriftSpec:
    """How a hospital's domain changes over rounds (the methods are never told).

    none: ``domain`` throughout. abrupt: ``domains[0]`` until ``at[0]``, then ``domains[1]`` … (A→B→A
    is abrupt with three entries). recurring: cycles through ``domains``, ``period`` rounds each.
    gradual: ``domains[0]`` until ``start``, ``domains[1]`` from ``end``, in between either a mixture
    whose share of ``domains[1]`` grows linearly (mode mix) or images whose scanner and population
    parameters are interpolated (mode interpolate). population: a mixture of cohorts whose weights move
    linearly from ``weights_start`` (at ``start``) to ``weights_end`` (at ``end``).
    """

    type: Literal["none", "abrupt", "recurring", "gradual", "population"] = "none"
    domain: str | None = None
    domains: list[str] = field(default_factory=list)
    at: list[int] = field(default_factory=list)
    period: int | None = field(default=None, metadata={"ge": 1})
    start: int = field(default=1, metadata={"ge": 1})
    end: int = field(default=1, metadata={"ge": 1})
    mode: Literal["mix", "interpolate"] = "mix"
    weights_start: list[float] = field(default_factory=list)
    weights_end: list[float] = field(default_factory=list)

    def check(self):
        p = []
        need = {"none": 0, "abrupt": 2, "recurring": 2, "gradual": 2, "population": 2}[self.type]
        if self.type == "none":
            if not self.domain:
                p.append(("domain", "drift type 'none' needs 'domain'"))
            return p
        if len(self.domains) < need:
            p.append(("domains", f"drift type '{self.type}' needs at least {need} domains"))
        if self.type == "abrupt":
            if len(self.at) != len(self.domains) - 1:
                p.append(("at", f"expected {max(len(self.domains) - 1, 0)} switch rounds (one per change), "
                                f"found {len(self.at)}"))
            elif any(b <= a for a, b in zip(self.at, self.at[1:])) or any(r < 2 for r in self.at):
                p.append(("at", f"switch rounds must be increasing and >= 2, found {self.at}"))
        if self.type == "recurring" and self.period is None:
            p.append(("period", "drift type 'recurring' needs 'period' (rounds per visit)"))
        if self.type == "gradual":
            if len(self.domains) != 2:
                p.append(("domains", f"gradual drift goes from one domain to another: 2 domains, found {len(self.domains)}"))
            if self.end <= self.start:
                p.append(("end", f"expected end > start ({self.start}), found {self.end}"))
        if self.type == "population":
            for key in ("weights_start", "weights_end"):
                w = getattr(self, key)
                if len(w) != len(self.domains):
                    p.append((key, f"expected {len(self.domains)} weights (one per domain), found {len(w)}"))
                elif any(x < 0 for x in w) or sum(w) <= 0:
                    p.append((key, f"weights must be >= 0 with a positive sum, found {w}"))
            if self.end < self.start:
                p.append(("end", f"expected end >= start ({self.start}), found {self.end}"))
        return p

    def referenced_domains(self) -> list[str]:
        return [self.domain] if self.type == "none" and self.domain else list(self.domains)


@dataclass(frozen=True)
class WindowPlan:
    weights: dict[str, float] | None = None  # mixture over domains (sums to 1)
    interpolate: tuple[str, str, float] | None = None  # (from, to, t in (0, 1))

    @property
    def true_domain(self) -> str:
        if self.interpolate is not None:
            a, b, t = self.interpolate
            return a if t < 0.5 else b
        assert self.weights is not None
        best = max(self.weights.values())
        return next(d for d, w in self.weights.items() if w == best)


def _ramp(t: int, start: int, end: int) -> float:
    """0 before ``start``, 1 from ``end`` on, linear in between (end > start)."""
    if t <= start:
        return 0.0
    if t >= end:
        return 1.0
    return (t - start) / (end - start)


def plan(drift: DriftSpec, t: int) -> WindowPlan:
    if t < 1:
        raise ValueError(f"rounds start at 1, got {t}")
    kind = drift.type
    if kind == "none":
        return WindowPlan(weights={drift.domain: 1.0})
    if kind == "abrupt":
        k = sum(1 for r in drift.at if t >= r)
        return WindowPlan(weights={drift.domains[k]: 1.0})
    if kind == "recurring":
        k = ((t - 1) // drift.period) % len(drift.domains)
        return WindowPlan(weights={drift.domains[k]: 1.0})
    if kind == "gradual":
        a, b = drift.domains
        s = _ramp(t, drift.start, drift.end)
        if s in (0.0, 1.0):
            return WindowPlan(weights={b if s == 1.0 else a: 1.0})
        if drift.mode == "interpolate":
            return WindowPlan(interpolate=(a, b, s))
        return WindowPlan(weights={a: 1.0 - s, b: s})
    if kind == "population":
        s = _ramp(t, drift.start, drift.end) if drift.end > drift.start else float(t >= drift.end)
        w = [(1 - s) * x + s * y for x, y in zip(drift.weights_start, drift.weights_end)]
        total = sum(w)
        weights: dict[str, float] = {}
        for d, x in zip(drift.domains, w):  # a domain may be listed twice: add up
            weights[d] = weights.get(d, 0.0) + x / total
        return WindowPlan(weights={d: x for d, x in weights.items() if x > 0})
    raise ValueError(f"unknown drift type {kind!r}")


def true_domains(drift: DriftSpec, rounds: int) -> list[str]:
    """True domain of every round's window, rounds 1..rounds (index 0 = round 1)."""
    return [plan(drift, t).true_domain for t in range(1, rounds + 1)]
