"""Drift schedules: which distribution a hospital's window comes from in each round.

A plan for round t (1-based) is either a *mixture* over named domains (every image of the window draws
its domain from the weights) or an *interpolation* between two domains' scanner and population
parameters. ``true_domain`` is what the simulator knows about a window, for evaluation only: the
domain with the largest mixture weight (ties go to the earlier-listed domain) or, for interpolation,
the nearer end point (t < 0.5 → the first domain). Methods never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

from simlab.scenario.schema import DriftSpec


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
