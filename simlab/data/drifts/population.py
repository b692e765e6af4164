"""Population drift: a mixture of cohorts whose weights move linearly from ``weights_start`` (at
``start``) to ``weights_end`` (at ``end``)."""

from __future__ import annotations

from dataclasses import field

from simlab.data.drifts.base import SpanDrift, WindowPlan, ramp


class Population(SpanDrift):
    name = "population"
    help = "a mixture of cohorts whose weights move linearly between ``start`` and ``end``"
    fields = [
        ("weights_start", list[float], field(default_factory=list,
                                             metadata={"help": "population: cohort weights at start"})),
        ("weights_end", list[float], field(default_factory=list, metadata={"help": "population: cohort weights at end"})),
    ]

    @staticmethod
    def check(spec):
        p = []
        for key in ("weights_start", "weights_end"):
            w = getattr(spec, key)
            if len(w) != len(spec.domains):
                p.append((key, f"expected {len(spec.domains)} weights (one per domain), found {len(w)}"))
            elif any(x < 0 for x in w) or sum(w) <= 0:
                p.append((key, f"weights must be >= 0 with a positive sum, found {w}"))
        if spec.end < spec.start:
            p.append(("end", f"expected end >= start ({spec.start}), found {spec.end}"))
        return p

    @staticmethod
    def describe(spec):
        return (f"a population mixture of {', '.join(spec.domains)}, weights {spec.weights_start} → "
                f"{spec.weights_end} over rounds {spec.start}–{spec.end}")

    @staticmethod
    def plan(spec, t):
        s = ramp(t, spec.start, spec.end) if spec.end > spec.start else float(t >= spec.end)
        w = [(1 - s) * x + s * y for x, y in zip(spec.weights_start, spec.weights_end)]
        total = sum(w)
        weights: dict[str, float] = {}
        for d, x in zip(spec.domains, w):  # a domain may be listed twice: add up
            weights[d] = weights.get(d, 0.0) + x / total
        return WindowPlan(weights={d: x for d, x in weights.items() if x > 0})
